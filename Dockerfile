# syntax=docker/dockerfile:1
# kvcache service image (docs/deployment.md). Build from the repository root:
#   docker build -t kvcache:0.1.0 .
# Two stages: the builder has a C toolchain (for the optional C kernels and any dependency
# without a binary wheel) and builds every wheel; the runtime stage only installs them.

ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS builder
# build-essential brings gcc and make; the python image already ships the Python headers.
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# The build context is filtered by .dockerignore (no .git, .venv, tests, local builds).
COPY . .
# The project's wheel and every dependency of the extras the service can use (k8s: pod
# discovery; otel: tracing), so the runtime stage installs offline and compiles nothing.
RUN pip wheel --no-cache-dir --wheel-dir /wheels ".[service,redis,hf,k8s,otel]"

FROM ${PYTHON_IMAGE} AS runtime
# Pods run with a read-only root filesystem and a writable /tmp: caches go there.
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HOME=/tmp/huggingface \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN groupadd --system --gid 10001 kvcache \
    && useradd --system --uid 10001 --gid 10001 --home-dir /home/kvcache --create-home \
       --shell /usr/sbin/nologin kvcache
# Bind-mount the wheels instead of copying them: they never become a layer of this image.
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-index --find-links /wheels "kvcache[service,redis,hf,k8s,otel]"
USER 10001:10001
WORKDIR /home/kvcache
# HTTP API (http.port) and the ZMQ SUB socket engines publish to (events.zmq_bind).
EXPOSE 8080 5557
ENTRYPOINT ["kvcache", "serve"]
# Without arguments, listen on every interface: the service's own default is loopback, which
# nothing outside the container can reach. Passing arguments (e.g. --config) replaces this.
CMD ["--http-host", "0.0.0.0"]
