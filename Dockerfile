# Images of the FAIR recommendation service, one Dockerfile, several targets:
#
#   docker build -t fair-rec .                               # runtime (default): CPU serving, no torch
#   docker build --target runtime-gpu -t fair-rec:gpu .      # GPU serving: CUDA base + onnxruntime-gpu
#   docker build --target train -t fair-rec:train .          # fair-data/fair-sid/fair-train/fair-export, fair-demo
#
# Build arguments: PYTHON_IMAGE (CPU bases), CUDA_IMAGE (GPU serving base; CUDA 12 + cuDNN 9 is what the
# onnxruntime-gpu wheels on PyPI are built for), TORCH_INDEX_URL (CPU wheels by default; a CUDA index such
# as https://download.pytorch.org/whl/cu126 for GPU training; empty: PyPI only), and for builds without
# that index (train target): WHEELHOUSE_URL (a pip --find-links page holding the torch wheel) and
# TORCH_REQUIREMENT (e.g. torch==2.13.0+cpu: pip must take exactly that build, never PyPI's CUDA one).
# Without an image registry: deploy/offline/ and docker-compose.offline.yml (docs/operations.md).
#
# No `# syntax=` line on purpose: it makes BuildKit pull its frontend image from Docker Hub, which
# machines without registry access cannot do. Nothing here needs more than the built-in frontend.
#
# The serving images hold the serving core only (the package's default dependencies): they never
# contain torch, so they stay small and start fast. Every image runs as the unprivileged user 10001.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04

# ---- build: one pure-Python wheel of the project, shared by every target ----------------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY model ./model
COPY export ./export
COPY service ./service
RUN pip wheel --no-deps --wheel-dir /wheels .

# ---- base: Python, the unprivileged user and the writable directories --------------------------------
FROM ${PYTHON_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
# /bundles and /var/lib/fair are created here, owned by the user, so named volumes mounted on them
# start out writable for it (Docker copies the ownership into a fresh volume).
RUN groupadd --gid 10001 fair \
    && useradd --uid 10001 --gid fair --create-home --home-dir /home/fair --shell /usr/sbin/nologin fair \
    && mkdir -p /bundles /var/lib/fair \
    && chown fair:fair /bundles /var/lib/fair \
    && python -m venv /opt/venv
WORKDIR /home/fair

# ---- train: the training extras (torch, sentence-transformers, onnx) for fair-train and fair-export ---
# Also what the compose `bootstrap` service runs (fair-demo builds the demo bundle). Training at scale:
# `torchrun --no_python --nproc_per_node N fair-train ...` (see deploy/k8s/training-job.yaml).
FROM base AS train
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG WHEELHOUSE_URL=
ARG TORCH_REQUIREMENT=
COPY --from=build /wheels /wheels
RUN pip install ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} \
        ${WHEELHOUSE_URL:+--find-links "$WHEELHOUSE_URL"} \
        "$(ls /wheels/*.whl)[train]" ${TORCH_REQUIREMENT:+"$TORCH_REQUIREMENT"} \
    && rm -rf /wheels
ENV HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    FAIR_DATA_DIR=/var/lib/fair
USER 10001:10001
CMD ["fair-train", "--help"]

# ---- runtime-gpu: serving on CUDA (onnxruntime-gpu INSTEAD of onnxruntime) ---------------------------
FROM ${CUDA_IMAGE} AS runtime-gpu
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 10001 fair \
    && useradd --uid 10001 --gid fair --create-home --home-dir /home/fair --shell /usr/sbin/nologin fair \
    && mkdir -p /bundles /var/lib/fair \
    && chown fair:fair /bundles /var/lib/fair \
    && python3 -m venv /opt/venv
COPY --from=build /wheels /wheels
# The two onnxruntime packages overwrite each other's files: remove the CPU one before adding the GPU one.
RUN pip install /wheels/*.whl \
    && pip uninstall -y onnxruntime \
    && pip install "onnxruntime-gpu>=1.19" \
    && rm -rf /wheels \
    && python -c "import onnxruntime as ort; assert 'CUDAExecutionProvider' in ort.get_available_providers()"
WORKDIR /home/fair
ENV FAIR_HOST=0.0.0.0 \
    FAIR_PORT=8000 \
    FAIR_DATA_DIR=/var/lib/fair \
    FAIR_BUNDLE=/bundles/demo
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('FAIR_PORT', '8000'), timeout=2)" || exit 1
CMD ["fair-serve"]

# ---- runtime (default target): CPU serving, the serving core only -------------------------------------
FROM base AS runtime
COPY --from=build /wheels /wheels
RUN pip install /wheels/*.whl \
    && rm -rf /wheels \
    && if python -c "import torch" 2>/dev/null; then echo "torch must not be in the serving image" >&2; exit 1; fi
ENV FAIR_HOST=0.0.0.0 \
    FAIR_PORT=8000 \
    FAIR_DATA_DIR=/var/lib/fair \
    FAIR_BUNDLE=/bundles/demo
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('FAIR_PORT', '8000'), timeout=2)" || exit 1
CMD ["fair-serve"]
