"""Deployment files: the compose file as docker-compose reads it, and nginx from the shared template.

The native rendering of the template runs on the Debian nginx, so the parts it shares with the compose one
(upstream, timeouts, JSON error pages) are exercised for real; the compose images and stack themselves run in
`make compose-smoke` (deploy/compose-smoke.sh).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import requests
import yaml

from app.config import Settings
from app.ops.mlflow_server import AUTH_CONFIG, CREDENTIALS_NAME
from app.ops.nginx_config import COMPOSE_CONF_PATH, compose_layout, native_layout, render_nginx_conf
from app.ops.stack import Stack, StackOptions, find_binary, free_ports

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
LOCAL_IMAGES_ENV = ROOT / "deploy" / "local-images.env"
MLFLOW_OVERRIDE = ROOT / "deploy" / "compose-mlflow.yml"
MLFLOW_UI_OVERRIDE = ROOT / "deploy" / "compose-mlflow-ui.yml"
POD_SECURITY_OVERRIDE = ROOT / "deploy" / "compose-pod-security.yml"
K8S_BASE = ROOT / "deploy" / "k8s" / "base"
NGINX_START = ROOT / "nginx" / "start.sh"


# The secrets compose refuses to start without.
SECRETS = {"API_TOKEN": "t0ken", "REDIS_PASSWORD": "s3cret-pw", "EDGE_SECRET": "edge-s3cret-0123456789"}


def docker_compose(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """``docker-compose -f docker-compose.yml ARGS`` with ``env`` (default: this environment and SECRETS)."""
    binary = shutil.which("docker-compose")
    assert binary, "docker-compose is missing: sudo apt-get install docker-compose (.ci/run installs it)"
    env = os.environ | SECRETS if env is None else env
    return subprocess.run(
        [binary, "-f", str(COMPOSE_FILE), *args], cwd=ROOT, capture_output=True, text=True, env=env, timeout=60
    )


def test_docker_compose_accepts_the_compose_file():
    proc = docker_compose("config", "-q")
    assert proc.returncode == 0, proc.stderr


def test_compose_topology_nginx_4000_in_front_of_three_api_replicas():
    config = yaml.safe_load(docker_compose("config").stdout)
    services = config["services"]
    # docker-compose 1.29 lists profiled services too (Compose v2 hides them): check who is behind a profile.
    profiles = {name: service.get("profiles", []) for name, service in services.items()}
    assert profiles == {
        "nginx": [],
        "api": [],
        "worker": [],
        "redis": [],
        "worker-gpu": ["gpu"],
        "mlflow": ["mlflow"],
    }
    assert services["api"]["deploy"]["replicas"] == 3
    assert "ports" not in services["api"]  # only nginx is published
    assert published(services["nginx"]) == [("127.0.0.1", "4000")]  # BIND_ADDRESS widens it
    assert services["nginx"]["depends_on"]["api"]["condition"] == "service_healthy"
    assert services["worker"]["depends_on"]["redis"]["condition"] == "service_healthy"
    assert services["redis"]["command"][:3] == ["redis-server", "--appendonly", "yes"]
    for name in services:
        assert services[name]["restart"] == "unless-stopped", name


def test_compose_redis_needs_the_password_the_app_uses_and_is_not_published():
    services = yaml.safe_load(docker_compose("config").stdout)["services"]
    assert services["redis"]["command"][-2:] == ["--requirepass", "s3cret-pw"]
    assert "ports" not in services["redis"]
    for name in ("api", "worker"):
        assert services[name]["environment"]["REDIS_URL"] == "redis://:s3cret-pw@redis:6379/0"
    for name in ("api", "worker"):
        assert ("artifacts", "/data/artifacts") in mounts(services[name])


def test_compose_redis_healthcheck_takes_the_password_from_the_environment_and_needs_a_pong(tmp_path):
    redis = yaml.safe_load(docker_compose("config").stdout)["services"]["redis"]
    test = redis["healthcheck"]["test"]
    assert SECRETS["REDIS_PASSWORD"] not in " ".join(test), "the password is on the healthcheck's command line"
    assert test[0] == "CMD-SHELL"
    check = test[1]
    # The check as the container runs it, against a real Redis with the compose file's password; only the port
    # differs, so the redis-cli it finds first is given it.
    [port] = free_ports(1)
    server = subprocess.Popen(
        [find_binary("redis-server"), "--port", str(port), "--save", "", "--requirepass", redis["command"][-1]],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
    )
    shim = tmp_path / "bin" / "redis-cli"
    shim.parent.mkdir()
    shim.write_text(f'#!/bin/sh\nexec {find_binary("redis-cli")} -p {port} "$@"\n')
    shim.chmod(0o755)
    try:

        def healthy(env: dict) -> bool:
            env = os.environ | env | {"PATH": f"{shim.parent}:{os.environ['PATH']}"}
            return subprocess.run(["sh", "-c", check], env=env, timeout=10).returncode == 0

        deadline = time.monotonic() + 10
        while not healthy(redis["environment"]) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert healthy(redis["environment"])
        assert not healthy({"REDISCLI_AUTH": "wrong"})
        assert not healthy({"REDISCLI_AUTH": ""})
    finally:
        server.terminate()
        server.wait(timeout=10)


@pytest.mark.parametrize("missing", ["API_TOKEN", "REDIS_PASSWORD", "EDGE_SECRET"])
def test_compose_refuses_to_start_without_a_secret_naming_it(missing):
    env = {k: v for k, v in (os.environ | SECRETS).items() if k != missing}
    proc = docker_compose("config", "-q", env=env)
    assert proc.returncode != 0 and f"set {missing}" in proc.stderr, proc.stderr


def test_compose_is_closed_by_default_token_set_hub_offline_mlflow_unpublished():
    env = os.environ | SECRETS | {"MLFLOW_TRACKING_URI": "http://mlflow:5000"}
    services = yaml.safe_load(docker_compose("--profile", "mlflow", "config", env=env).stdout)["services"]
    for name in ("api", "worker"):
        assert services[name]["environment"]["API_TOKEN"] == "t0ken"
        assert services[name]["environment"]["HF_HUB_OFFLINE"] == "1"
    # The replicas answer only nginx: both hold the edge secret (the workers, which nothing connects to, do not).
    edge = SECRETS["EDGE_SECRET"]
    assert services["api"]["environment"]["EDGE_SECRET"] == services["nginx"]["environment"]["EDGE_SECRET"] == edge
    assert "EDGE_SECRET" not in services["worker"]["environment"]
    assert published(services["mlflow"]) == []
    with_ui = docker_compose("-f", str(MLFLOW_UI_OVERRIDE), "--profile", "mlflow", "config", env=env)
    assert published(yaml.safe_load(with_ui.stdout)["services"]["mlflow"]) == [("127.0.0.1", "5500")]
    wide = os.environ | SECRETS | {"BIND_ADDRESS": "0.0.0.0"}
    assert published(yaml.safe_load(docker_compose("config", env=wide).stdout)["services"]["nginx"]) == [
        ("0.0.0.0", "4000")
    ]


def published(service: dict) -> list[tuple[str | None, str]]:
    """(host address, host port) of each published port, from the short syntax (compose 1.29) or the long one (v2)."""
    pairs = []
    for port in service.get("ports", []):
        if isinstance(port, str):
            host_ip, host_port, _ = port.split(":")
            pairs.append((host_ip, host_port))
        else:
            pairs.append((port.get("host_ip"), str(port["published"])))
    return pairs


def mounts(service: dict) -> list[tuple[str, str]]:
    """(source, target) of each volume, from the short syntax (compose 1.29) or the long one (v2)."""
    pairs = []
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, target, *_ = volume.split(":")
            pairs.append((source, target))
        else:
            pairs.append((volume["source"], volume["target"]))
    return pairs


def test_compose_profiles_add_gpu_worker_and_mlflow():
    env = os.environ | SECRETS | {"WORKER_REPLICAS": "0", "MLFLOW_TRACKING_URI": "http://mlflow:5000"}
    config = yaml.safe_load(docker_compose("--profile", "gpu", "--profile", "mlflow", "config", env=env).stdout)
    services = config["services"]
    assert services["worker"]["deploy"]["replicas"] == 0
    devices = services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
    assert services["api"]["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert services["worker"]["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert "mlflow" in services


def test_with_the_mlflow_override_api_and_workers_share_no_volume_and_log_to_the_mlflow_server():
    proc = docker_compose("-f", str(MLFLOW_OVERRIDE), "--profile", "mlflow", "--profile", "gpu", "config")
    assert proc.returncode == 0, proc.stderr
    services = yaml.safe_load(proc.stdout)["services"]
    for name in ("api", "worker", "worker-gpu"):
        service = services[name]
        named = [volume for volume in service.get("volumes", []) if not is_anonymous(volume)]
        assert named == [], f"{name} mounts a volume other containers can see: {named}"
        assert service["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000", name
        assert service["environment"]["TRACKER"] == "mlflow", name
    for name in ("worker", "worker-gpu"):
        assert services[name]["depends_on"]["mlflow"]["condition"] == "service_healthy"
    command = services["mlflow"]["command"]
    assert "--serve-artifacts" in command and "--backend-store-uri=sqlite:////data/mlflow/mlflow.db" in command
    assert mounts(services["mlflow"]) == [("mlflow-data", "/data/mlflow")]


def test_the_pod_security_override_runs_api_and_worker_as_the_kubernetes_pods_do():
    """deploy/compose-pod-security.yml (what `make compose-smoke` runs) against deploy/k8s/base's securityContext."""
    proc = docker_compose("-f", str(POD_SECURITY_OVERRIDE), "config")
    assert proc.returncode == 0, proc.stderr
    services = yaml.safe_load(proc.stdout)["services"]
    for name in ("api", "worker"):
        (deployment,) = [
            d for d in yaml.safe_load_all((K8S_BASE / f"{name}.yaml").read_text()) if d["kind"] == "Deployment"
        ]
        pod = deployment["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        context = container["securityContext"]
        service = services[name]
        assert service["user"] == f"{pod['securityContext']['runAsUser']}:{pod['securityContext']['runAsGroup']}"
        assert service["read_only"] is context["readOnlyRootFilesystem"] is True, name
        assert service["cap_drop"] == context["capabilities"]["drop"] == ["ALL"], name
        assert context["allowPrivilegeEscalation"] is False and service["security_opt"] == ["no-new-privileges"]
        assert service["tmpfs"] == ["/tmp:size=2g"]
        # Every folder the container writes to is a volume or under /tmp, as every one of the pod's is a volume.
        writable = {target for _, target in mounts(service)} | {"/tmp"}
        environment = service["environment"]
        for variable in ("ARTIFACTS_DIR", "HF_HOME", "XDG_CACHE_HOME", "MPLCONFIGDIR"):
            folder = Path(environment[variable])
            assert any(folder == Path(w) or Path(w) in folder.parents for w in writable), (name, variable, folder)
        assert {mount["mountPath"] for mount in container["volumeMounts"]} >= {"/data", "/tmp"}


def test_compose_mlflow_asks_for_the_password_the_service_logs_in_with():
    env = os.environ | SECRETS | {"MLFLOW_TRACKING_PASSWORD": "mlflow-pw", "MLFLOW_FLASK_SERVER_SECRET_KEY": "key"}
    proc = docker_compose("-f", str(MLFLOW_OVERRIDE), "--profile", "mlflow", "--profile", "gpu", "config", env=env)
    services = yaml.safe_load(proc.stdout)["services"]
    server = services["mlflow"]
    assert {"--app-name=basic-auth", "--workers=1"} <= set(server["command"])
    environment = server["environment"]
    assert environment["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    assert (environment["MLFLOW_AUTH_ADMIN_PASSWORD"], environment["MLFLOW_FLASK_SERVER_SECRET_KEY"]) == (
        "mlflow-pw",
        "key",
    )
    # The image holds app/ as /srv/app (Dockerfile): the config the server reads is the committed one.
    config = Path(environment["MLFLOW_AUTH_CONFIG_PATH"])
    assert (ROOT / config.relative_to("/srv")).read_text() == AUTH_CONFIG.read_text()
    for name in ("api", "worker", "worker-gpu"):
        login = services[name]["environment"]
        assert (login["MLFLOW_TRACKING_USERNAME"], login["MLFLOW_TRACKING_PASSWORD"]) == (
            environment["MLFLOW_AUTH_ADMIN_USERNAME"],
            "mlflow-pw",
        ), name


def test_stack_with_mlflow_plans_a_tracking_server_with_served_artifacts_and_points_every_process_at_it(tmp_path):
    stack = Stack(
        StackOptions(replicas=1, workers=1, mlflow=True, port=free_ports(1)[0]), Settings(artifacts_dir=tmp_path)
    )
    stack.plan()
    (server,) = stack.of_role("mlflow")
    assert server.argv[1:4] == ["-m", "mlflow", "server"] and "--serve-artifacts" in server.argv
    store = stack.state_dir / "mlflow"
    assert server.argv[server.argv.index("--backend-store-uri") + 1] == f"sqlite:///{store / 'mlflow.db'}"
    assert server.argv[server.argv.index("--artifacts-destination") + 1] == str(store / "artifacts")
    assert stack.child_environment()["MLFLOW_TRACKING_URI"] == server.url == stack.mlflow_url
    # Behind MLflow's basic auth, on loopback; the children log in as its admin.
    assert server.argv[server.argv.index("--app-name") + 1] == "basic-auth"
    assert server.argv[server.argv.index("--host") + 1] == "127.0.0.1" and server.url.startswith("http://127.0.0.1:")
    assert server.own_env["MLFLOW_AUTH_CONFIG_PATH"] == str(store / AUTH_CONFIG.name)
    assert server.own_env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    login = json.loads((store / CREDENTIALS_NAME).read_text())
    assert stack.child_environment()["MLFLOW_TRACKING_PASSWORD"] == login["password"]
    assert server.own_env["MLFLOW_AUTH_ADMIN_PASSWORD"] == login["password"] and len(login["password"]) >= 24

    plain = Stack(StackOptions(replicas=1, workers=1, port=free_ports(1)[0]), Settings(artifacts_dir=tmp_path / "p"))
    plain.plan()
    assert plain.of_role("mlflow") == [] and plain.mlflow_url == ""


def is_anonymous(volume) -> bool:
    """A volume with no source: created for one container alone."""
    return ":" not in volume if isinstance(volume, str) else not volume.get("source")


def test_committed_nginx_conf_is_the_compose_rendering_of_the_template():
    assert COMPOSE_CONF_PATH.read_text() == render_nginx_conf(compose_layout()), (
        "nginx/nginx.conf is stale: run `python -m app.ops.nginx_config`"
    )


def test_compose_builds_on_public_images_unless_told_to_use_the_local_ones():
    public = yaml.safe_load(docker_compose("config").stdout)["services"]
    assert public["api"]["build"]["args"] == {"BASE_IMAGE": "python:3.11-slim"}
    assert public["nginx"]["build"]["args"] == {"NGINX_IMAGE": "nginx:1.28-alpine"}
    assert public["redis"]["image"] == "redis:7-alpine"

    local = yaml.safe_load(docker_compose("--env-file", str(LOCAL_IMAGES_ENV), "config").stdout)["services"]
    assert local["api"]["build"]["args"] == {"BASE_IMAGE": "localhost/python:3.11-bookworm"}
    assert local["nginx"]["build"]["args"] == {"NGINX_IMAGE": "localhost/nginx:1.22-bookworm"}
    assert local["redis"]["image"] == "localhost/redis:7-bookworm"


def test_every_compose_service_runs_within_unprivileged_rlimits():
    services = yaml.safe_load(docker_compose("config").stdout)["services"]
    for name, service in services.items():
        assert service["ulimits"] == {"nofile": 16384, "nproc": 16384}, name


def test_compose_nginx_conf_leaves_the_resolver_to_the_container_start():
    conf = render_nginx_conf(compose_layout())
    assert "resolver __NAMESERVER__ valid=10s" in conf
    assert "server api:5000 max_fails=3 fail_timeout=10s resolve;" in conf
    assert "zone api 64k;" in conf  # `resolve` needs a shared-memory zone


@pytest.mark.parametrize(
    ("nginx_version", "server_line"),
    [
        ("1.28.0", "server api:5000 max_fails=3 fail_timeout=10s resolve;"),
        ("1.27.3", "server api:5000 max_fails=3 fail_timeout=10s resolve;"),
        # Debian bookworm's nginx: no `resolve`; start.sh reloads nginx when the addresses change instead.
        ("1.22.1", "server api:5000 max_fails=3 fail_timeout=10s;"),
    ],
)
def test_nginx_start_takes_the_resolver_from_resolv_conf(tmp_path, nginx_version, server_line):
    resolv_conf = tmp_path / "resolv.conf"
    resolv_conf.write_text("search dns.podman\nnameserver 10.89.0.1\nnameserver 10.255.255.53\noptions ndots:0\n")
    # A stand-in nginx: answers -v like the real one and records how it was started.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake_nginx = bin_dir / "nginx"
    fake_nginx.write_text(
        f'#!/bin/sh\n[ "$1" = -v ] && {{ echo "nginx version: nginx/{nginx_version}" >&2; exit 0; }}\n'
        f'echo "$@" > {tmp_path / "argv"}\n'
    )
    fake_nginx.chmod(0o755)
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "NGINX_CONF_TEMPLATE": str(COMPOSE_CONF_PATH),
        "NGINX_CONF": str(tmp_path / "nginx.conf"),
        "RESOLV_CONF": str(resolv_conf),
        "EDGE_SECRET": SECRETS["EDGE_SECRET"],
    }
    stderr = tmp_path / "stderr"
    # In its own process group: on old nginx, start.sh leaves a watcher behind that reloads nginx.
    with stderr.open("w") as stderr_file:
        proc = subprocess.Popen([str(NGINX_START)], env=env, stderr=stderr_file, start_new_session=True)
    try:
        assert proc.wait(timeout=30) == 0, stderr.read_text()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
    conf = (tmp_path / "nginx.conf").read_text()
    assert "resolver 10.89.0.1 valid=10s ipv6=off;" in conf  # the engine's DNS, not the host's after it
    assert server_line in conf
    assert f'proxy_set_header X-Edge-Secret "{SECRETS["EDGE_SECRET"]}";' in conf
    assert (tmp_path / "nginx.conf").stat().st_mode & 0o077 == 0  # it holds the secret
    assert (tmp_path / "argv").read_text().split() == ["-c", str(tmp_path / "nginx.conf"), "-g", "daemon", "off;"]


