# syntax=docker/dockerfile:1
# Pleo Key Broker. Two stages: a builder that installs the pinned dependencies and the broker
# into a virtualenv, and a slim runtime that gets only that virtualenv (no compilers, no pip cache).
# The runtime runs as a numeric non-root user and works with a read-only root filesystem:
# it writes only to /data (the local store) and /tmp (mount a tmpfs or emptyDir there).
# Pin the base by digest in production: --build-arg PYTHON_IMAGE=python:3.11.14-slim-bookworm@sha256:…
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder
# Only where a proxy re-signs TLS: the CA bundle pip should trust, mounted for the build by
# scripts/build-image.sh (from the host's PIP_CERT). Builder stage only; the runtime never sees it.
ARG PIP_CERT
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/broker
WORKDIR /src
COPY requirements.lock ./
# --no-deps: the lock is the complete closure, so nothing unpinned can slip in.
RUN /opt/broker/bin/pip install --no-deps --no-compile --only-binary=:all: -r requirements.lock
COPY pyproject.toml README.md ./
COPY broker ./broker
# pip and setuptools leave the virtualenv once they have done their work (26 MB the broker never
# imports); the bytecode is compiled here because the runtime's root is read-only, and only for
# the -OO the runtime runs with (PYTHONOPTIMIZE=2 below).
RUN /opt/broker/bin/pip install --no-deps --no-compile . \
    && /opt/broker/bin/python -m pip uninstall --quiet --yes pip setuptools \
    && /opt/broker/bin/python -m compileall -q -o 2 /opt/broker

FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="pleo-key-broker" \
      org.opencontainers.image.description="Credential-broker sidecar for Pleo Integrated API Keys" \
      org.opencontainers.image.licenses="MIT"
RUN groupadd --system --gid 10001 broker \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin broker \
    && mkdir -p /data \
    && chown 10001:10001 /data \
    && chmod 0700 /data
COPY --from=builder /opt/broker /opt/broker
# Python runs with -OO (PYTHONOPTIMIZE=2): no docstrings and no asserts in memory, 1.7 MiB less
# in every sidecar (docs/decisions.md). The standard library's bytecode for it is compiled here,
# since the root is read-only (without it each start would compile what it imports).
RUN python -m compileall -q -o 2 -j 0 \
      -x '/(test|tests|idlelib|tkinter|turtledemo|lib2to3|ensurepip|pydoc_data)/' \
      "$(python -c 'import sysconfig; print(sysconfig.get_path("stdlib"))')"
# The admin listener (health, readiness, metrics, token-protected admin API) listens on every
# interface; the proxy stays on loopback unless BROKER_PROXY_HOST says otherwise, because anyone
# who can reach it can spend any tenant's key. The connect page (customers' browsers) runs only
# when BROKER_CONNECT_PUBLIC_URL is set, and then on every interface, port 8082.
ENV PATH=/opt/broker/bin:${PATH} \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONOPTIMIZE=2 \
    PYTHONUNBUFFERED=1 \
    BROKER_STORE_PATH=/data \
    BROKER_ADMIN_HOST=0.0.0.0 \
    BROKER_ADMIN_PORT=8081 \
    BROKER_PROXY_HOST=127.0.0.1 \
    BROKER_PROXY_PORT=8080 \
    BROKER_CONNECT_HOST=0.0.0.0 \
    BROKER_CONNECT_PORT=8082
# A working directory nobody can write to: no stray .env can be dropped where settings look.
WORKDIR /opt/broker
VOLUME ["/data"]
EXPOSE 8080 8081 8082
USER 10001:10001
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('BROKER_ADMIN_PORT', '8081') + '/healthz', timeout=4)"]
ENTRYPOINT ["broker"]
CMD ["serve"]
