"""The Kubernetes manifests (deploy/k8s): each overlay renders with kubectl's kustomize into a namespace-complete set
that is valid against a pinned Kubernetes version's schemas (kubernetes-validate --strict, offline), and keeps the
deployment's rules: probes and disruption budgets on every Deployment and StatefulSet, no hostPath and no volume
shared between pods, non-root pods without a service-account token, bounded emptyDirs, qualified pinned images,
NetworkPolicies that admit only whom they should, no pod started with an empty secret, the Ingress carrying nginx's
limits, a GPU for the gpu overlay's workers, and Redis as the base's own StatefulSet (its rendered configuration
run here by a real redis-server)."""

from __future__ import annotations

import base64
import ipaddress
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from app.api.edge import EDGE_HEADER, came_through_the_edge
from app.config import Settings
from app.ops.mlflow_server import AUTH_CONFIG
from tests.helpers import REPO_ROOT, free_port, wait_for

K8S = REPO_ROOT / "deploy" / "k8s"
OVERLAYS = ("cpu", "gpu")
# The oldest Kubernetes these manifests are checked against (kubernetes-validate's schemas, shipped with it).
KUBERNETES_VERSION = "1.30.0"
# Volumes private to a pod: nothing read-write is shared between pods but Redis and MLflow.
POD_LOCAL_VOLUMES = {"emptyDir", "configMap", "secret", "downwardAPI", "projected"}
# Objects that live in no namespace.
CLUSTER_SCOPED = {"Namespace"}
RELEASE = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["version"]


# What a deployment fills into base/secret.env (the committed example leaves every value empty).
# A base64 value ends in "=": the pods must not take it for an empty one.
SECRETS = {
    "API_TOKEN": "t0ken",
    "REDIS_PASSWORD": "s3cretpw==",
    "MLFLOW_TRACKING_PASSWORD": "mlfl0w-pw",
    "MLFLOW_FLASK_SERVER_SECRET_KEY": "k3y",
}
SERVICE_PODS = {"boolq-api", "boolq-worker", "boolq-gpu-worker"}
# The base's stores: StatefulSets with a volume each, reached only by the service's pods.
REDIS, MLFLOW = "boolq-redis", "boolq-mlflow"
# Which pods need each secret, so refuse to start without it.
NEEDED_BY = {
    "API_TOKEN": SERVICE_PODS,
    "REDIS_PASSWORD": SERVICE_PODS | {REDIS},
    "MLFLOW_TRACKING_PASSWORD": SERVICE_PODS | {MLFLOW},
    "MLFLOW_FLASK_SERVER_SECRET_KEY": {MLFLOW},
}


def copy_tree(folder: Path, secrets: dict[str, str] = SECRETS) -> Path:
    """A copy of deploy/k8s under ``folder`` with base/secret.env holding ``secrets``, as a deployment fills it."""
    tree = folder / "k8s"
    if not tree.exists():
        shutil.copytree(K8S, tree, ignore=shutil.ignore_patterns("secret.env", "edge-headers.env"))
        (tree / "base" / "secret.env").write_text("".join(f"{k}={v}\n" for k, v in secrets.items()))
    return tree


def kustomize(path: Path) -> subprocess.CompletedProcess:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail(
            "kubectl is not installed; the Kubernetes manifests' tests need it (>= 1.27: its built-in kustomize v5)"
        )
    return subprocess.run([kubectl, "kustomize", str(path)], capture_output=True, text=True)


def render(overlay: str, folder: Path) -> str:
    """``kubectl kustomize`` of an overlay, with SECRETS in the Secret."""
    done = kustomize(copy_tree(folder) / "overlays" / overlay)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, list[dict]]:
    folder = tmp_path_factory.mktemp("k8s")
    return {overlay: [d for d in yaml.safe_load_all(render(overlay, folder)) if d] for overlay in OVERLAYS}


# What a deployment fills into components/edge-secret/edge-headers.env (app/config.py: 16 to 256 of A-Za-z0-9_-).
EDGE_SECRET = "3dge-s3cret_0123456789abcdef"
EDGE_CLASS = "boolq-nginx"


