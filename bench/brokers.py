"""The broker under test: a store pre-loaded with tenants, then `broker serve` as a subprocess."""

from __future__ import annotations

import asyncio
import base64
import compileall
import hashlib
import os
import re
import secrets
import sys
import sysconfig
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path

from bench.processes import BenchError, Supervisor, free_port, http_status, wait_until
from broker.records import ApiKey, TenantRecord, TenantState
from broker.stores.local import LocalStore

SCOPES = frozenset({"export-jobs:read", "export-jobs:write"})
BROKER_PACKAGE = Path(__file__).resolve().parent.parent / "broker"
TENANT_HEADER = "X-Broker-Tenant"


# The image runs Python with -OO (Dockerfile, PYTHONOPTIMIZE=2); so does every benchmarked broker.
OPTIMIZE = 2


def compile_bytecode(package: Path = BROKER_PACKAGE, *, libraries: bool = True) -> list[str]:
    """Compile `package`, the installed packages and the standard library to bytecode for
    -OO, as the image's build does (Dockerfile, `compileall -o 2`): the broker under test then
    starts as shipped, whether or not PYTHONDONTWRITEBYTECODE is set where the bench runs
    (without bytecode every start compiles what it imports: ~17 % more instructions to import
    the broker's modules, ~0.6 MiB more resident). Returns the directories that could not be
    written (a system Python's library, say), whose modules then compile at each start."""
    if not compileall.compile_dir(package, quiet=1, optimize=OPTIMIZE):
        raise BenchError(f"cannot compile {package} to bytecode")
    skipped: list[str] = []
    for kind in ("purelib", "platlib", "stdlib") if libraries else ():
        where = sysconfig.get_path(kind)
        if os.access(where, os.W_OK):
            compileall.compile_dir(where, quiet=2, optimize=OPTIMIZE, workers=0, rx=_NOT_SERVED)
        else:
            skipped.append(where)
    return skipped


# What `broker serve` never imports: left uncompiled (the image leaves out the same).
_NOT_SERVED = re.compile(r"/(test|tests|idlelib|tkinter|turtledemo|lib2to3|ensurepip|pydoc_data)/")


def tenant_ids(count: int) -> list[str]:
    """`count` well-formed tenant ids, the first being the one single-tenant load uses."""
    width = max(5, len(str(count - 1)))
    return [f"tenant-{i:0{width}d}" for i in range(count)]


async def _preload(path: Path, master_key: bytes, tenants: list[str]) -> None:
    store = LocalStore(path, master_key)
    try:
        for tenant in tenants:
            await store.put(
                TenantRecord(
                    tenant=tenant,
                    state=TenantState.ACTIVE,
                    api_key=ApiKey(secrets.token_urlsafe(32)),
                    company_id=str(uuid.uuid4()),
                    scopes=SCOPES,
                )
            )
    finally:
        await store.close()


def preload(path: Path, master_key: bytes, count: int) -> list[str]:
    """Write `count` active tenants with generated keys into a local store at `path`."""
    tenants = tenant_ids(count)
    asyncio.run(_preload(path, master_key, tenants))
    return tenants


@dataclass(frozen=True)
class RunningBroker:
    """A started `broker serve`."""

    pid: int
    proxy_url: str
    admin_url: str
    tenants: tuple[str, ...]
    caller_token: str | None = None  # a token of the callers file, when it has one
    # How it was started, to start it again alike (`restart_broker`).
    name: str = ""
    env: dict[str, str] = field(default_factory=dict, repr=False, compare=False)
    work_dir: Path | None = None


def restart_broker(supervisor: Supervisor, broker: RunningBroker) -> RunningBroker:
    """Stop `broker` and start a fresh process alike: the same environment (ports, store,
    callers file), ready when /readyz answers 200."""
    if broker.work_dir is None:
        raise BenchError(f"{broker.name or broker.pid} was not started by run_broker")
    supervisor.stop_pid(broker.pid)
    fresh = run_broker(supervisor, broker.name, broker.env, broker.work_dir, broker.tenants)
    return replace(fresh, caller_token=broker.caller_token)


