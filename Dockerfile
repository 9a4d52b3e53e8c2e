# syntax=docker/dockerfile:1
#
# bitdance-serve GPU image.
#
#   docker build -t bitdance-serve:0.1.0 .
#   docker run --gpus all -p 8000:8000 -v /srv/models:/models:ro bitdance-serve:0.1.0
#
# The weights (about 30 GB for BitDance-14B-64x) are never baked in: mount the checkpoint directory
# read-only under /models (see deploy/README.md). Every setting is a BITDANCE_* environment variable
# (deploy/env.example lists them all).
#
# The CUDA runtime base brings the driver-compatibility environment the NVIDIA container toolkit
# keys on; the torch wheel carries its own CUDA libraries, so only the host driver must be new enough
# for TORCH_INDEX_URL's CUDA (cu128: R570 or newer; any R525+ works through CUDA 12 minor-version
# compatibility for the kernels torch ships precompiled).
FROM nvidia/cuda:12.8.1-runtime-ubuntu24.04

# cu12x index of the PyTorch wheel host; torch itself is pinned by pyproject.toml.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ARG TORCH_VERSION=2.13.0

LABEL org.opencontainers.image.title="bitdance-serve" \
      org.opencontainers.image.description="Text-to-image inference server for BitDance (weights mounted at /models)" \
      org.opencontainers.image.licenses="Apache-2.0"

# python3-venv: Ubuntu 24.04's system Python is externally managed (PEP 668), so we use a venv.
# tini: PID 1 that forwards SIGTERM to the server (which drains) and reaps exited worker processes.
# Versions come from the pinned base image's Ubuntu release; pinning each apt package would break
# the build at every Ubuntu point release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv tini ca-certificates \
    && rm -rf /var/lib/apt/lists/*

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# 1) A venv, then the CUDA 12 builds of torch and xformers (the `gpu` extra) together from the
#    PyTorch index. PyPI's torch 2.13.0 is a CUDA 13 build (driver R580+) and PyPI's xformers
#    follows it, so neither comes from PyPI. The torch version satisfies pyproject's
#    `torch==2.13.0` (== ignores the +cu12x label), so the next step keeps both; pip picks the
#    newest xformers whose requirements accept this torch. Its own layer: ~4 GB that changes only
#    when the pins change.
RUN python3 -m venv "$VIRTUAL_ENV" \
    && pip install --index-url "$TORCH_INDEX_URL" "torch==${TORCH_VERSION}" "xformers>=0.0.33"

# 2) The project's remaining dependencies, read from pyproject.toml (with the `gpu` extra, already
#    satisfied), in a layer that does not change with the source code. The check fails the build if
#    anything swapped torch for another build.
WORKDIR /src
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; print('\n'.join(p['dependencies'] + p['optional-dependencies']['gpu']))" > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && python -c "import torch; assert torch.version.cuda and torch.version.cuda.startswith('12.'), torch.__version__" \
    && rm /tmp/requirements.txt

# 3) The project itself (dependencies are already there).
COPY bitdance_core ./bitdance_core
COPY server ./server
RUN pip install --no-deps . && rm -rf /src/build

# Non-root user with a fixed numeric id (Kubernetes runAsNonRoot checks the number). /models is only
# a mount point: nothing is stored there in the image.
RUN groupadd --system --gid 10001 bitdance \
    && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/bitdance bitdance \
    && mkdir -p /models /home/bitdance/.cache \
    && chown 10001:10001 /home/bitdance/.cache

# Offline at run time: the model is a local directory, never fetched from a hub. Caches go under
# ~/.cache, which Kubernetes mounts as an emptyDir (the root filesystem is read-only there).
# "utility" makes the toolkit mount nvidia-smi, which BITDANCE_DEVICES=auto uses to count GPUs.
ENV HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    HF_HOME=/home/bitdance/.cache/huggingface \
    TRITON_CACHE_DIR=/home/bitdance/.cache/triton \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    BITDANCE_MODEL=/models/BitDance-14B-64x

USER 10001:10001
WORKDIR /home/bitdance

EXPOSE 8000

# Ready = the API is up and at least one model worker has loaded and warmed up. Loading ~30 GB of
# weights takes from under a minute (local NVMe) to many minutes (network storage), hence the long
# start period; during it failures do not count, and probes run every 10 s.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20m --start-interval=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=4)"]

# SIGTERM: stop accepting work, drain in-flight requests for up to BITDANCE_DRAIN_GRACE_S, exit.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/bin/tini", "--", "bitdance"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
