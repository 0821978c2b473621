#!/usr/bin/env bash
# `make compose-smoke`: build the images and run the compose stack for real, then talk to it through nginx on
# localhost:4000 only. Steps: build → up (3 API replicas, 1 worker, each with the Kubernetes pods' security
# context: deploy/compose-pod-security.yml) → that context checked inside each of them → /healthz from every
# replica → a tiny minilm job with POST /train?wait=true → /predict with its model → down -v leaves nothing behind.
# Each step is printed with its time; exit 0 only when all passed; the stack is taken down whatever happens.
#
# Engine: Docker when a Docker daemon answers, else podman (rootful) through a `podman system service`
# socket of its own, with deploy/podman/containers.conf. Without a reachable registry the base images and the
# wheelhouse come from deploy/local-images.sh (LOCAL_IMAGES=auto|1|0). Bounded by SMOKE_TIMEOUT (1800 s): about
# 3.5-6 minutes with cached images, 16.5 from nothing (the application image alone 10) on 2 busy cores.
set -Eeuo pipefail
cd "$(dirname "$0")/.."

SMOKE_TIMEOUT=${SMOKE_TIMEOUT:-1800}
LOCAL_IMAGES=${LOCAL_IMAGES:-auto}
export COMPOSE_PROJECT_NAME=${COMPOSE_PROJECT_NAME:-boolq-smoke}
export WORKER_REPLICAS=1 HF_HUB_OFFLINE=1 DEFAULT_MODEL=minilm TRACKER=none
# compose refuses to start without these: fresh ones for this run unless given.
API_TOKEN=${API_TOKEN:-$(python3 -c 'import secrets; print(secrets.token_hex(16))')}
REDIS_PASSWORD=${REDIS_PASSWORD:-$(python3 -c 'import secrets; print(secrets.token_hex(16))')}
EDGE_SECRET=${EDGE_SECRET:-$(python3 -c 'import secrets; print(secrets.token_hex(16))')}
export API_TOKEN REDIS_PASSWORD EDGE_SECRET
URL=http://localhost:4000
TINY_JOB='{"model": "minilm", "epochs": 1, "batch_size": 16, "train_limit": 64, "eval_limit": 32, "max_length": 64}'
QUESTION='{"question": "is the sky blue", "passage": "The sky appears blue because of Rayleigh scattering."}'

started=$SECONDS
ENGINE=""
# The API replicas and the worker run as the Kubernetes pods do: uid 10001, read-only root, no capabilities.
compose_args=(-f docker-compose.yml -f deploy/compose-pod-security.yml)
service_pid=""
health_pid=""
run_dir=""

step() { printf '\n== [%4ds] %s\n' $((SECONDS - started)) "$*"; }
pass() { printf '   ok (%s)\n' "$*"; }
fail() {
  printf '   FAILED: %s\n' "$*" >&2
  exit 1
}
left() { echo $((SMOKE_TIMEOUT - (SECONDS - started))); }
compose() { timeout "$(left)" docker-compose "${compose_args[@]}" "$@"; }
json() { python3 -c "import json, sys; data = json.load(sys.stdin); print($1)"; }

cleanup() {
  local status=$?
  trap - EXIT
  if [ -n "$ENGINE" ]; then
    if [ "$status" != 0 ]; then
      step "logs of the failed run (last 40 lines per service)"
      docker-compose "${compose_args[@]}" ps || true
      docker-compose "${compose_args[@]}" logs --no-color --tail=40 2>&1 || true
      [ -f "$run_dir/podman-service.log" ] && tail -n 40 "$run_dir/podman-service.log"
    fi
    step "docker-compose down -v"
    docker-compose "${compose_args[@]}" down -v --remove-orphans || status=1
    local left_over
    left_over=$("$ENGINE" ps -a -q --filter "label=com.docker.compose.project=$COMPOSE_PROJECT_NAME")
    left_over+=$("$ENGINE" volume ls -q --filter "label=com.docker.compose.project=$COMPOSE_PROJECT_NAME")
    if [ -n "$left_over" ]; then
      printf '   FAILED: containers or volumes left: %s\n' "$left_over" >&2
      status=1
    else
      pass "no container or volume of $COMPOSE_PROJECT_NAME left"
    fi
  fi
  [ -n "$health_pid" ] && kill "$health_pid" 2>/dev/null
  [ -n "$service_pid" ] && kill "$service_pid" 2>/dev/null && wait "$service_pid" 2>/dev/null
  [ -n "$run_dir" ] && rm -rf "$run_dir"
  if [ "$status" = 0 ]; then
    printf '\ncompose-smoke: all steps passed in %d s\n' $((SECONDS - started))
  else
    printf '\ncompose-smoke: FAILED after %d s\n' $((SECONDS - started)) >&2
  fi
  exit "$status"
}
trap cleanup EXIT
trap 'printf "   FAILED: %s\n" "$BASH_COMMAND" >&2' ERR