def render_with_the_edge_check(folder: Path, edge_secret: str = EDGE_SECRET) -> list[dict]:
    """An overlay of a user's own, the cpu one with components/edge-secret, as docs/cluster.md shows it."""
    tree = copy_tree(folder)
    (tree / "components" / "edge-secret" / "edge-headers.env").write_text(f"{EDGE_HEADER}={edge_secret}\n")
    mine = tree / "overlays" / "edge"
    mine.mkdir(exist_ok=True)
    (mine / "kustomization.yaml").write_text(
        yaml.safe_dump({"resources": ["../cpu"], "components": ["../../components/edge-secret"]})
    )
    done = kustomize(mine)
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d]


def validate(*paths: Path) -> subprocess.CompletedProcess:
    """kubernetes-validate (PyPI; requirements-dev.txt) on manifest files: its schemas ship with it, no network."""
    if shutil.which("kubernetes-validate", path=str(Path(sys.executable).parent)) is None:
        pytest.fail("kubernetes-validate is not installed: pip install -r requirements-dev.txt")
    command = [
        sys.executable,
        "-m",
        "kubernetes_validate",
        "--strict",
        "-k",
        KUBERNETES_VERSION,
        "--quiet",
        *map(str, paths),
    ]
    return subprocess.run(command, capture_output=True, text=True)


@pytest.mark.slow  # kubernetes-validate loads its schemas: seconds per run
def test_every_overlay_is_valid_against_the_pinned_kubernetes_schemas(tmp_path):
    manifests = [tmp_path / f"{overlay}.yaml" for overlay in OVERLAYS]
    for overlay, manifest in zip(OVERLAYS, manifests, strict=True):
        manifest.write_text(render(overlay, tmp_path))
    manifests.append(tmp_path / "edge.yaml")
    manifests[-1].write_text(yaml.safe_dump_all(render_with_the_edge_check(tmp_path)))
    checked = validate(*manifests)
    assert checked.returncode == 0, checked.stdout + checked.stderr


