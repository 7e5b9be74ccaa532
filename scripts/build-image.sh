#!/usr/bin/env bash
# Builds the container image exactly from the Dockerfile with podman (no Docker engine needed):
# `make image` runs it, and so does tests/test_image.py, so what the test exercises is what
# `make image` makes.
#   BASE=official (default)  the Dockerfile's own base, the official python:3.11 slim image
#   BASE=debian              the local Debian base of scripts/debian-python-base.sh, for machines
#                            that reach Debian's mirrors but no container registry
#   IMAGE=…                  the tag; defaults to the Helm chart's image, so the chart runs it
# `--isolation chroot` builds without a container runtime's namespaces (it works where
# `podman run` does not), `--network host` lets pip reach PyPI, `--format docker` keeps the
# HEALTHCHECK (OCI images have none). Where a proxy re-signs TLS, the host's PIP_CERT bundle is
# mounted for the builder's pip only; it is in no layer. Layers are cached: a change to broker/
# rebuilds the last builder step and the runtime's copy, not the dependencies. Needs root.
# Prints the image reference on its last line.
set -euo pipefail
cd "$(dirname "$0")/.."
version="$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' broker/__init__.py)"
repository="$(sed -n '/^image:/,/^[^ ]/s/^  repository: *//p' charts/pleo-broker/values.yaml)"
IMAGE="${IMAGE:-$repository:$version}"
args=(--isolation chroot --network host --format docker --layers --tag "$IMAGE")
case "${BASE:-official}" in
  official) ;;
  debian) args+=(--build-arg "PYTHON_IMAGE=$(bash scripts/debian-python-base.sh | tail -n 1)") ;;
  *) echo "build-image: BASE is official or debian, not '$BASE'" >&2; exit 2 ;;
esac
if [ -n "${PIP_CERT:-}" ] && [ -f "$PIP_CERT" ]; then
  args+=(--volume "$PIP_CERT:/run/pip-cert.pem:ro" --build-arg PIP_CERT=/run/pip-cert.pem)
fi
podman build "${args[@]}" . >&2
echo "$IMAGE"
