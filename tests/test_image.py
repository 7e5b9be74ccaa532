"""The container image, built from the Dockerfile and run the way a deployment runs it.

`scripts/build-image.sh` (what `make image` runs) builds the image with podman; here on the local
Debian base (`BASE=debian`, scripts/debian-python-base.sh), because no container registry is
reachable. `BROKER_IMAGE_BASE=official` builds on the official python image instead.

The container runs with `podman run` as the image's own user (no --user), a read-only root file
system, a tmpfs on /tmp, every capability dropped, no-new-privileges, and /data a host
directory: what the Helm chart asks of a pod. Two things this machine needs and a cluster does not:
`--runtime runc` (crun refuses the machine's hybrid cgroup layout) and ulimits no higher than the
current ones (root here has no CAP_SYS_RESOURCE, and podman's defaults raise them). What is not
enforced here: the network is the host's (`--network host`, so the broker reaches the sandbox on
127.0.0.1; published ports and network isolation are untested), no memory or CPU limit is set (the
cgroup layout refuses them), and podman's health-check timer does not run (it needs systemd), so
the HEALTHCHECK is run by hand with `podman healthcheck run`.
"""

from __future__ import annotations

import base64
import json
import os
import re
import resource
import secrets
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml
from support.servers import RunningSandbox, start_sandbox

ROOT = Path(__file__).resolve().parents[1]
UID = 10001
REQUIRED = ["export-jobs:read", "export-jobs:write"]
COMPILERS = {"gcc", "cc", "c++", "g++", "cpp", "clang", "cc1", "ld", "as", "tcc", "make"}
# Ceilings that fail the test when the runtime stage grows: measured 181 MB and 68 MiB.
MAX_IMAGE_BYTES = 220_000_000
MAX_IDLE_RSS_KB = 110_000

pytestmark = [pytest.mark.real, pytest.mark.slow]


def podman() -> str:
    path = shutil.which("podman")
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail("podman is missing: scripts/system-deps.sh installs it")
        pytest.skip("podman is not installed (make system-deps)")
    if os.geteuid() != 0:
        if os.environ.get("CI") == "true":
            pytest.fail("the image test needs root (podman's storage, mmdebstrap)")
        pytest.skip("the image test needs root")
    return path


def run(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [podman(), *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and result.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)}: {result.stdout}{result.stderr}")
    return result


@dataclass(frozen=True)
class Built:
    ref: str
    seconds: float


@dataclass(frozen=True)
class Running:
    name: str
    admin_url: str
    proxy_url: str
    token: str
    data: Path
    sandbox: RunningSandbox

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def pid(self) -> int:
        return int(run("inspect", "--format", "{{.State.Pid}}", self.name).stdout)

    def status(self) -> dict[str, str]:
        text = Path(f"/proc/{self.pid()}/status").read_text()
        return dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)


