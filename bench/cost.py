"""`python -m bench.cost`: what one proxied request costs, in-process and repeatable.

One process, one event loop (uvloop, as `broker serve` runs): a tiny asyncio upstream answering
~1 KB of JSON, the broker's proxy listener (`broker.server.serve`, `--tenants` active tenants on
a local store, 1 by default) and a raw-socket keep-alive client, whose requests take the tenants
in turn (as the bench's "rotating" case does). The client sends `--requests` requests over
`--connections` connections, after `--warmup` ones; the same run straight to the upstream
(`--mode direct`) is the baseline, so the broker's part is the difference.

- default: CPU µs and wall µs per request (`time.process_time`), and the median latency at one
  connection; noisy on shared cores, unlike
- `--callgrind`: the process run under `valgrind --tool=callgrind` twice per mode (two request
  counts), instructions per request = the difference of the totals ÷ the difference of the
  counts (start-up cancels out); the same whatever else the machine runs.
- `--cprofile`: cProfile over the measured requests, the functions' own-time shares.

With `--tenants N` the warm-up is at least N requests, so that every tenant was served once
(its first request builds what the broker keeps for it) before the measured ones; under
`--callgrind` the store is written once, outside valgrind, and shared by the runs.

py-spy: `py-spy record --format raw -o out.txt -- python -m bench.cost --requests 20000`, then
`bench.profile.summarise`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import cProfile
import io
import os
import pstats
import re
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

from bench.brokers import TENANT_HEADER, _preload, tenant_ids, write_callers
from bench.nginx import JSON_PATH

SCRATCH = "/dev/shm" if os.path.isdir("/dev/shm") else None  # the local store syncs writes
BODY = b'{"data": [' + b", ".join([b'{"id": "%05d", "status": "done"}' % i for i in range(32)])
BODY = BODY[:1020] + b"]}\n"
ANSWER = (
    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(BODY)
    + BODY
)


class UpstreamProtocol(asyncio.Protocol):
    """Answers every request head with `ANSWER` (GETs only: no body is expected)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        answers = self.buffer.count(b"\r\n\r\n")
        if answers:
            self.buffer = self.buffer.rpartition(b"\r\n\r\n")[2]
            self.transport.write(ANSWER * answers)


@dataclass
class Load:
    """The client's shared budget and what it measured."""

    total: int
    requests: list[bytes]  # taken in turn, one tenant each
    done: asyncio.Future[None]
    sent: int = 0
    answered: int = 0
    latencies: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)


class ClientProtocol(asyncio.Protocol):
    """One keep-alive connection sending the next request as soon as an answer is whole."""

    def __init__(self, load: Load) -> None:
        self.load = load
        self.buffer = b""
        self.sent_at = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        self._next()

    def _next(self) -> None:
        load = self.load
        if load.sent >= load.total:
            return
        requests = load.requests
        request = requests[load.sent % len(requests)]
        load.sent += 1
        self.sent_at = time.perf_counter()
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        head, sep, rest = self.buffer.partition(b"\r\n\r\n")
        if not sep:
            return
        match = re.search(rb"(?i)content-length: *(\d+)", head)
        length = int(match.group(1)) if match else 0
        if len(rest) < length:
            return
        self.buffer = rest[length:]
        load = self.load
        load.latencies.append(time.perf_counter() - self.sent_at)
        status = int(head[9:12])
        load.statuses[status] = load.statuses.get(status, 0) + 1
        load.answered += 1
        if load.answered >= load.total:
            if not load.done.done():
                load.done.set_result(None)
            return
        self._next()


async def drive(port: int, requests: list[bytes], total: int, connections: int) -> Load:
    """Send `total` requests (`requests` in turn) over `connections` keep-alive connections;
    wait for every answer."""
    loop = asyncio.get_running_loop()
    load = Load(total=total, requests=requests, done=loop.create_future())
    transports = []
    for _ in range(connections):
        transport, _ = await loop.create_connection(lambda: ClientProtocol(load), "127.0.0.1", port)
        transports.append(transport)
    await asyncio.wait_for(load.done, 60 + total / 100)  # under valgrind: ~150 requests a second
    for transport in transports:
        transport.close()
    return load