def broker_env(
    *, upstream_url: str, store_path: Path, master_key: bytes, proxy_port: int, admin_port: int
) -> dict[str, str]:
    """The environment of a benchmarked broker (only `BROKER_*` settings change)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    env.update(
        BROKER_PLEO_BASE_URL=upstream_url,
        BROKER_PROXY_HOST="127.0.0.1",
        BROKER_PROXY_PORT=str(proxy_port),
        BROKER_ADMIN_HOST="127.0.0.1",
        BROKER_ADMIN_PORT=str(admin_port),
        BROKER_ADMIN_TOKEN=secrets.token_urlsafe(24),
        BROKER_STORE="local",
        BROKER_STORE_PATH=str(store_path),
        BROKER_MASTER_KEY=base64.b64encode(master_key).decode(),
        BROKER_LOG_LEVEL="WARNING",
        BROKER_SECRETS_DIR=str(store_path.parent),
        PYTHONOPTIMIZE=str(OPTIMIZE),
    )
    return env


def start_broker(
    supervisor: Supervisor,
    *,
    name: str,
    work_dir: Path,
    upstream_url: str,
    tenants: int,
    callers: int = 0,
) -> RunningBroker:
    """Pre-load `tenants` tenants (and a callers file of `callers` callers), start the broker
    on free ports, and wait until /readyz answers 200."""
    proxy_port, admin_port = free_port(), free_port()
    master_key = secrets.token_bytes(32)
    store_path = work_dir / "store"
    ids = preload(store_path, master_key, tenants)
    env = broker_env(
        upstream_url=upstream_url,
        store_path=store_path,
        master_key=master_key,
        proxy_port=proxy_port,
        admin_port=admin_port,
    )
    token = None
    if callers:
        token = write_callers(work_dir / "callers.yaml", callers)
        env["BROKER_CALLERS_FILE"] = str(work_dir / "callers.yaml")
    running = run_broker(supervisor, name, env, work_dir, tuple(ids))
    return replace(running, caller_token=token)


def write_callers(path: Path, count: int) -> str:
    """A callers file of `count` callers, each with its own tenant pattern; the token of the
    one in the middle, whose patterns match every tenant."""
    tokens = [secrets.token_hex(32) for _ in range(count)]
    middle = count // 2
    lines = ["callers:"]
    for i, token in enumerate(tokens):
        tenants = '["*"]' if i == middle else f'["customer-{i}", "group-{i}-*"]'
        lines += [
            f"  - name: caller-{i}",
            f"    token_sha256: {hashlib.sha256(token.encode()).hexdigest()}",
            f"    tenants: {tenants}",
        ]
    path.write_text("\n".join(lines) + "\n")
    return tokens[middle]


def run_broker(
    supervisor: Supervisor,
    name: str,
    env: dict[str, str],
    work_dir: Path,
    tenants: tuple[str, ...] | None = None,
) -> RunningBroker:
    """Start `broker serve` in `env` and wait until /readyz answers 200 (`tenants`: the ids
    its store holds, for the load to name)."""
    argv = [sys.executable, "-m", "broker", "serve"]
    child = supervisor.start(name, argv, env=env, cwd=work_dir, log=work_dir / "broker.log")
    admin_url = f"http://127.0.0.1:{env['BROKER_ADMIN_PORT']}"
    wait_until(
        lambda: http_status(admin_url + "/readyz") == 200,
        what=name,
        timeout=60,
        alive=supervisor.check_alive,
    )
    return RunningBroker(
        pid=child.pid,
        proxy_url=f"http://127.0.0.1:{env['BROKER_PROXY_PORT']}",
        admin_url=admin_url,
        tenants=tenants if tenants is not None else (),
        name=name,
        env=env,
        work_dir=work_dir,
    )
