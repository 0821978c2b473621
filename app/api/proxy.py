"""The client's address behind nginx: ``X-Forwarded-For`` is believed only from the edge."""

from __future__ import annotations

import ipaddress
import socket

from werkzeug.middleware.proxy_fix import ProxyFix

from app.api.edge import came_through_the_edge


class TrustedProxyFix:
    """ProxyFix (the last X-Forwarded-For hop) for requests from the edge; others keep their own address, so a
    client talking to gunicorn directly cannot choose the address admission counts it by.

    The edge is: with EDGE_SECRET, a request carrying it; without, a peer on the replica's unix socket (its folder
    admits nginx alone) or one in TRUSTED_PROXIES (Kubernetes: the pod network, which a NetworkPolicy restricts
    to the Ingress)."""

    def __init__(self, app, trusted: str, edge_secret: str = ""):
        self.app = app
        self.fixed = ProxyFix(app, x_for=1, x_proto=0, x_host=0, x_port=0, x_prefix=0)
        self.edge_secret = edge_secret
        entries = [entry.strip() for entry in trusted.split(",") if entry.strip()]
        self.trust_all = "*" in entries
        self.networks = [ipaddress.ip_network(entry.strip("[]"), strict=False) for entry in entries if entry != "*"]

    def __call__(self, environ, start_response):
        handler = self.fixed if self.from_the_edge(environ) else self.app
        return handler(environ, start_response)

    def from_the_edge(self, environ: dict) -> bool:
        if self.edge_secret:
            return came_through_the_edge(environ, self.edge_secret)
        # A unix-socket peer has no address to check (gunicorn leaves REMOTE_ADDR empty); the socket's folder is.
        if getattr(environ.get("gunicorn.socket"), "family", None) == socket.AF_UNIX:
            return True
        return self.trusts(environ.get("REMOTE_ADDR", ""))

    def trusts(self, address: str) -> bool:
        if self.trust_all:
            return True
        try:
            peer = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(peer in network for network in self.networks)
