# syntax=docker/dockerfile:1
# One image for the API (gunicorn, the default command) and the RQ workers (`python -m app worker`).
# CPU torch by default; for a CUDA build pass the PyTorch wheel variant, e.g.
#   docker-compose build --build-arg TORCH_VARIANT=cu128   (see docker-compose.yml, service worker-gpu)
FROM python:3.11-slim

ARG TORCH_VARIANT=cpu
ARG TORCH_VERSION=2.13.0

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    ARTIFACTS_DIR=/data/artifacts \
    HF_HOME=/data/hf-cache \
    PORT=5000

WORKDIR /srv

# Dependencies first, so code changes rebuild only the last layers. torch comes from PyTorch's index for the
# chosen variant; the requirements' torch==2.13.0 pin is then already satisfied (2.13.0+cpu matches it).
COPY requirements.txt .
RUN pip install --index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}" "torch==${TORCH_VERSION}" \
    && pip install -r requirements.txt

# Non-root user; the data folders (artifacts, HF cache, mlflow) exist in the image so named volumes inherit their owner.
RUN useradd --create-home --uid 10001 --user-group app \
    && mkdir -p /data/artifacts /data/hf-cache /data/mlflow \
    && chown -R app:app /data

# The code, with the bundled BoolQ sample (app/sample_data); the offline model `minilm` came with pip above.
COPY app ./app

USER app
EXPOSE 5000

# slim has no curl: ask /healthz with Python's standard library.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('PORT', '5000'), timeout=4)"]

# gunicorn with app/gunicorn_conf.py, bound to 0.0.0.0:$PORT.
CMD ["python", "-m", "app", "serve"]