@pytest.mark.parametrize("edge_secret", [None, "", "short", 'quote"breaks-the-config-0123456789'])
def test_nginx_start_refuses_a_missing_or_malformed_edge_secret(tmp_path, edge_secret):
    env = {"PATH": "/usr/bin:/bin", "NGINX_CONF_TEMPLATE": str(COMPOSE_CONF_PATH), "NGINX_CONF": str(tmp_path / "c")}
    env["RESOLV_CONF"] = str(tmp_path / "resolv.conf")
    if edge_secret is not None:
        env["EDGE_SECRET"] = edge_secret
    (tmp_path / "resolv.conf").write_text("nameserver 10.89.0.1\n")
    proc = subprocess.run([str(NGINX_START)], env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1 and "EDGE_SECRET" in proc.stderr and not (tmp_path / "c").exists(), proc.stderr


@pytest.fixture
def native_nginx(tmp_path):
    """The native rendering, pointing at two local ports where nothing listens."""
    listen_port, *api_ports = free_ports(3)
    (tmp_path / "logs").mkdir()
    (tmp_path / "nginx-temp").mkdir()
    layout = native_layout(f"127.0.0.1:{listen_port}", [f"127.0.0.1:{p}" for p in api_ports], tmp_path)
    conf = tmp_path / "nginx.conf"
    conf.write_text(render_nginx_conf(layout))
    argv = [find_binary("nginx"), "-c", str(conf), "-p", str(tmp_path), "-e", str(tmp_path / "logs" / "error.log")]
    return argv, f"http://127.0.0.1:{listen_port}"


def test_native_nginx_conf_passes_nginx_t(native_nginx):
    argv, _ = native_nginx
    proc = subprocess.run([*argv, "-t"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "syntax is ok" in proc.stderr and "test is successful" in proc.stderr


def test_native_nginx_answers_json_errors_when_no_replica_is_up(native_nginx):
    argv, url = native_nginx
    nginx = subprocess.Popen([*argv, "-g", "daemon off;"], start_new_session=True)
    try:
        wait_for_port(url)
        response = requests.get(f"{url}/healthz", timeout=10)
        assert response.status_code == 502
        assert response.headers["Content-Type"] == "application/json"
        assert json.loads(response.text)["error"]["code"] == "bad_gateway"

        too_large = requests.post(f"{url}/predict", data=b"x" * (3 * 1024 * 1024), timeout=10)
        assert too_large.status_code == 413
        assert json.loads(too_large.text)["error"]["code"] == "payload_too_large"
    finally:
        os.killpg(nginx.pid, signal.SIGTERM)
        nginx.wait(timeout=10)


def wait_for_port(url: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            requests.get(url, timeout=1)
            return
        except requests.ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
