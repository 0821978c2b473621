"""The client's address behind nginx: ``X-Forwarded-For`` is believed only from TRUSTED_PROXIES."""

from __future__ import annotations

import ipaddress

from werkzeug.middleware.proxy_fix import ProxyFix


class TrustedProxyFix:
    """ProxyFix (the last X-Forwarded-For hop) for requests whose peer is a trusted proxy; others keep their own
    address, so a client talking to gunicorn directly cannot choose the address admission counts it by."""

    def __init__(self, app, trusted: str):
        self.app = app
        self.fixed = ProxyFix(app, x_for=1, x_proto=0, x_host=0, x_port=0, x_prefix=0)
        entries = [entry.strip() for entry in trusted.split(",") if entry.strip()]
        self.trust_all = "*" in entries
        self.networks = [ipaddress.ip_network(entry.strip("[]"), strict=False) for entry in entries if entry != "*"]

    def __call__(self, environ, start_response):
        handler = self.fixed if self.trusts(environ.get("REMOTE_ADDR", "")) else self.app
        return handler(environ, start_response)

    def trusts(self, address: str) -> bool:
        if self.trust_all:
            return True
        try:
            peer = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(peer in network for network in self.networks)
