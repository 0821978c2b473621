"""nginx in front of the API replicas: one template, two layouts (docker-compose and the native stack).

``nginx/nginx.conf`` is the compose rendering, committed so compose can mount it; regenerate it with
``python -m app.ops.nginx_config`` after editing ``nginx/nginx.conf.template`` (a test checks they agree).
"""

from __future__ import annotations

import os
import pwd
from dataclasses import asdict, dataclass
from pathlib import Path

import jinja2

from app.config import PROJECT_ROOT, Settings

NGINX_DIR = PROJECT_ROOT / "nginx"
TEMPLATE_NAME = "nginx.conf.template"
COMPOSE_CONF_PATH = NGINX_DIR / "nginx.conf"

# Port of the API replicas inside the compose network and of nginx on the host (the tutorial script's 4000 → 5000).
COMPOSE_API_SERVER = "api:5000"
LISTEN_PORT = 4000
# Stands for the container's nameserver in nginx/nginx.conf: nginx/start.sh writes it in from
# /etc/resolv.conf when the container starts (Docker's embedded DNS is 127.0.0.11, podman's is at the gateway).
NAMESERVER_PLACEHOLDER = "__NAMESERVER__"
# Stands for EDGE_SECRET in nginx/nginx.conf: nginx/start.sh writes it in from the container's environment (a
# secret is never committed nor baked into the image).
EDGE_SECRET_PLACEHOLDER = "__EDGE_SECRET__"


@dataclass(frozen=True)
class NginxLayout:
    """Everything that differs between the compose and the native nginx; the rest lives in the template."""

    layout_name: str
    listen: str
    servers: tuple[str, ...]
    pid_path: str
    error_log: str
    access_log: str
    # DNS server to re-resolve server names with; empty: names are resolved once, at start.
    resolver: str = ""
    # Mark servers `resolve` (open-source nginx ≥ 1.27.3) so new or moved replicas are picked up.
    resolve: bool = False
    # Folder for nginx's temp files; empty: the compiled-in defaults (fine inside the nginx image).
    temp_dir: str = ""
    # Account for nginx's worker processes; only meaningful when the master runs as root.
    user: str = ""
    # Sent to the replicas as X-Edge-Secret (their EDGE_SECRET); empty: replicas on unix sockets need none.
    edge_secret: str = ""
    # Largest dataset upload nginx passes on (MB): MAX_DATASET_MB and a little for the multipart framing, so the
    # app answers 413 with its own message up to it and nginx (413, JSON) above it.
    dataset_body_mb: int = Settings.model_fields["max_dataset_mb"].default + 1


def compose_layout() -> NginxLayout:
    """nginx in the compose image (nginx/Dockerfile), in front of the service `api` however many replicas it has.

    nginx/start.sh fills in the resolver and drops `resolve` on nginx older than 1.27.3.
    """
    return NginxLayout(
        layout_name="compose",
        listen=str(LISTEN_PORT),
        servers=(COMPOSE_API_SERVER,),
        pid_path="/var/run/nginx.pid",
        error_log="/dev/stderr",
        access_log="/dev/stdout",
        resolver=NAMESERVER_PLACEHOLDER,
        resolve=True,
        edge_secret=EDGE_SECRET_PLACEHOLDER,
    )


def native_layout(
    listen: str, api_addresses: list[str], state_dir: Path, max_dataset_mb: int | None = None, edge_secret: str = ""
) -> NginxLayout:
    """nginx run by ``python -m app stack``: local replicas on ``unix:/path`` sockets, or (``--role edge``) replicas
    on other machines at ``host:port`` with ``edge_secret``; pid, logs and temp files under state_dir."""
    state_dir = state_dir.resolve()
    return NginxLayout(
        layout_name="native",
        listen=listen,
        servers=tuple(api_addresses),
        pid_path=str(state_dir / "nginx.pid"),
        error_log=str(state_dir / "logs" / "nginx-error.log"),
        access_log=str(state_dir / "logs" / "nginx-access.log"),
        temp_dir=str(state_dir / "nginx-temp"),
        # As root, nginx would hand its workers to `nobody`, who cannot enter the stack's private folders.
        user=pwd.getpwuid(0).pw_name if os.geteuid() == 0 else "",
        dataset_body_mb=(max_dataset_mb or Settings.model_fields["max_dataset_mb"].default) + 1,
        edge_secret=edge_secret,
    )


def render_nginx_conf(layout: NginxLayout) -> str:
    """The nginx.conf text for a layout."""
    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader(NGINX_DIR),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )
    return environment.get_template(TEMPLATE_NAME).render(**asdict(layout))


def write_compose_conf() -> Path:
    COMPOSE_CONF_PATH.write_text(render_nginx_conf(compose_layout()))
    return COMPOSE_CONF_PATH


if __name__ == "__main__":
    print(f"wrote {write_compose_conf()}")
