#!/usr/bin/env bash
# Makes the local Debian Python base image, for machines that reach Debian's mirrors but no
# container registry: `make image BASE=debian` builds the Dockerfile on it instead of the official
# python:3.11 slim image. Debian bookworm's own python3 (3.11) with only what the two stages use:
# python3-venv (the builder's `python -m venv` and its bundled pip), ca-certificates, passwd
# (groupadd/useradd) and python-is-python3 (`python`). No apt, perl, docs, man pages or locales.
#
# Reproducible: SOURCE_DATE_EPOCH is fixed, so the same mirror content gives a bit-identical tar
# (point MIRROR at a snapshot.debian.org URL to pin that content too; it is unreachable here).
# The image carries the sha256 of this recipe in a label, and the script does nothing while an
# image with the same recipe exists (FORCE=1 rebuilds). Needs root, podman and mmdebstrap
# (scripts/system-deps.sh installs them). Prints the image reference on its last line.
set -euo pipefail
self="$(readlink -f "$0")"
cd "$(dirname "$self")/.."
BASE_IMAGE="${BASE_IMAGE:-localhost/debian-python:3.11-bookworm}"
SUITE=bookworm
MIRROR="${MIRROR:-http://deb.debian.org/debian}"
export SOURCE_DATE_EPOCH="${SOURCE_DATE_EPOCH:-1735689600}" # 2025-01-01T00:00:00Z
PACKAGES=python3,python3-venv,python-is-python3,ca-certificates,passwd
LABEL=org.pleo-broker.base-recipe

recipe="$(cat "$self"; echo "$SUITE $MIRROR $SOURCE_DATE_EPOCH")"
recipe="$(printf '%s' "$recipe" | sha256sum | cut -d' ' -f1)"
if [ "${FORCE:-0}" != 1 ] && podman image exists "$BASE_IMAGE" \
  && [ "$(podman image inspect --format "{{index .Labels \"$LABEL\"}}" "$BASE_IMAGE")" = "$recipe" ]; then
  echo "debian-python-base: $BASE_IMAGE is up to date" >&2
  echo "$BASE_IMAGE"
  exit 0
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
# merged-usr through its hook: otherwise apt picks the usrmerge package, which pulls in perl.
# security: bookworm-security, so the base has the fixes the official image would have.
mmdebstrap --quiet --variant=essential --include="$PACKAGES" \
  --setup-hook=/usr/share/mmdebstrap/hooks/merged-usr/setup00.sh \
  --dpkgopt='path-exclude=/usr/share/doc/*' \
  --dpkgopt='path-include=/usr/share/doc/*/copyright' \
  --dpkgopt='path-exclude=/usr/share/man/*' \
  --dpkgopt='path-exclude=/usr/share/info/*' \
  --dpkgopt='path-exclude=/usr/share/locale/*' \
  --dpkgopt='path-exclude=/usr/share/lintian/*' \
  --customize-hook='rm -f "$1/etc/resolv.conf" "$1/etc/hostname"' \
  "$SUITE" "$work/base.tar" \
  "deb $MIRROR $SUITE main" \
  "deb $MIRROR $SUITE-updates main" \
  "deb ${MIRROR%/debian}/debian-security $SUITE-security main"
podman import --quiet \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change "LABEL $LABEL=$recipe" \
  --change 'CMD ["python3"]' \
  "$work/base.tar" "$BASE_IMAGE" >/dev/null
echo "debian-python-base: built $BASE_IMAGE ($(sha256sum <"$work/base.tar" | cut -c1-12) tar)" >&2
echo "$BASE_IMAGE"