def request_for(host: str, tenant: str | None, token: str | None = None) -> bytes:
    lines = [f"GET {JSON_PATH} HTTP/1.1", f"Host: {host}", "Accept: application/json"]
    if tenant is not None:
        lines.append(f"{TENANT_HEADER}: {tenant}")
    if token is not None:
        lines.append(f"Proxy-Authorization: Bearer {token}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


@dataclass(frozen=True)
class Measured:
    requests: int
    cpu_us: float  # per request
    wall_us: float  # per request
    p50_us: float
    statuses: dict[int, int]


async def measure(
    port: int, requests: list[bytes], args: argparse.Namespace, profiler: cProfile.Profile | None
) -> Measured:
    warmup = max(args.warmup, len(requests)) if len(requests) > 1 else args.warmup
    if warmup:
        await drive(port, requests, warmup, args.connections)
    cpu, wall = time.process_time(), time.perf_counter()
    if profiler is not None:
        profiler.enable()
    load = await drive(port, requests, args.requests, args.connections)
    if profiler is not None:
        profiler.disable()
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    n = args.requests
    return Measured(
        n, 1e6 * cpu / n, 1e6 * wall / n, 1e6 * statistics.median(load.latencies), load.statuses
    )


async def with_upstream(body: Callable[[int], object]) -> object:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(UpstreamProtocol, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        result = body(port)
        if asyncio.iscoroutine(result):
            result = await result
        return result
    finally:
        server.close()


@contextlib.contextmanager
def tenant_store(args: argparse.Namespace) -> Iterator[tuple[Path, bytes]]:
    """The local store with `args.tenants` active tenants, and its master key: the one
    `--store` names (written by the parent of a `--callgrind` run), or a new one."""
    if args.store is not None:
        yield Path(args.store), base64.b64decode(os.environ["BENCH_COST_MASTER_KEY"])
        return
    with tempfile.TemporaryDirectory(dir=SCRATCH) as d:
        master_key = secrets.token_bytes(32)
        asyncio.run(_preload(Path(d) / "store", master_key, tenant_ids(args.tenants)))
        yield Path(d) / "store", master_key


async def run_broker(
    args: argparse.Namespace, profiler: cProfile.Profile | None, store: tuple[Path, bytes]
) -> Measured:
    """Serve the proxy (`args.tenants` active tenants) against the upstream and measure
    through it, the tenants taken in turn."""
    from broker.server import serve
    from broker.settings import Settings

    store_path, master_key = store
    callers_file, token = None, None
    if args.callers:  # a callers file of that many, the requests naming the one matching all
        callers_file = store_path.parent / "callers.yaml"
        token = write_callers(callers_file, args.callers)
    requests = [request_for("127.0.0.1", t, token) for t in tenant_ids(args.tenants)]

    async def through(upstream_port: int) -> Measured:
        settings = Settings(
            pleo_base_url=f"http://127.0.0.1:{upstream_port}",
            proxy_host="127.0.0.1",
            proxy_port=0,
            admin_host="127.0.0.1",
            admin_port=0,
            admin_token=secrets.token_urlsafe(24),
            store="local",
            store_path=store_path,
            master_key=base64.b64encode(master_key).decode(),
            log_level="WARNING",
            health_check_interval=0,
            callers_file=callers_file,
        )
        stop = asyncio.Event()
        ports: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        server = asyncio.ensure_future(
            serve(settings, stop=stop, started=lambda p, *_: ports.set_result(p))
        )
        proxy_port = await asyncio.wait_for(asyncio.shield(ports), 60)
        try:
            return await measure(proxy_port, requests, args, profiler)
        finally:
            stop.set()
            await server

    result = await with_upstream(through)
    assert isinstance(result, Measured)
    return result


async def run_direct(args: argparse.Namespace) -> Measured:
    async def direct(port: int) -> Measured:
        return await measure(port, [request_for("127.0.0.1", None)], args, None)

    result = await with_upstream(direct)
    assert isinstance(result, Measured)
    return result


def run_once(args: argparse.Namespace) -> Measured:
    import uvloop

    from broker.events import configure_logging

    configure_logging("WARNING")
    profiler = cProfile.Profile() if args.cprofile else None
    if args.mode == "broker":
        with tenant_store(args) as store:
            measured = uvloop.run(run_broker(args, profiler, store))
    else:
        measured = uvloop.run(run_direct(args))
    if profiler is not None:
        print(cprofile_table(profiler, args.requests, args.top))
        print(cprofile_areas(profiler, args.requests))
    return measured


# Where a function's own time is counted: the first area whose marker is in its file name.
AREAS = (
    ("bench/", "the bench's client and upstream"),
    ("broker/protocol.py", "listener protocol (broker/protocol.py, listener_cycle.py)"),
    ("broker/listener_cycle.py", "listener protocol (broker/protocol.py, listener_cycle.py)"),
    ("uvicorn/", "uvicorn (ASGI cycle, parser callbacks)"),
    ("broker/", "proxy app (broker/proxy, headers, policy, timing…)"),
    ("prometheus_client/", "metrics (prometheus_client)"),
    ("aiohttp/", "aiohttp (request to Pleo, its answer)"),
    ("yarl/", "aiohttp (request to Pleo, its answer)"),
    ("multidict/", "aiohttp (request to Pleo, its answer)"),
    ("asyncio/", "asyncio (tasks, events, timeouts)"),
)


def area_of(filename: str) -> str:
    for marker, area in AREAS:
        if marker in filename:
            return area
    return "other Python (stdlib…)"


def cprofile_areas(profiler: cProfile.Profile, requests: int) -> str:
    """Own time by area; a C function's (`~`) is split among its callers' areas."""
    stats = pstats.Stats(profiler, stream=io.StringIO()).stats  # type: ignore[attr-defined]
    areas: dict[str, float] = {}
    for (filename, _, _), (_, _, own, _, callers) in stats.items():
        if filename != "~" or not callers:
            area = area_of(filename)
            areas[area] = areas.get(area, 0.0) + own
            continue
        called = sum(c[2] for c in callers.values()) or 1.0
        for (caller_file, _, _), c in callers.items():
            area = area_of(caller_file)
            areas[area] = areas.get(area, 0.0) + own * c[2] / called
    total = sum(areas.values())
    lines = ["share   µs/req  area (cProfile own time; C calls counted to their callers)"]
    for area, own in sorted(areas.items(), key=lambda item: -item[1]):
        lines.append(f"{100 * own / total:5.1f}%  {1e6 * own / requests:6.1f}  {area}")
    return "\n".join(lines)


def cprofile_table(profiler: cProfile.Profile, requests: int, top: int) -> str:
    """Own time per function: share of all, and µs per request (cProfile's own clock)."""
    stats = pstats.Stats(profiler, stream=io.StringIO())
    rows = []
    total = 0.0
    for (filename, line, name), (_, calls, own, _cum, _) in stats.stats.items():  # type: ignore[attr-defined]
        total += own
        where = f"{Path(filename).parent.name}/{Path(filename).name}:{line}" if line else filename
        rows.append((own, calls, f"{name} ({where})"))
    rows.sort(reverse=True)
    lines = [f"cProfile, {requests} requests: own time {1e6 * total / requests:.0f} µs/request"]
    lines.append("share   µs/req  calls/req  function")
    for own, calls, label in rows[:top]:
        lines.append(
            f"{100 * own / total:5.1f}%  {1e6 * own / requests:6.1f}  {calls / requests:9.2f}"
            f"  {label}"
        )
    return "\n".join(lines)


# -- callgrind ------------------------------------------------------------------------------


def callgrind_total(
    mode: str, requests: int, args: argparse.Namespace, store: tuple[Path, bytes] | None = None
) -> int:
    """Instructions the whole process executed for `requests` requests (after the warm-up),
    the broker's tenants in `store` (written outside valgrind)."""
    with tempfile.TemporaryDirectory() as d:
        argv = [
            "valgrind",
            "--tool=callgrind",
            f"--callgrind-out-file={d}/callgrind.out",
            sys.executable,
            "-m",
            "bench.cost",
            "--mode",
            mode,
            "--requests",
            str(requests),
            "--warmup",
            str(args.warmup),
            "--connections",
            str(args.connections),
            "--tenants",
            str(args.tenants),
            "--callers",
            str(args.callers),
        ]
        env = {**os.environ, "PYTHONHASHSEED": "0"}
        if store is not None:
            argv += ["--store", str(store[0])]
            env["BENCH_COST_MASTER_KEY"] = base64.b64encode(store[1]).decode()
        done = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
        match = re.search(r"Collected : (\d+)", done.stderr)
        if done.returncode != 0 or match is None:
            raise RuntimeError(f"callgrind run failed:\n{done.stdout}\n{done.stderr[-2000:]}")
        return int(match.group(1))


def callgrind(args: argparse.Namespace) -> None:
    small, large = args.requests // 4, args.requests
    per: dict[str, float] = {}
    with tenant_store(args) as store:
        for mode in ("direct", "broker"):
            low = callgrind_total(mode, small, args, store)
            high = callgrind_total(mode, large, args, store)
            per[mode] = (high - low) / (large - small)
            print(
                f"{mode:7} {per[mode]:10,.0f} instructions/request ({small} vs {large} requests,"
                f" {args.tenants} tenant{'s' if args.tenants > 1 else ''})"
            )
    print(f"broker part: {per['broker'] - per['direct']:,.0f} instructions/request")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.cost", description=__doc__)
    parser.add_argument("--mode", choices=("broker", "direct", "both"), default="both")
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--warmup", type=int, default=500)
    parser.add_argument("--connections", type=int, default=1)
    parser.add_argument(
        "--tenants", type=int, default=1, help="active tenants, taken in turn (default 1)"
    )
    parser.add_argument(
        "--callers", type=int, default=0, help="callers in a callers file (default: none)"
    )
    parser.add_argument("--store", help=argparse.SUPPRESS)  # a `--callgrind` run's, written once
    parser.add_argument("--cprofile", action="store_true")
    parser.add_argument("--callgrind", action="store_true")
    parser.add_argument("--top", type=int, default=40)
    args = parser.parse_args(argv)
    if args.callgrind:
        callgrind(args)
        return
    modes = ("direct", "broker") if args.mode == "both" else (args.mode,)
    results = {}
    for mode in modes:
        args.mode = mode
        results[mode] = m = run_once(args)
        print(
            f"{mode:7} {m.requests} requests, {args.connections} conns: {m.cpu_us:7.1f} CPU µs/req"
            f"  {m.wall_us:7.1f} wall µs/req  p50 {m.p50_us:7.1f} µs  statuses {m.statuses}"
        )
    if len(results) == 2:
        d, b = results["direct"], results["broker"]
        print(
            f"broker part: {b.cpu_us - d.cpu_us:.1f} CPU µs/req, +{b.p50_us - d.p50_us:.1f} µs p50"
        )


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
