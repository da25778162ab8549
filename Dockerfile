# One image for every Switchboard service and the example agents:
#   docker build -t switchboard .
#   docker run switchboard serve api        (or coordinator, dispatcher, registry, aggregator, dlq_replayer, agents)
# Dependencies are pinned by constraints.txt; regenerate it from a clean venv with `pip freeze --exclude switchboard`.

# The FoundationDB client library the Python bindings load (the store, fdb://): taken from the official
# image of the server version the deployments run, as FoundationDB's own samples do.
ARG FDB_VERSION=7.3.63
FROM foundationdb/foundationdb:${FDB_VERSION} AS fdb

FROM python:3.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md constraints.txt ./
COPY libs ./libs
COPY services ./services
COPY example_agents ./example_agents
RUN pip wheel --no-cache-dir --wheel-dir /wheels --constraint constraints.txt .

FROM python:3.11-slim-bookworm
# Each container serves one service; its health port is the same in all of them, and both listen on every
# interface so that probes and the other containers reach them.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    SWITCHBOARD_API_HOST=0.0.0.0 \
    SWITCHBOARD_HEALTH_HOST=0.0.0.0 \
    SWITCHBOARD_HEALTH_PORT=8080 \
    SWITCHBOARD_STORE_URL=sqlite:////data/switchboard.sqlite3
COPY --from=fdb /usr/lib/libfdb_c.so /usr/lib/libfdb_c.so
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index /wheels/*.whl \
    && rm -rf /wheels \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin switchboard \
    && mkdir /data && chown switchboard /data
USER 10001
WORKDIR /data
EXPOSE 8000 8080
# `switchboard healthcheck` asks this container's service for /healthz: on the health port, or on the
# api's own port for the api.
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 CMD ["switchboard", "healthcheck"]
ENTRYPOINT ["switchboard"]
CMD ["serve", "api"]
