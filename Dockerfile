# syntax=docker/dockerfile:1
# The GRU sequence-prediction service: python -m service on :8000, shipped model baked in.
#
#   docker build -t gru-service .                                  # CPU torch (default)
#   docker build -t gru-service:cuda --build-arg TORCH_VARIANT=cu128 .   # a CUDA build of torch
#
# TORCH_VARIANT names a wheel index under https://download.pytorch.org/whl/ (cpu, cu126, cu128, ...);
# it must carry the torch version pinned in constraints.txt. CUDA wheels bundle their CUDA runtime, so the
# same slim base serves both; the host only needs the NVIDIA driver and container toolkit.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------------------------------------- build
FROM ${PYTHON_IMAGE} AS build
ARG TORCH_VARIANT=cpu
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/${TORCH_VARIANT}
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:${PATH}
# torch first, from the chosen index and at the version constraints.txt pins; everything else comes from
# pyproject.toml (PyPI), with torch already satisfied.
COPY constraints.txt ./
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" \
        "torch==$(sed -n 's/^torch==//p' constraints.txt)"
COPY pyproject.toml README.md ./
COPY model ./model
COPY service ./service
# Not editable: model/ and service/ land in site-packages, the shipped weights with them (package data).
RUN pip install --no-cache-dir -c constraints.txt ".[redis]" \
    && python -c "from service.config import Settings; print('model at', Settings().model_path)"

# -------------------------------------------------------------------------------------------- runtime
FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="gru-service" \
      org.opencontainers.image.description="Stateful GRU sequence-prediction service" \
      org.opencontainers.image.licenses="MIT"
ARG TORCH_VARIANT=cpu
# CUDA builds: Triton, which runs the fused GRU kernel, compiles a small C launcher on first use and needs a
# C compiler for it (without one the service still serves, through the slower TorchScript recurrence).
# Unpinned: Debian's security updates replace libc6-dev's exact version, and a pin would break the build.
# hadolint ignore=DL3008
RUN if [ "${TORCH_VARIANT}" != "cpu" ]; then \
        apt-get update \
        && apt-get install -y --no-install-recommends gcc libc6-dev \
        && rm -rf /var/lib/apt/lists/*; \
    fi
# A real passwd entry for uid 10001: some libraries (getpass, torch's caches) look the user up.
RUN groupadd --system --gid 10001 gru \
    && useradd --system --uid 10001 --gid 10001 --home-dir /home/gru --create-home --shell /usr/sbin/nologin gru \
    && mkdir -p /data \
    && chown 10001:10001 /data
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/gru \
    XDG_CACHE_HOME=/tmp/.cache \
    TRITON_CACHE_DIR=/tmp/.cache/triton
WORKDIR /home/gru
USER 10001:10001
EXPOSE 8000
# Slim images have no curl: ask /readyz with the standard library (non-2xx raises, exit code 1).
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=2)"]
ENTRYPOINT ["python", "-m", "service"]
CMD ["--host", "0.0.0.0", "--port", "8000"]
