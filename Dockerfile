# The GRU sequence-prediction service: python -m service on :8000 (GRU_PORT), shipped model baked in.
#
#   docker build -t gru-service .                                  # CPU torch (default)
#   docker build -t gru-service:cuda --build-arg TORCH_VARIANT=cu128 .   # a CUDA build of torch
#
# Every dependency but torch comes from requirements.lock: one version each, hash-checked (`make lock`
# refreshes it). torch comes from the wheel index TORCH_VARIANT names under https://download.pytorch.org/whl/
# (cpu, cu126, cu128, ...), at the version constraints.txt pins: each variant is a different file, so no one
# hash serves them all; a CUDA torch adds the nvidia-* and triton wheels it pins exactly itself. CUDA wheels
# bundle their CUDA runtime, so the same slim base serves both; the host only needs the NVIDIA driver and
# container toolkit.

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
COPY requirements.lock constraints.txt ./
RUN pip install --no-cache-dir --require-hashes --no-deps -r requirements.lock
# torch's own dependencies are already there, at the lock's versions, so pip takes only torch (and, for CUDA,
# its pinned wheels) from the variant's index.
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" \
        "torch==$(sed -n 's/^torch==//p' constraints.txt)"
COPY pyproject.toml README.md ./
COPY model ./model
COPY service ./service
# Not editable: model/ and service/ land in site-packages, the shipped weights with them (package data).
# The build backend is the lock's setuptools (no isolation, so nothing unlocked is fetched); pip check proves
# the environment whole.
RUN pip install --no-cache-dir --no-deps --no-build-isolation . \
    && pip check
# The installed package must find and load its model: checked from / in isolated mode (-I), where /src is
# not importable, so weights missing from site-packages fail the build.
WORKDIR /
RUN python -I -c "from model import load_checkpoint; from service.config import Settings; path = Settings().model_path; load_checkpoint(path); print('model at', path)"

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
# A real passwd entry for uid 10001: some libraries (getpass, torch's caches) look the user up. A regular
# (not --system) account: 10001 is above SYS_UID_MAX, where useradd --system warns.
RUN groupadd --gid 10001 gru \
    && useradd --uid 10001 --gid 10001 --no-log-init --home-dir /home/gru --create-home --shell /usr/sbin/nologin gru \
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
# The port is GRU_PORT (default 8000), read by the service and by this check alike: set it, not --port, to move.
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-m", "service.healthcheck"]
ENTRYPOINT ["python", "-m", "service"]
CMD ["--host", "0.0.0.0"]
