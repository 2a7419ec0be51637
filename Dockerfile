# crossprobe: one image for every role (SuperLink, executors, SuperNodes, init, launch).
#   CPU (default): docker build -t crossprobe:local .
#   GPU (CUDA wheels of torch; run with `gpus: all` / --gpus all):
#     docker build -t crossprobe:gpu --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 .
# Everything is installed here; nothing is installed at run time
# (FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1). Runs as UID 49999 like Flower's official images.
ARG PYTHON_IMAGE=python:3.11-slim
FROM ${PYTHON_IMAGE}

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# An offline build installs everything from a wheelhouse at this URL instead of the indexes
# (CI: tests/test_compose_up.py serves one made from the wheels on its own disk).
ARG WHEELS_URL=""
ARG UID=49999

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/app \
    FLWR_HOME=/app/.flwr \
    FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 \
    FLWR_TELEMETRY_ENABLED=0 \
    FLWR_DISABLE_UPDATE_CHECK=1

RUN groupadd --gid ${UID} app \
 && useradd --uid ${UID} --gid ${UID} --home-dir /app --no-create-home --shell /usr/sbin/nologin app

WORKDIR /app

# 1. torch from the chosen index (CPU by default), then the other dependencies from pyproject.toml:
#    a layer that survives source and documentation edits (only pyproject.toml goes in). From a
#    wheelhouse, deploy/install_wheelhouse.py installs its wheels a batch at a time (less disk).
COPY pyproject.toml deploy/install_wheelhouse.py ./
RUN if [ -n "${WHEELS_URL}" ]; then \
      python install_wheelhouse.py "${WHEELS_URL}"; \
    else \
      python -c "import tomllib; print(chr(10).join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
      && grep -E '^(torch|torchvision)\b' /tmp/requirements.txt > /tmp/torch.txt \
      && pip install --index-url "${TORCH_INDEX_URL}" -r /tmp/torch.txt \
      && pip install -r /tmp/requirements.txt \
      && rm /tmp/requirements.txt /tmp/torch.txt; \
    fi \
 && rm install_wheelhouse.py

# 2. the app itself (editable, so configs/ and the app folder that `flwr run /app` ships are the same)
COPY . .
RUN if [ -n "${WHEELS_URL}" ]; then export PIP_NO_INDEX=1 PIP_FIND_LINKS="${WHEELS_URL}" \
      PIP_TRUSTED_HOST="$(echo "${WHEELS_URL}" | sed -E 's#^[a-z]+://([^:/]+).*#\1#')"; fi \
 && pip install --no-deps -e . \
 && mkdir -p /app/.flwr /certs /data /outputs /results /state \
 && chown -R ${UID}:${UID} /app/.flwr /outputs /results /state \
 && python -c "import flwr, torch, timm, crossprobe.cli, common, server, clients, deploy, simulations"

USER ${UID}:${UID}
# compose gives each service its command (deploy/argv.py writes them)
CMD ["crossprobe", "--help"]
