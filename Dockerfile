# syntax=docker/dockerfile:1
# The agent service image: `docker build -t agent-service:0.1.0 .`, then
# `docker run --rm -p 50051:50051 -p 8080:8080 -p 9464:9464 agent-service:0.1.0` serves the offline demo (scripted
# model, demo database) over gRPC and HTTP; add `-e ANTHROPIC_API_KEY=…` for Claude. See docs/operations.md.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# Build stage: a virtualenv with the service and its dependencies (wheels only; no compiler in the final image).
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml README.md ./
COPY generated ./generated
COPY service ./service
COPY tools ./tools
RUN /opt/venv/bin/pip install . \
    && /opt/venv/bin/python -c "import service.wiring, tools.shipment_report"

# Runtime stage: the venv and nothing else; a fixed non-root UID that k8s/deployment.yaml's runAsUser repeats.
FROM ${PYTHON_IMAGE} AS runtime
# The data folder holds the audit log and the dead letters: the service's alone (0700), as it makes one itself.
RUN groupadd --system --gid 10001 agent \
    && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home --shell /usr/sbin/nologin agent \
    && install -d -o 10001 -g 10001 -m 0700 /var/lib/agent
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:/usr/local/bin:/usr/bin:/bin \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    GRPC_VERBOSITY=ERROR \
    AGENT_DATA_DIR=/var/lib/agent \
    AGENT_HTTP_LISTEN=0.0.0.0:8080
USER 10001:10001
WORKDIR /var/lib/agent
# gRPC (with grpc.health.v1 for probes), the HTTP face (docs/http.md) and Prometheus /metrics.
EXPOSE 50051 8080 9464
ENTRYPOINT ["/opt/venv/bin/python", "-m", "service"]
