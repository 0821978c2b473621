# syntax=docker/dockerfile:1
# One image for the API (gunicorn, the default command) and the RQ workers (`python -m app worker`).
# CPU torch by default; for a CUDA build pass the PyTorch wheel variant, e.g.
#   docker-compose build --build-arg TORCH_VARIANT=cu128   (see docker-compose.yml, service worker-gpu)
# Without a registry or a package index (README, "Without a registry"): deploy/local-images.sh makes a local
# BASE_IMAGE and fills wheelhouse/, and the requirements are installed from there with no index at all.
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH

# The requirements go into a virtual environment (Debian's own Python, in a local base image, refuses pip
# installs into itself), built in a stage of its own so the wheelhouse never lands in the final image.
FROM base AS dependencies
ARG TORCH_VARIANT=cpu
ARG TORCH_VERSION=2.13.0
COPY requirements.txt /tmp/
COPY wheelhouse/ /tmp/wheelhouse/
# torch comes from PyTorch's index for the chosen variant; the requirements' torch==2.13.0 pin is then already
# satisfied (2.13.0+cpu matches it). With wheels in wheelhouse/, nothing is fetched.
RUN python3 -m venv /opt/venv \
    && if ls /tmp/wheelhouse/*.whl >/dev/null 2>&1; then \
        pip install --no-index --find-links /tmp/wheelhouse -r /tmp/requirements.txt; \
    else \
        pip install --index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}" "torch==${TORCH_VERSION}" \
        && pip install -r /tmp/requirements.txt; \
    fi

FROM base
ENV ARTIFACTS_DIR=/data/artifacts \
    HF_HOME=/data/hf-cache \
    PORT=5000

WORKDIR /srv

# jemalloc for the training processes (ALLOCATOR, docs/configuration.md): a worker's memory stays near its working set.
RUN apt-get update && apt-get install -y --no-install-recommends libjemalloc2 && rm -rf /var/lib/apt/lists/*

# Non-root user; the data folders (artifacts, HF cache, mlflow) exist in the image so named volumes inherit their owner.
RUN useradd --create-home --uid 10001 --user-group app \
    && mkdir -p /data/artifacts /data/hf-cache /data/mlflow \
    && chown -R app:app /data

COPY --from=dependencies /opt/venv /opt/venv
# The code, with the bundled BoolQ sample (app/sample_data); the offline model `minilm` came with pip above.
COPY app ./app

USER app
EXPOSE 5000

# slim has no curl: ask /healthz with Python's standard library. The start period covers a cold first start:
# each replica imports torch before gunicorn listens, about 60-120 s when 3 replicas start on 2 busy cores.
HEALTHCHECK --interval=10s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('PORT', '5000'), timeout=4)"]

# gunicorn with app/ops/gunicorn_conf.py, bound to 0.0.0.0:$PORT inside the container network (nginx publishes).
CMD ["python", "-m", "app", "serve", "--host", "0.0.0.0"]
