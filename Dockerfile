# The tipgraph image: Ray head and workers (RayService, RayJob) and the MLflow server.
# Installs exactly the runtime lockfile; build and push with a pinned tag, never latest:
#   docker build -t ghcr.io/tipgraph/tipgraph:0.1.0 . && docker push ghcr.io/tipgraph/tipgraph:0.1.0
FROM python:3.11.7-slim-bookworm

# wget: KubeRay's default readiness/liveness probes of Ray pods call it.
RUN apt-get update \
    && apt-get install -y --no-install-recommends wget \
    && rm -rf /var/lib/apt/lists/*

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    LITELLM_LOCAL_MODEL_COST_MAP=True \
    RAY_USAGE_STATS_ENABLED=0

WORKDIR /app
RUN pip install --no-cache-dir uv==0.13.9
COPY requirements-runtime.lock ./
RUN uv pip sync --system --no-cache requirements-runtime.lock

COPY pyproject.toml README.md ./
COPY tipgraph ./tipgraph
COPY deployments ./deployments
COPY graphs ./graphs
COPY tuning ./tuning
COPY tipgraph_ops ./tipgraph_ops
COPY configs ./configs
# Editable: Serve's app builder finds configs/ next to graphs/ (graphs.tipgraph.PROJECT_ROOT).
RUN uv pip install --system --no-cache --no-deps -e .

RUN useradd --uid 1000 --create-home ray && chown -R ray /app
USER 1000