@pytest.mark.slow
def test_strict_validation_rejects_a_misspelt_field(rendered, tmp_path):
    api = next(d for d in rendered["cpu"] if d["kind"] == "Deployment" and d["metadata"]["name"] == "boolq-api")
    api["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"httpGet": {"path": "/readyz", "port": 80}}
    manifest = tmp_path / "typo.yaml"
    manifest.write_text(yaml.safe_dump(api))
    assert validate(manifest).returncode != 0


WORKLOADS = ("Deployment", "StatefulSet")


def pod_specs(documents: list[dict]) -> dict[str, dict]:
    return {d["metadata"]["name"]: d["spec"]["template"]["spec"] for d in documents if d["kind"] in WORKLOADS}


def pod_labels(documents: list[dict]) -> dict[str, dict]:
    """Each workload's pod labels (what Services, budgets and NetworkPolicies select)."""
    return {
        d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"] for d in documents if d["kind"] in WORKLOADS
    }


def images(documents: list[dict]) -> dict[str, str]:
    """Each workload's image (one per pod: init containers run the same one)."""
    named = {}
    for name, pod in pod_specs(documents).items():
        [image] = {c["image"] for c in pod["containers"] + pod.get("initContainers", [])}
        named[name] = image
    return named


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_overlay_creates_its_namespace_and_puts_every_object_in_it(rendered, overlay):
    [namespace] = [d["metadata"]["name"] for d in rendered[overlay] if d["kind"] == "Namespace"]
    # kustomize orders the Namespace first, so a fresh `kubectl apply -k` creates it before what lives in it.
    assert rendered[overlay][0]["kind"] == "Namespace"
    placed = {(d["kind"], d["metadata"]["name"]): d["metadata"].get("namespace") for d in rendered[overlay]}
    assert {key: ns for key, ns in placed.items() if key[0] not in CLUSTER_SCOPED and ns != namespace} == {}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_images_are_qualified_and_pinned_to_the_release(rendered, overlay):
    for name, image in images(rendered[overlay]).items():
        registry, slash, rest = image.partition("/")
        named = "." in registry or ":" in registry or registry == "localhost"
        assert slash and named, f"{name}: {image} names no registry"
        repository, _, tag = rest.rpartition(":")
        if repository.rpartition("/")[2].startswith("boolq-service"):
            assert tag == RELEASE, f"{name}: {image} is not pinned to version {RELEASE}"
        else:  # another project's image: a full version (major.minor.patch), never a moving tag such as 7-alpine
            assert re.fullmatch(r"\d+\.\d+\.\d+(-[a-z0-9.]+)?", tag) or "@sha256:" in image, f"{name}: {image}"


def test_overriding_the_cpu_image_keeps_the_gpu_workers_own_image(rendered, tmp_path):
    cpu_image = images(rendered["gpu"])["boolq-worker"].rpartition(":")[0]
    gpu_image = images(rendered["gpu"])["boolq-gpu-worker"]
    # An overlay of a user's own over ours, as docs/cluster.md shows it for the CPU image.
    mine = copy_tree(tmp_path) / "overlays" / "mine"
    mine.mkdir()
    (mine / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "resources": ["../gpu"],
                "images": [{"name": cpu_image, "newName": "registry.test/team/boolq-service", "newTag": "7"}],
            }
        )
    )
    done = kustomize(mine)
    assert done.returncode == 0, done.stderr
    overridden = images([d for d in yaml.safe_load_all(done.stdout) if d])
    assert overridden["boolq-worker"] == "registry.test/team/boolq-service:7"
    assert overridden["boolq-gpu-worker"] == gpu_image


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_share_no_volume_run_as_non_root_and_the_api_has_its_probes(rendered, overlay):
    pods = pod_specs(rendered[overlay])
    assert "hostPath" not in yaml.safe_dump(rendered[overlay])
    for name, pod in pods.items():
        for volume in pod.get("volumes", []):
            assert set(volume) - {"name"} <= POD_LOCAL_VOLUMES, f"{name}: volume {volume} may be shared between pods"
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        for container in pod["containers"] + pod.get("initContainers", []):
            assert container["securityContext"]["allowPrivilegeEscalation"] is False, name
    [api] = pods["boolq-api"]["containers"]
    assert api["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert api["livenessProbe"]["httpGet"]["path"] == "/healthz"


def selects(selector: dict, labels: dict) -> bool:
    assert not selector.get("matchExpressions"), "the tests read matchLabels only"
    return selector.get("matchLabels", {}).items() <= labels.items()


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_workload_has_startup_and_liveness_probes_and_a_disruption_budget(rendered, overlay):
    budgets = [d["spec"] for d in rendered[overlay] if d["kind"] == "PodDisruptionBudget"]
    for deployment in (d for d in rendered[overlay] if d["kind"] in WORKLOADS):
        name, template = deployment["metadata"]["name"], deployment["spec"]["template"]
        for container in template["spec"]["containers"]:
            assert {"startupProbe", "livenessProbe"} <= set(container), name
        [budget] = [b for b in budgets if selects(b["selector"], template["metadata"]["labels"])]
        # A drain must be able to evict one pod, and must leave an API replica serving.
        assert budget.get("maxUnavailable", 0) >= 1 or budget["minAvailable"] < deployment["spec"]["replicas"], name
        if name == "boolq-api":
            assert budget["minAvailable"] >= 1


INGRESS_CONTROLLER = (
    "ingress-nginx",
    {"app.kubernetes.io/name": "ingress-nginx", "app.kubernetes.io/component": "controller"},
)
STRANGERS = {
    "a pod in the namespace": ("boolq", {"app.kubernetes.io/name": "debug"}),
    "a pod in the namespace named like the controller": ("boolq", INGRESS_CONTROLLER[1]),
    "a pod elsewhere": ("default", {"app.kubernetes.io/name": "boolq-service"}),
    "a pod labelled as the service's, of no component": ("boolq", {"app.kubernetes.io/name": "boolq-service"}),
    "a worker's twin in another namespace": (
        "default",
        {"app.kubernetes.io/name": "boolq-service", "app.kubernetes.io/component": "worker"},
    ),
}


def admits(documents: list[dict], source: tuple[str, dict], target: tuple[str, dict]) -> bool:
    """Whether the NetworkPolicies let ``source`` (namespace, pod labels) open a connection to ``target``."""
    (source_ns, source_labels), (target_ns, target_labels) = source, target
    policies = [
        d["spec"]
        for d in documents
        if d["kind"] == "NetworkPolicy"
        and d["metadata"]["namespace"] == target_ns
        and selects(d["spec"]["podSelector"], target_labels)
        and "Ingress" in d["spec"]["policyTypes"]
    ]

    def matches(peer: dict) -> bool:
        namespace_labels = {"kubernetes.io/metadata.name": source_ns}
        in_namespace = (
            selects(peer["namespaceSelector"], namespace_labels)
            if "namespaceSelector" in peer
            else source_ns == target_ns
        )
        return in_namespace and selects(peer.get("podSelector", {}), source_labels)

    return not policies or any(
        any(matches(peer) for peer in rule.get("from", [])) for policy in policies for rule in policy.get("ingress", [])
    )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies_let_only_the_service_reach_redis_and_mlflow_and_only_the_ingress_reach_the_api(
    rendered, overlay
):
    documents = rendered[overlay]
    [namespace] = [d["metadata"]["name"] for d in documents if d["kind"] == "Namespace"]
    workloads = {name: (namespace, labels) for name, labels in pod_labels(documents).items()}
    stores = {name: workloads.pop(name) for name in (REDIS, MLFLOW)}
    pods = workloads  # the Deployments: the API and the workers
    for name, pod in pods.items():
        for store_name, store in stores.items():
            assert admits(documents, pod, store), f"{name} cannot reach {store_name}"
            assert not admits(documents, INGRESS_CONTROLLER, store)
        assert admits(documents, INGRESS_CONTROLLER, pod) is (name == "boolq-api"), name
        for other in pods:
            assert not admits(documents, pods[other], pod), f"{other} reaches {name}"
    for store_name, store in stores.items():
        for other_name, other in stores.items():
            assert not admits(documents, other, store), f"{other_name} reaches {store_name}"
        for name, pod in pods.items():
            assert not admits(documents, store, pod), f"{store_name} reaches {name}"
    for stranger, source in STRANGERS.items():
        for name, target in (pods | stores).items():
            assert not admits(documents, source, target), f"{stranger} reaches {name}"


def gibibytes(quantity: str) -> float:
    number, unit = re.fullmatch(r"(\d+)(Mi|Gi|Ti)", quantity).groups()
    return int(number) * {"Mi": 1 / 1024, "Gi": 1, "Ti": 1024}[unit]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_pod_mounts_a_service_account_token(rendered, overlay):
    for name, pod in pod_specs(rendered[overlay]).items():
        assert pod.get("automountServiceAccountToken") is False, name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_empty_dir_is_bounded_and_the_pod_asks_for_the_disk_they_may_fill(rendered, overlay):
    for name, pod in pod_specs(rendered[overlay]).items():
        empty_dirs = [v["emptyDir"] for v in pod.get("volumes", []) if "emptyDir" in v]
        assert all("sizeLimit" in e for e in empty_dirs), f"{name}: an emptyDir without sizeLimit"
        on_disk = sum(gibibytes(e["sizeLimit"]) for e in empty_dirs if e.get("medium") != "Memory")
        asked = sum(gibibytes(c["resources"]["requests"].get("ephemeral-storage", "0Gi")) for c in pod["containers"])
        # Every pod writes something outside its volumes (its log at least): it asks for that disk too.
        assert asked >= on_disk and asked > 0, name


def test_the_api_believes_forwarded_addresses_from_the_pod_network_only(rendered):
    [settings] = [d["data"] for d in rendered["cpu"] if d["kind"] == "ConfigMap"]
    networks = [ipaddress.ip_network(n) for n in settings["TRUSTED_PROXIES"].split(",")]
    assert networks and all(n.is_private and not n.is_loopback for n in networks)


def test_only_the_gpu_overlay_has_a_worker_asking_for_a_gpu(rendered):
    def gpus(documents):
        return {
            name: container["resources"].get("limits", {}).get("nvidia.com/gpu")
            for name, pod in pod_specs(documents).items()
            for container in pod["containers"]
        }

    assert set(gpus(rendered["cpu"]).values()) == {None}
    assert gpus(rendered["gpu"]) == {
        "boolq-api": None,
        "boolq-worker": None,
        "boolq-gpu-worker": 1,
        MLFLOW: None,
        REDIS: None,
    }
    env = {e["name"]: e["value"] for e in pod_specs(rendered["gpu"])["boolq-worker"]["containers"][0]["env"]}
    assert env["DEVICE"] == "cpu"  # the base's worker stays of the cpu class beside the GPU workers


def test_the_ingress_carries_the_limits_of_the_nginx_template(rendered):
    template = (REPO_ROOT / "nginx" / "nginx.conf.template").read_text()
    ingresses = {d["metadata"]["name"]: d["metadata"]["annotations"] for d in rendered["cpu"] if d["kind"] == "Ingress"}
    prefix = "nginx.ingress.kubernetes.io/"

    def nginx(directive: str, after: str = "") -> str:
        return re.search(rf"{directive}\s+(\S+?)s?;", template[template.index(after) :]).group(1)

    assert {a[prefix + "proxy-body-size"] for a in ingresses.values()} == {nginx("client_max_body_size")}
    assert ingresses["boolq-api"][prefix + "proxy-read-timeout"] == nginx("proxy_read_timeout")
    assert ingresses["boolq-train"][prefix + "proxy-read-timeout"] == nginx("proxy_read_timeout", "location = /train")
    assert ingresses["boolq-predict"][prefix + "proxy-read-timeout"] == nginx(
        "proxy_read_timeout", "location = /predict"
    )
    # Every rate-limited location of the template (/train, /sweeps, /predict), on the Ingress serving that path.
    serving = {
        path["path"]: d["metadata"]["annotations"]
        for d in rendered["cpu"]
        if d["kind"] == "Ingress"
        for rule in d["spec"]["rules"]
        for path in rule["http"]["paths"]
        if path["pathType"] == "Exact"
    }
    limited = re.findall(r"location = (\S+) \{\s+limit_req zone=(\w+) burst=(\d+)", template)
    assert {path for path, _, _ in limited} >= {"/train", "/sweeps", "/predict"}
    for path, zone, burst in limited:
        rate = re.search(rf"zone={zone}:\S+ rate=(\d+)r/s", template).group(1)
        assert path in serving, f"{path} is rate limited in nginx, not at the Ingress"
        assert serving[path][prefix + "limit-rps"] == rate, path
        assert int(rate) * int(serving[path][prefix + "limit-burst-multiplier"]) == int(burst), path
    assert {a[prefix + "limit-connections"] for a in ingresses.values()} == {nginx("limit_conn per_client")}


def container_env(documents: list[dict], container: dict) -> dict[str, str]:
    """The environment a container gets from the rendered ConfigMaps and Secrets, as the kubelet builds it (without
    expanding ``$(VAR)`` references)."""
    # kustomize has already rewritten the references to the generated (hash-suffixed) names.
    values = {
        ("secretRef" if d["kind"] == "Secret" else "configMapRef", d["metadata"]["name"]): {
            key: base64.b64decode(value).decode() if d["kind"] == "Secret" else value
            for key, value in d["data"].items()
        }
        for d in documents
        if d["kind"] in ("ConfigMap", "Secret")
    }
    env = {"PATH": "/usr/bin:/bin"}
    for source in container.get("envFrom", []):
        [(kind, ref)] = source.items()
        env |= values[kind, ref["name"]]
    for entry in container.get("env", []):
        if "value" in entry:
            env[entry["name"]] = entry["value"]
        else:
            [(kind, ref)] = entry["valueFrom"].items()
            env[entry["name"]] = values[kind.replace("KeyRef", "Ref"), ref["name"]][ref["key"]]
    return env


def start_pod(documents: list[dict], deployment: str) -> subprocess.CompletedProcess | None:
    """Run a Deployment's init containers here, in order, with the env the rendered ConfigMap and Secret give them:
    the first that fails, or None when all pass (the kubelet would then start the pod's containers)."""
    for container in pod_specs(documents)[deployment].get("initContainers", []):
        env = container_env(documents, container)
        done = subprocess.run(container["command"], env=env, capture_output=True, text=True, timeout=10)
        if done.returncode != 0:
            return done
    return None


@pytest.mark.parametrize("empty", NEEDED_BY)
def test_no_pod_starts_with_an_empty_secret(tmp_path, empty):
    tree = copy_tree(tmp_path, SECRETS | {empty: ""})
    for overlay in OVERLAYS:
        done = kustomize(tree / "overlays" / overlay)
        assert done.returncode == 0, done.stderr
        documents = [d for d in yaml.safe_load_all(done.stdout) if d]
        for deployment in pod_specs(documents):
            refused = start_pod(documents, deployment)
            if deployment not in NEEDED_BY[empty]:
                assert refused is None, f"{overlay}: {deployment} needs no {empty} but refuses to start"
                continue
            assert refused is not None, f"{overlay}: {deployment} starts with an empty {empty}"
            assert f"{empty} is empty" in refused.stderr


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_starts_with_its_secret_filled_in(rendered, overlay):
    for deployment in pod_specs(rendered[overlay]):
        assert start_pod(rendered[overlay], deployment) is None, deployment


def test_no_secret_value_is_committed():
    example = (K8S / "base" / "secret.env.example").read_text()
    values = dict(line.split("=", 1) for line in example.splitlines() if line and not line.startswith("#"))
    assert set(values) == set(NEEDED_BY) and set(values.values()) == {""}
    ignored = subprocess.run(["git", "check-ignore", "-q", str(K8S / "base" / "secret.env")], cwd=REPO_ROOT)
    assert ignored.returncode == 0, "deploy/k8s/base/secret.env must be git-ignored"


def test_mlflow_asks_for_the_password_the_service_pods_log_in_with_and_allows_the_name_they_use(rendered):
    documents = rendered["cpu"]
    [server] = [d for d in documents if d["kind"] == "StatefulSet" and d["metadata"]["name"] == MLFLOW]
    [container] = server["spec"]["template"]["spec"]["containers"]
    assert {"--app-name=basic-auth", "--workers=1", "--serve-artifacts"} <= set(container["command"])
    env = {e["name"]: e.get("value") or e["valueFrom"] for e in container["env"]}
    assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    # The image holds app/ as /srv/app (Dockerfile): the auth config the server reads is the committed one.
    config = Path(env["MLFLOW_AUTH_CONFIG_PATH"])
    assert (REPO_ROOT / config.relative_to("/srv")).read_text() == AUTH_CONFIG.read_text()
    # The admin is made from the Secret and ConfigMap keys the API and worker pods get as MLflow's client variables.
    [settings] = [d for d in documents if d["kind"] == "ConfigMap"]
    [secret] = [d for d in documents if d["kind"] == "Secret"]
    password, username = env["MLFLOW_AUTH_ADMIN_PASSWORD"]["secretKeyRef"], env["MLFLOW_AUTH_ADMIN_USERNAME"]
    assert (password["name"], password["key"]) == (secret["metadata"]["name"], "MLFLOW_TRACKING_PASSWORD")
    username = username["configMapKeyRef"]
    assert (username["name"], username["key"]) == (settings["metadata"]["name"], "MLFLOW_TRACKING_USERNAME")
    for name in SERVICE_PODS & set(pod_specs(documents)):
        [pod] = pod_specs(documents)[name]["containers"]
        sources = {ref["name"] for source in pod["envFrom"] for ref in source.values()}
        assert {secret["metadata"]["name"], settings["metadata"]["name"]} <= sources, name
    # The pods' MLFLOW_TRACKING_URI names a host MLflow allows and a port of its Service.
    uri = urlsplit(settings["data"]["MLFLOW_TRACKING_URI"])
    allowed = next(a for a in container["command"] if a.startswith("--allowed-hosts=")).split("=", 1)[1].split(",")
    assert uri.netloc in allowed
    [service] = [d for d in documents if d["kind"] == "Service" and d["metadata"]["name"] == uri.hostname]
    assert selects({"matchLabels": service["spec"]["selector"]}, server["spec"]["template"]["metadata"]["labels"])
    assert uri.port in {port["port"] for port in service["spec"]["ports"]}


def redis_config(documents: list[dict]) -> dict[str, str]:
    """The settings in the Redis container's here-document (``redis-server -`` reads them on stdin)."""
    [container] = pod_specs(documents)[REDIS]["containers"]
    script = container["command"][-1]
    document = script[script.index("<<EOF\n") + len("<<EOF\n") : script.rindex("\nEOF")]
    return dict(line.split(" ", 1) for line in document.splitlines())


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_redis_is_the_bases_own_stateful_set_with_a_volume_for_its_append_only_file(rendered, overlay):
    documents = rendered[overlay]
    [redis] = [d for d in documents if d["kind"] == "StatefulSet" and d["metadata"]["name"] == REDIS]
    pod = redis["spec"]["template"]["spec"]
    [container] = pod["containers"]
    # Its data directory is the volume claimed per pod, not an emptyDir: queued jobs survive a rescheduled pod.
    [claim] = redis["spec"]["volumeClaimTemplates"]
    assert gibibytes(claim["spec"]["resources"]["requests"]["storage"]) >= 2
    [mount] = [m for m in container["volumeMounts"] if m["name"] == claim["metadata"]["name"]]
    config = redis_config(documents)
    assert config["dir"] == mount["mountPath"]
    assert (config["appendonly"], config["maxmemory-policy"]) == ("yes", "noeviction")
    # The stack's budget (REDIS_MAXMEMORY_MB), under the container's memory limit with room for a rewrite's fork.
    budget_mb = Settings.model_fields["redis_maxmemory_mb"].default
    assert config["maxmemory"] == f"{budget_mb // 1024}gb"
    assert gibibytes(container["resources"]["limits"]["memory"]) >= 1.5 * budget_mb / 1024
    # Non-root with a read-only root: it writes nothing but its volume.
    assert pod["securityContext"]["runAsUser"] != 0 and pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert {"startupProbe", "livenessProbe", "readinessProbe"} <= set(container)
    # Its own headless Service names each pod (serviceName); its PDB lets a drain evict it.
    services = {d["metadata"]["name"]: d["spec"] for d in documents if d["kind"] == "Service"}
    assert services[redis["spec"]["serviceName"]]["clusterIP"] == "None"
    labels = redis["spec"]["template"]["metadata"]["labels"]
    assert [d for d in documents if d["kind"] == "PodDisruptionBudget" and selects(d["spec"]["selector"], labels)]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_redis_url_of_every_pod_names_the_redis_service_and_the_password_redis_asks(rendered, overlay):
    documents = rendered[overlay]
    [settings] = [d["data"] for d in documents if d["kind"] == "ConfigMap"]
    [secret] = [d["metadata"]["name"] for d in documents if d["kind"] == "Secret"]
    assert settings["REDIS_SENTINELS"] == ""  # with Sentinels the URL's host would be ignored
    [redis] = [d for d in documents if d["kind"] == "StatefulSet" and d["metadata"]["name"] == REDIS]
    services = {d["metadata"]["name"]: d["spec"] for d in documents if d["kind"] == "Service"}
    [redis_container] = redis["spec"]["template"]["spec"]["containers"]
    # Redis's requirepass is the container's REDIS_PASSWORD, which is the Secret's REDIS_PASSWORD.
    assert redis_config(documents)["requirepass"] == '"$REDIS_PASSWORD"'
    [password] = [e["valueFrom"]["secretKeyRef"] for e in redis_container["env"] if e["name"] == "REDIS_PASSWORD"]
    assert (password["name"], password["key"]) == (secret, "REDIS_PASSWORD")
    users = [name for name in SERVICE_PODS if name in pod_specs(documents)]
    assert users
    for name in users:
        [container] = pod_specs(documents)[name]["containers"]
        env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
        url = urlsplit(env["REDIS_URL"])
        # $(REDIS_PASSWORD) is expanded by the kubelet from the pod's envFrom of the same Secret.
        assert url.password == "$(REDIS_PASSWORD)", name
        assert {"secretRef": {"name": secret}} in container["envFrom"], name
        service = services[url.hostname]
        assert selects({"matchLabels": service["selector"]}, redis["spec"]["template"]["metadata"]["labels"]), name
        assert service.get("clusterIP") != "None", name  # the ClusterIP Service, which follows the pod
        [port] = [p for p in service["ports"] if p["port"] == url.port]
        assert port["targetPort"] in {p["name"] for p in redis_container["ports"]}, name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_nothing_is_left_of_the_bitnami_chart(rendered, overlay):
    assert "bitnami" not in yaml.safe_dump_all(rendered[overlay]).lower()


@pytest.mark.slow  # starts a redis-server
def test_the_rendered_redis_asks_for_the_secrets_password_and_keeps_it_off_its_command_line(rendered, tmp_path):
    """The Redis container's command, run here by a real redis-server (Debian's; the image's 7.4 reads the same
    settings) with the rendered Secret's password: only the mount path and the port are changed."""
    from redis import Redis
    from redis.exceptions import AuthenticationError

    documents = rendered["cpu"]
    [container] = pod_specs(documents)[REDIS]["containers"]
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed (Debian package redis-server)")
    [mount] = container["volumeMounts"]
    port = free_port()
    script = container["command"][-1].replace(f"dir {mount['mountPath']}\n", f"dir {tmp_path}\n")
    script = script.replace("port 6379\n", f"port {port}\n").replace("bind * -::*\n", "bind 127.0.0.1\n")
    password = SECRETS["REDIS_PASSWORD"]
    env = {"PATH": "/usr/bin:/bin", "REDIS_PASSWORD": password}
    server = subprocess.Popen([*container["command"][:-1], script], env=env, stdout=subprocess.DEVNULL)
    try:
        client = Redis(port=port, password=password)
        wait_for(lambda: server.poll() is not None or answers(client), 20, "the rendered redis to answer")
        assert server.poll() is None, "the rendered redis exited"
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
        with pytest.raises(AuthenticationError):
            Redis(port=port).ping()
        # The probe passes with the container's REDISCLI_AUTH, and fails without it.
        probe = [*container["livenessProbe"]["exec"]["command"][:-1]]
        check = container["livenessProbe"]["exec"]["command"][-1].replace("redis-cli", f"redis-cli -p {port}")
        assert subprocess.run([*probe, check], env=env | {"REDISCLI_AUTH": password}).returncode == 0
        assert subprocess.run([*probe, check], env=env).returncode != 0
        # exec: the shell became redis-server, whose command line holds no password.
        assert password not in Path(f"/proc/{server.pid}/cmdline").read_text()
        assert password not in yaml.safe_dump(pod_specs(documents)[REDIS])
        server.terminate()  # the kubelet's SIGTERM reaches redis-server itself, which saves and exits
        assert server.wait(10) == 0
        assert list(tmp_path.glob("appendonlydir/*.aof"))
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def answers(client) -> bool:
    from redis.exceptions import ConnectionError as RedisConnectionError

    try:
        return client.ping()
    except RedisConnectionError:
        return False


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_by_default_the_api_checks_no_edge_secret_and_the_network_policy_is_its_guard(rendered, overlay):
    documents = rendered[overlay]
    [api] = pod_specs(documents)["boolq-api"]["containers"]
    # Pinned empty: ingress-nginx sends no X-Edge-Secret, so a value from secret.env would 403 every request.
    assert [e for e in api["env"] if e["name"] == "EDGE_SECRET"] == [{"name": "EDGE_SECRET", "value": ""}]
    # ... and the guard is the NetworkPolicy: only the controller's pods reach the replicas.
    api_pod = ("boolq", pod_labels(documents)["boolq-api"])
    assert admits(documents, INGRESS_CONTROLLER, api_pod)
    assert not any(admits(documents, stranger, api_pod) for stranger in STRANGERS.values())
    # No snippet: ingress-nginx refuses them by default (they can read any Secret the controller can).
    annotations = [d["metadata"].get("annotations", {}) for d in documents if d["kind"] == "Ingress"]
    assert not [key for a in annotations for key in a if "snippet" in key]


def test_with_the_edge_component_the_controller_sends_the_secret_the_api_checks(tmp_path):
    documents = render_with_the_edge_check(tmp_path)
    [headers] = [d for d in documents if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "boolq-edge-headers"]
    # The name the controller's proxy-set-headers gives (namespace/name): fixed, in the service's namespace.
    assert headers["metadata"]["namespace"] == "boolq" and headers["data"] == {EDGE_HEADER: EDGE_SECRET}
    # nginx sends each key as a request header; the replica reads it as WSGI's HTTP_X_EDGE_SECRET.
    [api] = pod_specs(documents)["boolq-api"]["containers"]
    secret = Settings(edge_secret=container_env(documents, api)["EDGE_SECRET"]).edge_secret
    assert secret == EDGE_SECRET
    [(header, value)] = headers["data"].items()
    assert came_through_the_edge({"HTTP_" + header.upper().replace("-", "_"): value}, secret)
    # Every Ingress goes to the service's own controller: no other application's backend gets the header.
    assert {d["spec"]["ingressClassName"] for d in documents if d["kind"] == "Ingress"} == {EDGE_CLASS}
    assert start_pod(documents, "boolq-api") is None


@pytest.mark.parametrize("edge_secret", ["", "too-short"])
def test_with_the_edge_component_the_api_refuses_to_start_without_a_valid_secret(tmp_path, edge_secret):
    refused = start_pod(render_with_the_edge_check(tmp_path, edge_secret), "boolq-api")
    assert refused is not None and "X-Edge-Secret must be 16 to 256" in refused.stderr
