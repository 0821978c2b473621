# Stand-ins for the public base images (python:3.11-slim, nginx:1.28-alpine, redis:7-alpine), built on a Debian
# root filesystem from debootstrap where no image registry can be reached. Made by deploy/local-images.sh.
ARG DEBIAN_IMAGE=localhost/debian:bookworm

FROM ${DEBIAN_IMAGE} AS python
# python3-venv: the Dockerfile installs the requirements into a virtual environment. passwd: useradd.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv passwd \
    && rm -rf /var/lib/apt/lists/*

FROM ${DEBIAN_IMAGE} AS nginx
# wget: the compose healthcheck (busybox has it in the alpine image).
RUN apt-get update \
    && apt-get install -y --no-install-recommends nginx wget \
    && rm -rf /var/lib/apt/lists/*
STOPSIGNAL SIGQUIT
CMD ["nginx", "-g", "daemon off;"]

FROM ${DEBIAN_IMAGE} AS redis
# Like the official image: runs as `redis` in /data, the folder compose mounts the redis-data volume on.
RUN apt-get update \
    && apt-get install -y --no-install-recommends redis-server \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /data && chown redis:redis /data
WORKDIR /data
USER redis
CMD ["redis-server"]
