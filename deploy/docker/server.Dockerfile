# facefed gallery server: FastAPI + Faiss + the Flower ServerApp.
#
# Build from the repository root (no docker engine was available where this
# file was written, so it has not been built; every command in it was run
# by hand on a Debian bookworm machine with Python 3.11):
#   docker build -f deploy/docker/server.Dockerfile -t facefed-server .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    FLWR_TELEMETRY_ENABLED=0 \
    FLWR_DISABLE_UPDATE_CHECK=1 \
    RAY_USAGE_STATS_ENABLED=0 \
    FACEFED_HOME=/var/lib/facefed

# dlib-bin and opencv-python-headless need these shared libraries at run time.
RUN apt-get update \
    && apt-get install --yes --no-install-recommends libgomp1 libglib2.0-0 \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/facefed
# torch first, from PyTorch's CPU index only: from PyPI the same version is the
# multi-GB CUDA build. Everything else comes from PyPI.
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
EXPOSE 8000
# Settings come from the environment (FACEFED_DATABASE_URL, FACEFED_MASTER_KEY_FILE,
# ...): see the deploy section of README.md.
ENTRYPOINT ["facefed"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
