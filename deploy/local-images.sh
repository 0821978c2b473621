#!/usr/bin/env bash
# Build the compose stack's images without an image registry or a package index reachable from the builds
# (air-gapped machines, our CI). Makes, once, and reuses afterwards:
#   localhost/debian:bookworm          a minimal Debian root filesystem (debootstrap), imported as an image
#   localhost/python:3.11-bookworm     } stand-ins for python:3.11-slim, nginx:1.28-alpine and redis:7-alpine
#   localhost/nginx:1.22-bookworm      } (deploy/local-bases.Dockerfile; their RUN apt-get reaches Debian's
#   localhost/redis:7-bookworm         }  packages through the engine's network)
#   wheelhouse/                        the requirements as wheels for Linux x86_64, CPython 3.11 (pip download),
#                                      kept in CACHE_DIR for the next clone: the same requirements.txt reuses it
# deploy/local-images.env points compose at them:
#   docker-compose --env-file deploy/local-images.env up --build
# Needs root (debootstrap), debootstrap, an engine (ENGINE: podman, the default, or docker), and Debian's mirror
# (DEBIAN_MIRROR) and a Python package index reachable from this host.
set -euo pipefail
cd "$(dirname "$0")/.."

ENGINE=${ENGINE:-podman}
PYTHON=${PYTHON:-python3}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
CACHE_DIR=${CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/boolq-service}
# CPU torch from PyTorch's index when it answers; else pip's configured index (set TORCH_INDEX_URL= to skip it).
TORCH_INDEX_URL=${TORCH_INDEX_URL-https://download.pytorch.org/whl/cpu}
TORCH_VERSION=2.13.0
WHEELHOUSE=wheelhouse
WHEEL_CACHE=$CACHE_DIR/wheelhouse  # the last complete wheelhouse, shared by every clone on this machine
ENV_FILE=deploy/local-images.env

DEBIAN_IMAGE=localhost/debian:bookworm
# BASE_IMAGE (Python), NGINX_IMAGE, REDIS_IMAGE: the names compose builds on.
# shellcheck source=local-images.env
source "$ENV_FILE"

step() { printf '\n-- local-images [%4ds] %s\n' "$SECONDS" "$*"; }
image_exists() { "$ENGINE" image inspect "$1" >/dev/null 2>&1; }

debian_image() {
  if image_exists "$DEBIAN_IMAGE"; then
    step "$DEBIAN_IMAGE: present"
    return
  fi
  local tarball="$CACHE_DIR/debian-bookworm-minbase.tar"
  if [ ! -s "$tarball" ]; then
    step "$DEBIAN_IMAGE: debootstrap --variant=minbase bookworm (about 2 minutes)"
    local rootfs="$CACHE_DIR/rootfs.tmp"
    rm -rf "$rootfs" && mkdir -p "$CACHE_DIR"
    debootstrap --variant=minbase bookworm "$rootfs" "$DEBIAN_MIRROR"
    # No package lists or downloaded .debs in the image; builds run apt-get update themselves.
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/archives/*.deb
    tar -C "$rootfs" -cf "$tarball.tmp" . && mv "$tarball.tmp" "$tarball"
    rm -rf "$rootfs"
  fi
  step "$DEBIAN_IMAGE: import $tarball"
  "$ENGINE" import --change 'CMD ["bash"]' "$tarball" "$DEBIAN_IMAGE"
}

base_images() {
  local target image
  for target in python nginx redis; do
    case $target in
      python) image=$BASE_IMAGE ;;
      nginx) image=$NGINX_IMAGE ;;
      redis) image=$REDIS_IMAGE ;;
    esac
    step "$image: build (target $target of deploy/local-bases.Dockerfile; cached layers are reused)"
    "$ENGINE" build --target "$target" --build-arg "DEBIAN_IMAGE=$DEBIAN_IMAGE" -t "$image" \
      -f deploy/local-bases.Dockerfile deploy
  done
}

wheelhouse() {
  # Wheels for the image's platform, whatever this host's Python or OS: CPython 3.11, manylinux for glibc ≤ 2.36
  # (bookworm). Each manylinux tag is named: older pips do not expand manylinux_2_36 to the ones below it.
  local platform=(--only-binary=:all: --python-version 3.11 --implementation cp) minor
  for minor in $(seq 36 -1 5); do platform+=(--platform "manylinux_2_${minor}_x86_64"); done
  platform+=(--platform manylinux2014_x86_64 --platform manylinux2010_x86_64 --platform manylinux1_x86_64)
  local stamp="$WHEELHOUSE/.complete" wanted
  wanted=$(cat requirements.txt; echo "${platform[*]}")
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$wanted" ]; then
    step "$WHEELHOUSE: complete for this requirements.txt"
    return
  fi
  if [ -f "$WHEEL_CACHE/.complete" ] && [ "$(cat "$WHEEL_CACHE/.complete")" = "$wanted" ]; then
    # Same files, same modes: the image build's COPY of the wheelhouse (checksummed by content) stays cached.
    step "$WHEELHOUSE: copied from $WHEEL_CACHE (complete for this requirements.txt)"
    cp -p "$WHEEL_CACHE"/*.whl "$WHEELHOUSE"/
    echo "$wanted" >"$stamp"
    return
  fi
  local probe="import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=10)"
  if [ -n "$TORCH_INDEX_URL" ] && "$PYTHON" -c "$probe" "$TORCH_INDEX_URL/torch/" 2>/dev/null; then
    step "$WHEELHOUSE: torch==$TORCH_VERSION from $TORCH_INDEX_URL"
    "$PYTHON" -m pip download --quiet --dest "$WHEELHOUSE" "${platform[@]}" --index-url "$TORCH_INDEX_URL" \
      "torch==$TORCH_VERSION"
  else
    step "$WHEELHOUSE: no answer from TORCH_INDEX_URL=$TORCH_INDEX_URL; torch comes from pip's configured index"
  fi
  step "$WHEELHOUSE: pip download -r requirements.txt"
  # --find-links: a torch already in the wheelhouse (2.13.0+cpu) satisfies the torch==2.13.0 pin.
  "$PYTHON" -m pip download --quiet --dest "$WHEELHOUSE" "${platform[@]}" --find-links "$WHEELHOUSE" \
    -r requirements.txt
  # pip download evaluates environment markers for this host's Python, whatever --python-version says: ask the
  # base image's own pip, offline, what is still missing (bookworm's Python 3.11.2 needs async-timeout for redis,
  # `python_full_version < "3.11.3"`), and fetch it, marker dropped.
  local missing attempt
  for attempt in 1 2 3 4 5; do
    missing=$(missing_in_wheelhouse)
    [ -z "$missing" ] && break
    step "$WHEELHOUSE: $BASE_IMAGE also needs $missing"
    "$PYTHON" -m pip download --quiet --dest "$WHEELHOUSE" "${platform[@]}" --find-links "$WHEELHOUSE" \
      "${missing%%;*}"
  done
  if [ -n "$missing" ]; then
    echo "$WHEELHOUSE: still incomplete after $attempt rounds" >&2
    return 1
  fi
  echo "$wanted" >"$stamp"
  step "$WHEELHOUSE: kept in $WHEEL_CACHE for the next clone"
  rm -rf "$WHEEL_CACHE.tmp" && mkdir -p "$WHEEL_CACHE.tmp"
  cp -p "$WHEELHOUSE"/*.whl "$WHEEL_CACHE.tmp"/ && echo "$wanted" >"$WHEEL_CACHE.tmp/.complete"
  rm -rf "$WHEEL_CACHE" && mv "$WHEEL_CACHE.tmp" "$WHEEL_CACHE"
}

# The first requirement the base image's pip cannot find in the wheelhouse (with no index); empty when none.
missing_in_wheelhouse() {
  local output
  local check='python3 -m venv /tmp/venv
    /tmp/venv/bin/pip install --dry-run --quiet --no-index --find-links /wheelhouse -r /requirements.txt'
  if output=$("$ENGINE" run --rm --network none -v "$PWD/$WHEELHOUSE:/wheelhouse:ro" \
    -v "$PWD/requirements.txt:/requirements.txt:ro" "$BASE_IMAGE" sh -ec "$check" 2>&1); then
    return
  fi
  if ! grep -q '^ERROR: No matching distribution found for ' <<<"$output"; then
    echo "$output" >&2
    return 1
  fi
  sed -n 's/^ERROR: No matching distribution found for //p' <<<"$output"
}

debian_image
base_images
wheelhouse
step "done: docker-compose --env-file $ENV_FILE up --build"
