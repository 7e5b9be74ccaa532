#!/usr/bin/env bash
# Installs the Debian packages the tests and the benchmark use (real components, not mocks):
# promtool (prometheus), nginx and wrk (benchmark reference and load), and chromium (the connect
# page's real-browser tests drive /usr/bin/chromium through Playwright), and what builds and runs
# the container image without a Docker engine (tests/test_image.py): podman, runc (crun refuses
# hybrid cgroup layouts), mmdebstrap (the local Debian base, scripts/debian-python-base.sh) and
# fuse-overlayfs (podman's storage where the kernel's overlay cannot nest). Idempotent; needs root.
set -euo pipefail
need=()
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
command -v nginx >/dev/null 2>&1 || need+=(nginx-light)
command -v wrk >/dev/null 2>&1 || need+=(wrk)
[ -x /usr/bin/chromium ] || need+=(chromium)
for tool in podman runc mmdebstrap fuse-overlayfs; do
  command -v "$tool" >/dev/null 2>&1 || need+=("$tool")
done
if [ ${#need[@]} -eq 0 ]; then exit 0; fi
if [ "$(id -u)" != 0 ]; then
  echo "system-deps: missing ${need[*]}; run as root or install them with apt-get" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
# The packages start services we do not want running; the tests start their own.
systemctl stop prometheus nginx >/dev/null 2>&1 || true
pkill -x prometheus >/dev/null 2>&1 || true
