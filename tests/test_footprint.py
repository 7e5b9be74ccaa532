"""`broker serve` imports only what it serves with (docs/performance.md, idle RSS and start).

Every module imported costs resident memory and start time in every pod the sidecar runs in.
The process is a real `broker serve` (local store, no connect page); once its /readyz answers
200 it writes `sys.modules` and stops itself.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from bench.brokers import preload, write_callers
from bench.processes import free_port
from broker.records import ApiKey, TenantRecord, TenantState
from broker.stores.local import LocalStore

KEY = ApiKey("pls_" + "0" * 40)

# What `broker serve` does not need on the local store with the connect page off.
NOT_IMPORTED = (
    "hvac",  # the Vault store's client
    "broker.stores.vault",
    "openapi_core",  # the sandbox's request validation
    "broker.sandbox",
    "broker.demo",
    "broker.cli_events",  # the CLI's `events` helpers
    "jinja2",  # the connect page's templates
    "markupsafe",
    "broker.connect",
    "broker.connect_pages",
    "broker.connect_view",
    "aiohttp",  # the data plane has its own client (broker.wire)
    "yarl",
    "multidict",
    "uvicorn",  # the listeners are the broker's own (broker.protocol, broker.server)
    "click",  # uvicorn's command line
    "multiprocessing",  # uvicorn's supervisors
    "logging.config",  # uvicorn's log configuration
)

# Imported when the configuration first needs them, not at start (docs/decisions.md, "What
# `broker serve` imports when"): the control plane's HTTP client at the first call to Pleo or
# to the webhook receiver, the local store's cipher at the first key sealed or opened, YAML
# with a callers file.
LAZY = ("httpx", "httpcore", "cryptography", "yaml")

PROBE = """
import json, os, signal, socket, sys, threading, time

def probe(port, out):
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
                sock.sendall(b"GET /readyz HTTP/1.0\\r\\nHost: 127.0.0.1\\r\\n\\r\\n")
                if sock.recv(64).startswith(b"HTTP/1.1 200"):
                    with open(out, "w") as f:
                        json.dump(sorted(sys.modules), f)
                    break
        except OSError:
            pass
        time.sleep(0.02)  # polling readiness, bounded by the deadline
    os.kill(os.getpid(), signal.SIGTERM)

port = int(os.environ["BROKER_ADMIN_PORT"])
threading.Thread(target=probe, args=(port, sys.argv[1]), daemon=True).start()
from broker.cli import main
sys.exit(main(["serve"]))
"""


def serve_and_list_modules(
    tmp_path: Path, tenants: int = 0, master_key: bytes | None = None, **settings: str
) -> set[str]:
    """Run `broker serve` (its CLI entry point) on a local store holding `tenants` active
    tenants until ready; the modules it had imported."""
    out = tmp_path / "modules.json"
    done = serve_probed(tmp_path, tenants, master_key, **settings)
    assert out.exists(), f"broker serve never became ready: {done.stderr[-2000:]}"
    return set(json.loads(out.read_text()))


def serve_probed(
    tmp_path: Path, tenants: int = 0, master_key: bytes | None = None, **settings: str
) -> subprocess.CompletedProcess[str]:
    """Run `broker serve` with the probe (`PROBE`) until it stops; how it ended."""
    script, out = tmp_path / "probe.py", tmp_path / "modules.json"
    script.write_text(PROBE)
    if master_key is None:
        master_key = secrets.token_bytes(32)
    if tenants:
        preload(tmp_path / "store", master_key, tenants)
    # Without coverage's subprocess measurement (`make test` runs under pytest-cov): what is
    # listed is what the broker imports, not what coverage's tracer brings (multiprocessing).
    unmeasured = ("BROKER_", "COV_CORE_", "COVERAGE_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(unmeasured)}
    env.update(
        BROKER_PLEO_BASE_URL="http://127.0.0.1:9",
        BROKER_PROXY_HOST="127.0.0.1",
        BROKER_PROXY_PORT=str(free_port()),
        BROKER_ADMIN_HOST="127.0.0.1",
        BROKER_ADMIN_PORT=str(free_port()),
        BROKER_ADMIN_TOKEN=secrets.token_urlsafe(24),
        BROKER_STORE="local",
        BROKER_STORE_PATH=str(tmp_path / "store"),
        BROKER_MASTER_KEY=base64.b64encode(master_key).decode(),
        BROKER_LOG_LEVEL="WARNING",
        **settings,
    )
    return subprocess.run(
        [sys.executable, str(script), str(out)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=90,
    )


def imported(modules: set[str], name: str) -> bool:
    return any(m == name or m.startswith(name + ".") for m in modules)


@pytest.mark.real  # runs `broker serve` as a process
def test_serve_on_the_local_store_imports_nothing_it_does_not_need(tmp_path: Path) -> None:
    modules = serve_and_list_modules(tmp_path)
    assert imported(modules, "broker.proxy") and imported(modules, "broker.stores.local")
    assert [name for name in NOT_IMPORTED if imported(modules, name)] == []


@pytest.mark.real  # runs `broker serve` as a process
def test_serve_with_no_tenant_imports_no_http_client_cipher_or_yaml(tmp_path: Path) -> None:
    modules = serve_and_list_modules(tmp_path)
    assert imported(modules, "broker.pleo") and imported(modules, "broker.stores.crypto")
    assert [name for name in LAZY if imported(modules, name)] == []


@pytest.mark.real  # runs `broker serve` as a process
def test_serve_with_a_tenant_loads_the_cipher_to_open_its_key(tmp_path: Path) -> None:
    modules = serve_and_list_modules(tmp_path, tenants=1)
    assert imported(modules, "cryptography")
    assert not imported(modules, "yaml")


@pytest.mark.real  # runs `broker serve` as a process
def test_serve_with_a_callers_file_loads_yaml_to_read_it(tmp_path: Path) -> None:
    write_callers(tmp_path / "callers.yaml", 2)
    modules = serve_and_list_modules(tmp_path, BROKER_CALLERS_FILE=str(tmp_path / "callers.yaml"))
    assert imported(modules, "yaml")
    assert not imported(modules, "cryptography")


def emptied_store(path: Path, master_key: bytes) -> None:
    """A local store that held a tenant (so it sealed its key check) and holds none now."""

    async def write() -> None:
        store = LocalStore(path, master_key=master_key)
        try:
            await store.put(TenantRecord(tenant="acme", state=TenantState.ACTIVE, api_key=KEY))
            assert await store.delete("acme")
        finally:
            await store.close()

    asyncio.run(write())


@pytest.mark.real  # runs `broker serve` as a process
def test_serve_on_an_emptied_store_checks_the_master_key_without_the_cipher(
    tmp_path: Path,
) -> None:
    master_key = secrets.token_bytes(32)
    emptied_store(tmp_path / "store", master_key)
    modules = serve_and_list_modules(tmp_path, master_key=master_key)
    assert not imported(modules, "cryptography")


@pytest.mark.real  # runs `broker serve` as a process
def test_serve_on_an_emptied_store_refuses_a_wrong_master_key_at_start(tmp_path: Path) -> None:
    """Refused at start (it used to start, answer /readyz 200, and fail the first
    activation), with the store's one-line message."""
    emptied_store(tmp_path / "store", secrets.token_bytes(32))
    done = serve_probed(tmp_path, master_key=secrets.token_bytes(32))
    assert done.returncode == 1, done.stderr[-2000:]
    assert not (tmp_path / "modules.json").exists()  # never ready
    (line,) = [line for line in done.stderr.splitlines() if "master key" in line]
    assert line.startswith("error: The master key does not open ")
    assert "wrong master key" in line