@pytest.fixture(scope="module")
def image() -> Built:
    podman()
    env = {k: v for k, v in os.environ.items() if k != "IMAGE"}  # the default tag: the chart's
    env["BASE"] = os.environ.get("BROKER_IMAGE_BASE", "debian")
    started = time.monotonic()
    result = subprocess.run(
        ["bash", str(ROOT / "scripts/build-image.sh")],
        capture_output=True,
        text=True,
        env=env,
        timeout=1800,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return Built(result.stdout.splitlines()[-1], time.monotonic() - started)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_flags() -> list[str]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return [
        "--runtime=runc",
        f"--ulimit=nofile={soft}:{hard}",
        "--ulimit=nproc=4096:4096",
        "--read-only",
        "--tmpfs=/tmp",
        "--cap-drop=ALL",
        "--security-opt=no-new-privileges",
        "--network=host",
    ]


def wait_until_healthy(name: str, admin_url: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        state = run("inspect", "--format", "{{.State.Status}}", name).stdout.strip()
        if state != "running":
            logs = run("logs", name, check=False)
            raise AssertionError(f"the container is {state}: {logs.stdout}{logs.stderr}")
        try:
            if httpx.get(f"{admin_url}/healthz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)  # poll interval, bounded by the deadline
    raise AssertionError("the broker in the container did not answer /healthz within 60 s")


@pytest.fixture(scope="module")
def container(image: Built, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    sandbox = start_sandbox()
    data = tmp_path_factory.mktemp("image-data")
    os.chown(data, UID, UID)
    data.chmod(0o700)
    admin_port, proxy_port = free_port(), free_port()
    name = f"pkb-test-{uuid.uuid4().hex[:12]}"
    secrets_env = {
        "BROKER_ADMIN_TOKEN": secrets.token_urlsafe(32),
        "BROKER_MASTER_KEY": base64.b64encode(secrets.token_bytes(32)).decode(),
    }
    settings = {
        "BROKER_PLEO_BASE_URL": sandbox.url,
        "BROKER_REQUIRED_SCOPES": ",".join(REQUIRED),
        "BROKER_ADMIN_HOST": "127.0.0.1",  # the host's network: stay on its loopback
        "BROKER_ADMIN_PORT": str(admin_port),
        "BROKER_PROXY_PORT": str(proxy_port),
    }
    # Secrets by name only (`-e NAME`): podman takes the value from its environment, not argv.
    args = [
        "run",
        "--detach",
        f"--name={name}",
        *run_flags(),
        f"--volume={data}:/data",
        *(f"--env={key}={value}" for key, value in settings.items()),
        *(f"--env={key}" for key in secrets_env),
        image.ref,
    ]
    result = subprocess.run(
        [podman(), *args],
        capture_output=True,
        text=True,
        env={**os.environ, **secrets_env},
        timeout=120,
        check=False,
    )
    try:
        assert result.returncode == 0, result.stderr
        admin_url = f"http://127.0.0.1:{admin_port}"
        wait_until_healthy(name, admin_url)
        token = secrets_env["BROKER_ADMIN_TOKEN"]
        yield Running(name, admin_url, f"http://127.0.0.1:{proxy_port}", token, data, sandbox)
    finally:
        run("rm", "--force", "--time=5", name, check=False)
        sandbox.thread.stop()


def test_health_and_readiness_answer(container: Running) -> None:
    assert httpx.get(f"{container.admin_url}/healthz").status_code == 200
    ready = httpx.get(f"{container.admin_url}/readyz")
    assert ready.status_code == 200, ready.text


def test_the_broker_runs_as_10001_without_capabilities(container: Running) -> None:
    status = container.status()
    assert status["Uid"].split() == [str(UID)] * 4
    assert status["Gid"].split() == [str(UID)] * 4
    assert int(status["CapEff"], 16) == 0
    assert status["NoNewPrivs"].strip() == "1"


def test_the_root_file_system_is_read_only_and_tmp_is_writable(container: Running) -> None:
    flag = run("inspect", "--format", "{{.HostConfig.ReadonlyRootfs}}", container.name).stdout
    assert flag.strip() == "true"
    probe = "import pathlib, sys; pathlib.Path(sys.argv[1]).write_text('x')"
    for path in ("/opt/broker/probe", "/probe", "/etc/probe"):
        result = run("exec", container.name, "python", "-c", probe, path, check=False)
        assert result.returncode != 0 and "Read-only file system" in result.stderr, path
    assert run("exec", container.name, "python", "-c", probe, "/tmp/probe").returncode == 0


UNCOMPILED = """
import os, sys
import broker.cli, broker.server, broker.stores.local  # what `broker serve` imports
print(sys.flags.optimize)
for module in list(sys.modules.values()):
    cached = getattr(module, "__cached__", None)
    if cached and not os.path.exists(cached):
        print(module.__name__, cached)
"""


def test_the_broker_runs_with_oo_from_bytecode_made_for_it(container: Running) -> None:
    """Every module `broker serve` imports has -OO bytecode in the image: none is compiled
    at start (the root is read-only, so none could be written either)."""
    environ = run("exec", container.name, "cat", "/proc/1/environ").stdout.split("\0")
    assert "PYTHONOPTIMIZE=2" in environ
    lines = run("exec", container.name, "python", "-c", UNCOMPILED).stdout.splitlines()
    assert lines[0] == "2"
    assert lines[1:] == []


def test_a_tenant_connects_and_a_proxied_call_succeeds(container: Running) -> None:
    key = container.sandbox.state.create_key(scopes=REQUIRED)
    connected = httpx.put(
        f"{container.admin_url}/v1/tenants/acme/key",
        json={"api_key": key.api_key},
        headers=container.auth,
        timeout=30,
    )
    assert connected.status_code == 200, connected.text
    assert connected.json()["company_id"] == key.company_id
    proxied = httpx.get(
        f"{container.proxy_url}/v3/export-jobs", headers={"X-Broker-Tenant": "acme"}, timeout=30
    )
    assert proxied.status_code == 200, proxied.text

    # The store is on the /data volume, the container's user owns it, and the key is sealed.
    files = {path.name: path for path in container.data.iterdir()}
    assert "tenants.db" in files, sorted(files)
    for path in files.values():
        assert (path.stat().st_uid, path.stat().st_gid) == (UID, UID), path
        assert key.api_key.encode() not in path.read_bytes(), path
    logs = run("logs", container.name)
    assert key.api_key not in logs.stdout + logs.stderr
    assert '"event": "broker.started"' in logs.stdout + logs.stderr


def healthcheck(ref: str) -> list[str]:
    config = json.loads(
        run("image", "inspect", "--format", "{{json .Config.Healthcheck}}", ref).stdout
    )
    assert config is not None, "no HEALTHCHECK in the image: build with --format docker"
    assert config["Test"][0] == "CMD"
    assert config["Interval"] and config["Timeout"]
    return list(config["Test"][1:])


def test_the_healthcheck_succeeds_when_run_by_hand(image: Built, container: Running) -> None:
    assert run("healthcheck", "run", container.name, check=False).returncode == 0
    command = healthcheck(image.ref)
    assert run("exec", container.name, *command, check=False).returncode == 0
    closed = run("exec", "--env=BROKER_ADMIN_PORT=1", container.name, *command, check=False)
    assert closed.returncode != 0, "the health check passes with nothing listening"


def build_leftovers(root: Path) -> list[str]:
    """Compilers, pip caches and pip itself under the file system `root`."""
    found = []
    for directory, subdirs, names in os.walk(root):
        relative = "/" + str(Path(directory).relative_to(root)).lstrip(".")
        if re.search(r"/\.cache/pip/|/pip/cache/|^/root/\.cache/", relative + "/"):
            found.append(relative)
        if relative.endswith("bin"):
            found += [f"{relative}/{n}" for n in names if n in COMPILERS or "-gcc" in n]
        subdirs[:] = [d for d in subdirs if not os.path.islink(os.path.join(directory, d))]
    site = root / "opt/broker/lib/python3.11/site-packages"
    return found + ["/" + str(p.relative_to(root)) for p in site.glob("pip*")]


def test_the_leftover_check_finds_compilers_and_pip(tmp_path: Path) -> None:
    site = tmp_path / "opt/broker/lib/python3.11/site-packages"
    for path in ("usr/bin/x86_64-linux-gnu-gcc-12", "usr/bin/cc", "root/.cache/pip/http/x"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).touch()
    (site / "pip").mkdir(parents=True)
    assert sorted(build_leftovers(tmp_path)) == [
        "/opt/broker/lib/python3.11/site-packages/pip",
        "/root/.cache",
        "/root/.cache/pip",
        "/root/.cache/pip/http",
        "/usr/bin/cc",
        "/usr/bin/x86_64-linux-gnu-gcc-12",
    ]


def test_no_compiler_and_no_pip_cache_in_the_image(image: Built) -> None:
    root = Path(run("image", "mount", image.ref).stdout.strip())
    try:
        assert (root / "opt/broker/lib/python3.11/site-packages/broker").is_dir()
        assert build_leftovers(root) == []
    finally:
        run("image", "unmount", image.ref, check=False)


def test_size_and_idle_rss_are_reported_and_bounded(
    image: Built, container: Running, capsys: pytest.CaptureFixture[str]
) -> None:
    size = int(run("image", "inspect", "--format", "{{.Size}}", image.ref).stdout)
    rss_kb = int(container.status()["VmRSS"].split()[0])
    layers = run("history", "--format", "{{.Size}}\t{{.CreatedBy}}", image.ref).stdout
    with capsys.disabled():
        print(f"\nimage {image.ref}: {size / 1e6:.0f} MB, built in {image.seconds:.0f} s")
        print(f"idle RSS of `broker serve` in the container: {rss_kb / 1024:.0f} MiB")
        print("layers:\n" + "\n".join(line[:110] for line in layers.splitlines() if line))
    assert size < MAX_IMAGE_BYTES
    assert rss_kb < MAX_IDLE_RSS_KB


def test_the_chart_and_make_image_name_what_was_built(image: Built) -> None:
    chart = ROOT / "charts/pleo-broker"
    values = yaml.safe_load((chart / "values.yaml").read_text())["image"]
    app_version = yaml.safe_load((chart / "Chart.yaml").read_text())["appVersion"]
    assert image.ref == f"{values['repository']}:{values['tag'] or app_version}"
    # The container here runs as the chart's pod does.
    context = yaml.safe_load((chart / "values.yaml").read_text())["securityContext"]
    user = run("image", "inspect", "--format", "{{.Config.User}}", image.ref).stdout.strip()
    assert user == f"{context['runAsUser']}:{context['runAsGroup']}" == f"{UID}:{UID}"
    assert context["readOnlyRootFilesystem"] and "--read-only" in run_flags()
    assert context["capabilities"]["drop"] == ["ALL"] and "--cap-drop=ALL" in run_flags()
    assert not context["allowPrivilegeEscalation"]
    assert "--security-opt=no-new-privileges" in run_flags()
    recipe = re.search(r"^image:.*\n((?:\t.*\n)+)", (ROOT / "Makefile").read_text(), re.M)
    assert recipe is not None and "scripts/build-image.sh" in recipe.group(1)