# podman runs healthchecks from systemd timers; without systemd nothing runs them and `depends_on:
# service_healthy` would wait forever, so run them here, as the timers would.
run_podman_healthchecks() {
  while sleep 5; do
    podman ps -q --filter "label=com.docker.compose.project=$COMPOSE_PROJECT_NAME" \
      | xargs -r -n1 podman healthcheck run >/dev/null 2>&1 || true
  done
}

step "engine"
command -v docker-compose >/dev/null || fail "docker-compose is missing (apt-get install docker-compose)"
run_dir=$(mktemp -d)
if command -v docker >/dev/null && docker info >/dev/null 2>&1; then
  ENGINE=docker
  pass "Docker daemon"
else
  command -v podman >/dev/null || fail "neither a Docker daemon nor podman (apt-get install podman runc)"
  ENGINE=podman
  export CONTAINERS_CONF=$PWD/deploy/podman/containers.conf
  # Its log (systemd complaints on every container with a healthcheck, when there is no systemd) is shown
  # only when a step fails.
  podman system service --time=0 "unix://$run_dir/podman.sock" >"$run_dir/podman-service.log" 2>&1 &
  service_pid=$!
  export DOCKER_HOST=unix://$run_dir/podman.sock
  for _ in $(seq 50); do [ -S "$run_dir/podman.sock" ] && break; sleep 0.2; done
  [ -S "$run_dir/podman.sock" ] || fail "podman system service did not open its socket"
  healthchecks_by=systemd
  if [ ! -d /run/systemd/system ]; then
    run_podman_healthchecks &
    health_pid=$!
    healthchecks_by="this script"
  fi
  pass "$(podman --version), DOCKER_HOST=$DOCKER_HOST, healthchecks run by $healthchecks_by"
fi

step "base images"
if [ "$LOCAL_IMAGES" = auto ]; then
  if timeout 60 "$ENGINE" pull -q docker.io/library/python:3.11-slim >/dev/null 2>&1; then
    LOCAL_IMAGES=0
  else
    LOCAL_IMAGES=1
  fi
fi
if [ "$LOCAL_IMAGES" = 1 ]; then
  echo "   no registry: local base images and wheelhouse (deploy/local-images.sh)"
  ENGINE=$ENGINE timeout "$(left)" deploy/local-images.sh
  compose_args+=(--env-file deploy/local-images.env)
  pass "local base images, $(find wheelhouse -name '*.whl' | wc -l) wheels"
else
  pass "public images from the registry"
fi

step "docker-compose build"
t0=$SECONDS
compose build
pass "images built in $((SECONDS - t0)) s"

step "docker-compose up -d (3 API replicas, 1 worker, the pods' security context)"
t0=$SECONDS
compose up -d
for _ in $(seq 60); do
  curl -fsS -o /dev/null "$URL/healthz" 2>/dev/null && break
  sleep 2
done
curl -fsS -o /dev/null "$URL/healthz" || fail "nginx does not answer $URL/healthz"
pass "stack answering on $URL after $((SECONDS - t0)) s"

