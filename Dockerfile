# syntax=docker/dockerfile:1
#
# Tandem server image: `tandem serve` on port 8000, as a non-root user, with the
# built-in Shakespeare model inside (package data), so it serves out of the box.
#
#   docker build -t tandem .                                   # CPU (default)
#   docker build --build-arg DEVICE=cuda -t tandem:cuda .      # CUDA torch, triton, flash-attn
#   docker run --rm -p 8000:8000 tandem                        # the built-in model
#   docker run --rm --gpus all -p 8000:8000 -v $PWD/models:/models:ro tandem:cuda \
#       /models/my-model --host 0.0.0.0 --served-model-name my-model
#
# Arguments after the image name are `tandem serve` arguments (MODEL, flags).
# flash-attn compiles from source for CUDA_ARCHS (80 = A100, 90 = H100/H200): expect a
# long build; narrow CUDA_ARCHS to your GPUs to shorten it.

ARG DEVICE=cpu
ARG CUDA_VERSION=12.8.1

# ---- one Python per device: a build base (compilers) and a runtime base ----------------
FROM python:3.11-slim-bookworm AS build-cpu
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV TORCH_INDEX_URL=${TORCH_INDEX_URL}

FROM python:3.11-slim-bookworm AS runtime-cpu

FROM nvidia/cuda:${CUDA_VERSION}-devel-ubuntu24.04 AS build-cuda
# the torch wheel index for this CUDA (override with --build-arg TORCH_INDEX_URL=...)
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ENV TORCH_INDEX_URL=${TORCH_INDEX_URL}
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev git \
    && rm -rf /var/lib/apt/lists/*

FROM nvidia/cuda:${CUDA_VERSION}-runtime-ubuntu24.04 AS runtime-cuda
# Triton compiles its small launcher at run time: it needs a C compiler and Python.h.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-dev gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

# ---- build: a virtual environment with the pinned torch first, then Tandem -------------
# hadolint ignore=DL3006
FROM build-${DEVICE} AS build
ARG DEVICE
ARG TORCH_VERSION=2.13.0
ARG FLASH_ATTN_VERSION=2.8.3
ARG CUDA_ARCHS="80;90"
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/tandem \
    PATH=/opt/tandem/bin:$PATH
# torch first and pinned, from the device's wheel index, so no resolver swaps its build
# (its CUDA build brings the matching triton).
RUN python3 -m venv /opt/tandem \
    && pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY server ./server
COPY scheduler ./scheduler
COPY engine ./engine
COPY kernels ./kernels
RUN pip install --no-cache-dir .
# CUDA only: flash-attn, compiled against the torch above.
RUN if [ "${DEVICE}" = "cuda" ]; then \
        pip install --no-cache-dir packaging==24.2 ninja==1.11.1.4 wheel==0.45.1 psutil==6.1.1 \
        && FLASH_ATTN_CUDA_ARCHS="${CUDA_ARCHS}" MAX_JOBS=4 \
           pip install --no-cache-dir --no-build-isolation "flash-attn==${FLASH_ATTN_VERSION}"; \
    fi
# The built-in model must have landed as package data.
RUN python3 -c "from tandem.engine.builtin import BUILTIN_TARGET as t; \
assert (t / 'model.safetensors').is_file(), t"

# ---- runtime: the environment, a non-root user, the entrypoint -------------------------
# hadolint ignore=DL3006
FROM runtime-${DEVICE} AS runtime
LABEL org.opencontainers.image.title="tandem" \
      org.opencontainers.image.description="Tandem: an OpenAI-compatible LLM server" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 tandem \
    && useradd --system --uid 10001 --gid tandem --create-home --home-dir /home/tandem tandem
COPY --from=build /opt/tandem /opt/tandem
ENV PATH=/opt/tandem/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/home/tandem/.cache/huggingface \
    OMP_WAIT_POLICY=PASSIVE
USER 10001:10001
WORKDIR /home/tandem
EXPOSE 8000
# /health: 200 when ready; 503 while loading, draining, or after an engine failure.
HEALTHCHECK --interval=30s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python3", "-c", "import urllib.request as u; u.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
ENTRYPOINT ["tandem", "serve"]
CMD ["--host", "0.0.0.0", "--port", "8000"]
