# facefed site agent: the local face pipeline, the `facefed site` CLI and a
# Flower SuperNode running the site's ClientApp (DP fine-tuning).
#
# Build from the repository root (no docker engine was available where this
# file was written, so it has not been built):
#   docker build -f deploy/docker/site.Dockerfile -t facefed-site .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    FLWR_TELEMETRY_ENABLED=0 \
    FLWR_DISABLE_UPDATE_CHECK=1 \
    RAY_USAGE_STATS_ENABLED=0 \
    FACEFED_HOME=/var/lib/facefed

RUN apt-get update \
    && apt-get install --yes --no-install-recommends libgomp1 libglib2.0-0 \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/facefed
# torch from PyTorch's CPU index only (PyPI's build of the same version is CUDA).
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0
COPY pyproject.toml setup.py README.md ./
COPY core ./core
COPY models ./models
COPY privacy ./privacy
COPY client ./client
COPY server ./server
# Flower's start scripts (TLS, SuperNode authentication): deploy/flower/README.md.
COPY deploy/flower ./deploy/flower
RUN pip install . && useradd --system --uid 10001 --home-dir /var/lib/facefed facefed \
    && mkdir -p /var/lib/facefed && chown facefed /var/lib/facefed

USER facefed
VOLUME ["/var/lib/facefed"]
# The SuperNode's ClientAppIo API, reached only by its own ClientApp processes.
EXPOSE 9094
# By default the container is the site's SuperNode (deploy/flower/supernode.sh:
# TLS to the SuperLink, SuperNode authentication with the site's ed25519 key);
# run `facefed site ...` next to it with `docker compose exec site-a facefed site ...`.
ENTRYPOINT ["/opt/facefed/deploy/flower/supernode.sh"]