step "the pods' security context inside each API replica and worker"
# What the process itself sees: its uid, its capabilities (bounding set included), no_new_privs, a root filesystem
# it cannot write, and the folders it must write to.
PROBE='
import errno, os, pathlib, tempfile
status = dict(line.split(":", 1) for line in pathlib.Path("/proc/self/status").read_text().splitlines())
try:
    open("/srv/.probe", "w")
    root = "writable"
except OSError as exc:
    root = errno.errorcode[exc.errno]
for folder in ("/tmp", os.environ["ARTIFACTS_DIR"], os.environ["HF_HOME"], os.environ["XDG_CACHE_HOME"]):
    os.makedirs(folder, exist_ok=True)
    tempfile.TemporaryFile(dir=folder).close()
caps = ",".join("%s=%x" % (name, int(status[name], 16)) for name in ("CapEff", "CapPrm", "CapBnd"))
ids = "uid=%s gid=%s" % (status["Uid"].split()[1], status["Gid"].split()[1])
print("%s %s no_new_privs=%s root=%s" % (ids, caps, status["NoNewPrivs"].strip(), root))
'
EXPECTED='uid=10001 gid=10001 CapEff=0,CapPrm=0,CapBnd=0 no_new_privs=1 root=EROFS'
containers=$(compose ps -q api worker)
[ "$(echo "$containers" | wc -l)" = 4 ] || fail "expected 3 API containers and 1 worker, got: $(echo $containers)"
for container in $containers; do
  seen=$("$ENGINE" exec "$container" python -c "$PROBE" 2>&1) || fail "probe in $container: $seen"
  [ "$seen" = "$EXPECTED" ] || fail "container $container: $seen (expected $EXPECTED)"
done
pass "4 containers: $EXPECTED; /tmp, the volumes and the caches writable"

step "GET /healthz through nginx, answered by all 3 replicas (X-Replica)"
replicas=""
for _ in $(seq 60); do
  replica=$(curl -fsS -D - -o /dev/null "$URL/healthz" | tr -d '\r' \
    | sed -n 's/^[Xx]-[Rr]eplica: \([^-]*\)-.*$/\1/p') || replica=""
  replicas=$(printf '%s\n%s\n' "$replicas" "$replica" | sed '/^$/d' | sort -u)
  [ "$(echo "$replicas" | wc -l)" -ge 3 ] && break
done
[ "$(echo "$replicas" | wc -l)" -ge 3 ] || fail "only these replicas answered: $(echo $replicas)"
pass "replicas $(echo $replicas)"

step "POST /train?wait=true, a tiny minilm job"
t0=$SECONDS
result=$(curl -fsS --max-time "$(left)" -X POST "$URL/train?wait=true&timeout=600" \
  -H "Authorization: Bearer $API_TOKEN" -H 'Content-Type: application/json' -d "$TINY_JOB") || fail "POST /train?wait=true: $result"
job_id=$(json 'data["job_id"]' <<<"$result") || fail "no job_id in $result"
accuracy=$(json 'data["accuracy"]' <<<"$result") || fail "no accuracy in $result"
n_predictions=$(json 'len(data["predictions"])' <<<"$result") || fail "no predictions in $result"
[ "$n_predictions" = 32 ] || fail "$n_predictions predictions for 32 eval examples"
allocator=$(json 'data["metrics"]["allocator"]' <<<"$result") || fail "no metrics.allocator in $result"
[ "$allocator" = jemalloc ] || fail "the worker trained with $allocator, not jemalloc (the image's libjemalloc2)"
pass "job $job_id: accuracy $accuracy, $n_predictions predictions, allocator $allocator, $((SECONDS - t0)) s"

step "POST /predict with the job's model"
answer=$(curl -fsS --max-time 120 -X POST "$URL/predict" -H "Authorization: Bearer $API_TOKEN" \
  -H 'Content-Type: application/json' \
  -d "${QUESTION%\}}, \"model\": \"$job_id\"}") || fail "POST /predict: $answer"
answered_by=$(json 'data["model"]' <<<"$answer") || fail "no model in $answer"
[ "$answered_by" = "$job_id" ] || fail "answered by another model: $answer"
pass "$answer"
