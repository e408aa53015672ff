# Images of the FAIR recommendation service, one Dockerfile, several targets:
#
#   docker build -t fair-rec .                               # runtime (default): CPU serving, no torch
#   docker build --target runtime-gpu -t fair-rec:gpu .      # GPU serving: CUDA base + onnxruntime-gpu
#   docker build --target train -t fair-rec:train .          # fair-data/fair-sid/fair-train/fair-export, fair-demo
#
# Build arguments: PYTHON_IMAGE (CPU bases), CUDA_IMAGE (GPU serving base; CUDA 12 + cuDNN 9 is what the
# onnxruntime-gpu wheels on PyPI are built for); both take a digest, and should with a registry:
# python:3.11-slim-bookworm@sha256:... (a tag can be moved to other content, a digest cannot).
# PIP_INDEX_URL (PyPI, or a mirror of it), and for the train target TORCH_VARIANT (cpu; the lock pair
# deploy/requirements/{train,torch}-VARIANT.lock.txt, `make lock TORCH_VARIANT=cu126` for CUDA),
# TORCH_INDEX_URL (where that torch build is: https://download.pytorch.org/whl/cpu, .../cu126) and, for
# builds without that index, WHEELHOUSE_URL (a pip --find-links page holding the torch wheel; then no index).
# Without an image registry: deploy/offline/ and docker-compose.offline.yml (docs/operations.md).
#
# Supply chain (docs/operations.md, "Supply chain"): every package is installed from a lock file in
# deploy/requirements/ with --require-hashes, so pip takes exactly the files locked there (sha256) or
# fails; --no-deps, so nothing unlocked comes along; --only-binary :all:, so no package's build code runs;
# one --index-url per install (never --extra-index-url). The project's own wheel comes last, with
# --no-index: its requirements must already be met by the lock, or the build fails.
#
# No `# syntax=` line on purpose: it makes BuildKit pull its frontend image from Docker Hub, which
# machines without registry access cannot do. Nothing here needs more than the built-in frontend.
#
# The serving images hold the serving core only (the package's default dependencies): they never
# contain torch, so they stay small and start fast. Every image runs as the unprivileged user 10001.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04
ARG PIP_INDEX_URL=https://pypi.org/simple

# ---- build: one pure-Python wheel of the project, shared by every target ----------------------------
# The build backend (setuptools, wheel) from its lock too: pip's default build isolation would fetch
# whatever setuptools the index offers at that moment, unchecked.
FROM ${PYTHON_IMAGE} AS build
ARG PIP_INDEX_URL
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY deploy/requirements/build.lock.txt /tmp/locks/
RUN python -m venv /opt/build \
    && /opt/build/bin/pip install --require-hashes --no-deps --only-binary :all: \
        --index-url "$PIP_INDEX_URL" -r /tmp/locks/build.lock.txt
COPY pyproject.toml README.md ./
COPY model ./model
COPY export ./export
COPY service ./service
RUN /opt/build/bin/pip wheel --no-deps --no-build-isolation --wheel-dir /wheels .

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
# torch is the one package not on PyPI (its CPU and CUDA builds are on the PyTorch index), so it has its
# own lock and its own install from that index (or from WHEELHOUSE_URL alone); everything else, torch's
# dependencies included, comes from the train lock and PIP_INDEX_URL. `pip check` then proves the set
# consistent, and the [train] extra's install with --no-index that the lock covers every requirement.
FROM base AS train
ARG PIP_INDEX_URL
ARG TORCH_VARIANT=cpu
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG WHEELHOUSE_URL=
COPY deploy/requirements/train-${TORCH_VARIANT}.lock.txt deploy/requirements/torch-${TORCH_VARIANT}.lock.txt /tmp/locks/
COPY --from=build /wheels /wheels
RUN pip install --require-hashes --no-deps --only-binary :all: --index-url "$PIP_INDEX_URL" \
        -r "/tmp/locks/train-${TORCH_VARIANT}.lock.txt" \
    && if [ -n "$WHEELHOUSE_URL" ]; then set -- --no-index --find-links "$WHEELHOUSE_URL"; \
       else set -- --index-url "${TORCH_INDEX_URL:?set TORCH_INDEX_URL or WHEELHOUSE_URL: where the torch build is}"; fi \
    && pip install --require-hashes --no-deps --only-binary :all: "$@" -r "/tmp/locks/torch-${TORCH_VARIANT}.lock.txt" \
    && pip install --no-index "$(ls /wheels/*.whl)[train]" \
    && pip check \
    && rm -rf /wheels /tmp/locks
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
ARG PIP_INDEX_URL
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 10001 fair \
    && useradd --uid 10001 --gid fair --create-home --home-dir /home/fair --shell /usr/sbin/nologin fair \
    && mkdir -p /bundles /var/lib/fair \
    && chown fair:fair /bundles /var/lib/fair \
    && python3 -m venv /opt/venv
# Ubuntu 24.04's Python is 3.12: this image has its own lock, with onnxruntime-gpu INSTEAD of onnxruntime
# (the two packages overwrite each other's files; the CPU one is never installed here). The project's
# wheel goes in with --no-deps, since its metadata asks for onnxruntime: pip check must find that the
# only thing missing.
COPY deploy/requirements/serve-gpu.lock.txt /tmp/locks/
COPY --from=build /wheels /wheels
RUN pip install --require-hashes --no-deps --only-binary :all: --index-url "$PIP_INDEX_URL" \
        -r /tmp/locks/serve-gpu.lock.txt \
    && pip install --no-index --no-deps /wheels/*.whl \
    && { pip check || true; } | grep -v -e "^No broken requirements" -e "^fair-rec .* requires onnxruntime, which is not installed" \
        | { ! grep . >&2; } \
    && rm -rf /wheels /tmp/locks \
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
ARG PIP_INDEX_URL
COPY deploy/requirements/serve.lock.txt /tmp/locks/
COPY --from=build /wheels /wheels
RUN pip install --require-hashes --no-deps --only-binary :all: --index-url "$PIP_INDEX_URL" \
        -r /tmp/locks/serve.lock.txt \
    && pip install --no-index /wheels/*.whl \
    && pip check \
    && rm -rf /wheels /tmp/locks \
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
