# syntax=docker/dockerfile:1
# logprobe: the client, the CLI and the workers in one image.
#
#   CPU (default):  docker build -t logprobe:cpu .
#   CUDA:           docker build --build-arg TORCH_VARIANT=cu126 -t logprobe:cuda .
#
# Installed the way the README and scripts/setup.sh install it: torch first, pinned,
# from the index of the wanted build (so pip keeps it), then the project with its
# worker and postgres extras. CUDA builds carry their CUDA runtime in the wheels;
# the host needs only the NVIDIA driver and the NVIDIA container toolkit.
ARG PYTHON_VERSION=3.11
FROM python:${PYTHON_VERSION}-slim

# cpu, or a CUDA build tag of https://download.pytorch.org/whl/ (cu126, cu128, ...)
ARG TORCH_VARIANT=cpu
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/${TORCH_VARIANT}
# Extras of the project to install (see pyproject.toml): add export,plot for notebooks.
ARG EXTRAS=worker,postgres

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/cache/huggingface

RUN useradd --create-home --uid 1000 logprobe \
    && mkdir -p /cache/huggingface /artifacts \
    && chown logprobe:logprobe /cache/huggingface /artifacts

WORKDIR /app
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"

COPY pyproject.toml alembic.ini README.md* ./
COPY api_client ./api_client
COPY worker ./worker
COPY migrations ./migrations
RUN pip install ".[${EXTRAS}]" && logprobe --help >/dev/null

USER logprobe
CMD ["logprobe", "--help"]
