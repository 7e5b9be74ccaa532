"""The benchmark's course: start everything, load it in interleaved rounds, report, clean up."""

from __future__ import annotations

import argparse
import base64
import os
import platform
import secrets
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from bench import load, nginx, profile, report, transfer
from bench.brokers import TENANT_HEADER, RunningBroker, start_broker
from bench.processes import (
    BenchError,
    Supervisor,
    child_pids,
    cpu_seconds,
    free_port,
    http_status,
    process_memory,
    sigterm_as_interrupt,
    wait_until,
)

RESULTS = Path(__file__).resolve().parent / "results"
JSON_BODY_SIZE = 1024


@dataclass(frozen=True)
class Config:
    """One thing to load: a name, a target, and the pid whose CPU time it costs."""

    name: str
    target: load.Target
    pid: int | None


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per load run (5)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (3)")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of warm-up (1)")
    parser.add_argument("--tenants", type=int, default=10_000, help="tenants for the big case")
    parser.add_argument(
        "--callers", type=int, default=1_000, help="callers in the callers-file case (1000)"
    )
    parser.add_argument(
        "--only-callers",
        action="store_true",
        help="only the throughput of the 1-tenant broker with and without a callers file",
    )
    parser.add_argument(
        "--connections", type=int, nargs="+", default=[1, 32], help="connection counts (1 32)"
    )
    parser.add_argument("--threads", type=int, default=2, help="wrk threads at most (2)")
    parser.add_argument("--transfer-mb", type=int, default=50, help="upload/download size (50)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    parser.add_argument("--no-nginx", action="store_true", help="use the asyncio upstream")
    parser.add_argument("--no-wrk", action="store_true", help="use the Python load generator")
    parser.add_argument("--check", action="store_true", help="exit 1 if a target is missed")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="only sample the 1-tenant broker with py-spy under load (for --duration s)",
    )
    args = parser.parse_args(argv)
    if args.duration <= 0 or args.rounds < 1 or args.tenants < 1 or args.transfer_mb < 1:
        parser.error("duration, rounds, tenants and transfer size must be positive")
    if not 0 < max(args.duration, args.warmup) <= 120:
        parser.error("a load run lasts at most 120 s")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; print and write the results."""
    args = parse_args(argv)
    try:
        with (
            sigterm_as_interrupt(),
            tempfile.TemporaryDirectory(prefix="broker-bench-") as tmp,
            Supervisor() as supervisor,
        ):
            result = run(args, Path(tmp), supervisor)
    except KeyboardInterrupt:
        print("bench: interrupted; every process it started is stopped", file=sys.stderr)
        return 130
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    if result is None:
        return 0
    header = _header(args, result.settings)
    json_path, md_path = report.write(result, args.out, header)
    print()
    print(header)
    print()
    print("\n".join(report.table_lines(result)))
    print(f"\nwritten: {json_path} and {md_path}")
    return 1 if args.check and not result.passed else 0


def _say(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def _header(args: argparse.Namespace, settings: Mapping[str, object]) -> str:
    return (
        f"Measured {settings['when']} on {settings['cpus']} CPUs (load generator, upstream and"
        f" proxy share them): {settings['load_tool']} -d{args.duration:g}s, median of"
        f" {args.rounds} interleaved rounds; upstream {settings['upstream']} serving"
        f" {JSON_BODY_SIZE} B of JSON."
    )


def run(args: argparse.Namespace, tmp: Path, supervisor: Supervisor) -> report.Report | None:
    """The whole benchmark (or, with --profile, only the profile); None when profiling."""
    data = tmp / "data"
    (data / "uploads").mkdir(parents=True)
    json_body = sample_json(JSON_BODY_SIZE)
    (data / "export-jobs.json").write_bytes(json_body)
    transfer_size = args.transfer_mb * 1024 * 1024
    with (data / "download.bin").open("wb") as sparse:
        sparse.truncate(transfer_size)

    use_nginx = not args.no_nginx and nginx.find_nginx() is not None
    wrk = None if args.no_wrk else load.find_wrk()
    upstream_port = free_port()
    upstream_url = f"http://127.0.0.1:{upstream_port}"
    upstream = _start_upstream(supervisor, tmp, data, upstream_port, use_nginx)
    _say(f"upstream ({'nginx' if use_nginx else 'asyncio'}) on {upstream_url}")

    configs = [Config(report.DIRECT, load.Target(upstream_url + nginx.JSON_PATH), upstream)]
    if use_nginx:
        key = secrets.token_urlsafe(32)
        authorization = "Basic " + base64.b64encode(f"{key}:".encode()).decode()
        for name, keepalive in ((report.NGINX, False), (report.NGINX_KEEPALIVE, True)):
            proxy_port = free_port()
            layout = nginx.Layout(tmp / ("nginx-proxy-keepalive" if keepalive else "nginx-proxy"))
            layout.prefix.mkdir()
            conf = nginx.proxy_conf(
                layout, proxy_port, upstream_port, authorization, keepalive=keepalive
            )
            argv = nginx.prepare(layout, conf)
            master = supervisor.start(name, argv, log=layout.prefix / "stdout.log")
            proxy_url = f"http://127.0.0.1:{proxy_port}"
            _wait_http(supervisor, proxy_url + nginx.JSON_PATH, name, layout.error_log)
            configs.append(
                Config(name, load.Target(proxy_url + nginx.JSON_PATH), _worker(master.pid))
            )

    one, many, guarded = _start_brokers(args, tmp, supervisor, upstream_url)
    callers_target = _broker_target(guarded, guarded.tenants[0])
    callers_config = Config(
        report.BROKER_CALLERS,
        load.Target(
            callers_target.url,
            headers=(
                *callers_target.headers,
                ("Proxy-Authorization", f"Bearer {guarded.caller_token}"),
            ),
        ),
        guarded.pid,
    )
    configs += [
        Config(report.BROKER_ONE, _broker_target(one, one.tenants[0]), one.pid),
        Config(report.BROKER_MANY, _broker_target(many, many.tenants[0]), many.pid),
    ]
    spread = Config(
        report.BROKER_SPREAD,
        load.Target(
            many.proxy_url + nginx.JSON_PATH,
            rotate_header=TENANT_HEADER,
            rotate_values=many.tenants,
        ),
        many.pid,
    )
    _expect_bodies([*configs, spread, callers_config], json_body)

    high = max(args.connections)
    plan = [(c, n) for c in configs for n in args.connections]
    plan.append((spread, high))
    plan = _callers_plan(args, plan, callers_config, high)
    runner = _runner(args, wrk, tmp)
    if args.profile:
        broker_config = next(c for c in configs if c.name == report.BROKER_ONE)
        _profile(args, supervisor, runner, broker_config, high)
        return None
    _say(f"warm-up, then {args.rounds} rounds of {len(plan)} runs of {args.duration:g} s")
    for config, _ in plan:
        runner(config.target, high, args.warmup)
    results: dict[tuple[str, int], list[load.LoadResult]] = {}
    cpu: dict[tuple[str, int], list[float]] = {}
    for round_no in range(args.rounds):
        shift = round_no * max(1, len(plan) // args.rounds)
        for config, connections in plan[shift:] + plan[:shift]:
            supervisor.check_alive()
            before = cpu_seconds(config.pid) if config.pid else 0.0
            result = runner(config.target, connections, args.duration)
            if config.pid and result.requests:
                spent = cpu_seconds(config.pid) - before
                cpu.setdefault((config.name, connections), []).append(spent / result.requests * 1e6)
            results.setdefault((config.name, connections), []).append(result)
            _say(
                f"round {round_no + 1}: {config.name} @ {connections}:"
                f" {result.rps:,.0f} req/s, p50 {result.p50_ms:.3f} ms, failed {result.failed}"
            )

    rows = [
        report.Row(
            c.name,
            n,
            tuple(results[(c.name, n)]),
            _median(cpu.get((c.name, n))),
        )
        for c, n in plan
    ]

    if args.only_callers:
        _print_rows(rows)
        return None
    _say(f"{args.transfer_mb} MB upload and download through {report.BROKER_ONE}")
    path = "/v2/export-jobs/upload-1/items"
    through = transfer.Through(one.proxy_url, TENANT_HEADER, one.tenants[0], one.pid)
    up = transfer.upload(through, path, transfer_size, data / "uploads" / path.lstrip("/"))
    down = transfer.download(through, nginx.DOWNLOAD_PATH, transfer_size)
    rss_one, hwm_one = process_memory(one.pid)
    rss_many, hwm_many = process_memory(many.pid)
    memory = report.Memory(
        rss_one_mib=rss_one,
        hwm_one_mib=hwm_one,
        rss_many_mib=rss_many,
        hwm_many_mib=hwm_many,
        transfer_growth_mib={t.direction: t.growth_mib for t in (up, down)},
        transfers_ok=up.ok and down.ok,
    )
    settings: dict[str, object] = {
        "when": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "load_tool": _version([wrk, "-v"]) if wrk else "python load generator",
        "upstream": _version([nginx.find_nginx() or "nginx", "-v"]) if use_nginx else "asyncio",
        "duration_s": args.duration,
        "rounds": args.rounds,
        "tenants": args.tenants,
        "connections": args.connections,
        "transfer_mb": args.transfer_mb,
    }
    transfers = [
        {**asdict(t), "growth_mib": round(t.growth_mib, 2), "ok": t.ok} for t in (up, down)
    ]
    return report.Report(
        rows=rows,
        memory=memory,
        checks=report.evaluate(rows, memory, high),
        settings=settings,
        transfers=transfers,
    )


def _profile(
    args: argparse.Namespace,
    supervisor: Supervisor,
    runner: Callable[[load.Target, int, float], load.LoadResult],
    config: Config,
    connections: int,
) -> None:
    py_spy = profile.find_py_spy()
    if py_spy is None or config.pid is None:
        raise BenchError("--profile needs py-spy (pip install py-spy)")
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / "profile.txt"
    runner(config.target, connections, args.warmup)
    profile.start(supervisor, py_spy, config.pid, args.duration, out)
    result = runner(config.target, connections, args.duration)
    profile.wait(supervisor, args.duration)
    lines = [
        f"{config.name} @ {connections} conns under py-spy: {result.rps:,.0f} req/s,"
        f" p50 {result.p50_ms:.3f} ms",
        *profile.summarise(out.read_text() if out.exists() else ""),
    ]
    (args.out / "profile-summary.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"\nwritten: {out} (collapsed stacks) and {args.out / 'profile-summary.txt'}")


def sample_json(size: int) -> bytes:
    """A JSON document of exactly `size` bytes, shaped like a page of export jobs."""
    head = b'{"data":[{"id":"5f8b7c2e-0d7a-4d3e-9a59-6a1c2b3d4e5f","status":"completed","note":"'
    tail = b'"}],"pagination":{"hasNextPage":false,"totalCount":1}}'
    if size < len(head) + len(tail):
        raise ValueError("too small for the sample document")
    return head + b"x" * (size - len(head) - len(tail)) + tail


def _start_upstream(
    supervisor: Supervisor, tmp: Path, data: Path, port: int, use_nginx: bool
) -> int:
    url = f"http://127.0.0.1:{port}{nginx.JSON_PATH}"
    if use_nginx:
        layout = nginx.Layout(tmp / "nginx-upstream")
        layout.prefix.mkdir()
        argv = nginx.prepare(layout, nginx.upstream_conf(layout, port, data))
        master = supervisor.start("nginx upstream", argv, log=layout.prefix / "stdout.log")
        _wait_http(supervisor, url, "nginx upstream", layout.error_log)
        return _worker(master.pid)
    argv = [sys.executable, "-m", "bench.upstream", "--port", str(port), "--dir", str(data)]
    child = supervisor.start("asyncio upstream", argv, log=tmp / "upstream.log")
    _wait_http(supervisor, url, "asyncio upstream")
    return child.pid


def _worker(master: int) -> int:
    """nginx's single worker (where the CPU goes), else the master itself."""
    workers = child_pids(master)
    return workers[0] if workers else master


def _wait_http(supervisor: Supervisor, url: str, what: str, log: Path | None = None) -> None:
    try:
        wait_until(
            lambda: http_status(url) == 200, what=what, timeout=15, alive=supervisor.check_alive
        )
    except BenchError as exc:
        if log is None or not log.exists():
            raise
        raise BenchError(f"{exc}\n{log.read_text(errors='replace')[-800:]}") from None


def _start_brokers(
    args: argparse.Namespace, tmp: Path, supervisor: Supervisor, upstream_url: str
) -> list[RunningBroker]:
    """The 1-tenant broker, the many-tenant one (1 tenant with --only-callers), and the
    1-tenant one with a callers file."""
    brokers: list[RunningBroker] = []
    for name, count, callers in (
        ("broker-1", 1, 0),
        ("broker-many", 1 if args.only_callers else args.tenants, 0),
        ("broker-callers", 1, args.callers),
    ):
        started = time.monotonic()
        work = tmp / name
        work.mkdir()
        running = start_broker(
            supervisor,
            name=name,
            work_dir=work,
            upstream_url=upstream_url,
            tenants=count,
            callers=callers,
        )
        brokers.append(running)
        _say(f"{name}: {count} tenants loaded and serving in {time.monotonic() - started:.1f} s")
    return brokers


def _print_rows(rows: Sequence[report.Row]) -> None:
    for row in rows:
        spent = row.cpu_us_per_request
        print(
            f"| {row.name} | {row.connections} | {row.rps:,.0f} req/s | p50 {row.p50_ms:.3f}"
            f" ms | {'–' if spent is None else f'{spent:.0f}'} CPU µs/req |"
        )


def _callers_plan(
    args: argparse.Namespace, plan: list[tuple[Config, int]], callers: Config, high: int
) -> list[tuple[Config, int]]:
    """The plan with the callers case added; with --only-callers, it and the 1-tenant case."""
    if args.only_callers:
        return [(c, n) for c, n in plan if c.name == report.BROKER_ONE and n == high] + [
            (callers, high)
        ]
    return [*plan, (callers, high)]


def _broker_target(broker: RunningBroker, tenant: str) -> load.Target:
    return load.Target(broker.proxy_url + nginx.JSON_PATH, headers=((TENANT_HEADER, tenant),))


def _expect_bodies(configs: Sequence[Config], body: bytes) -> None:
    for config in configs:
        _expect_body(config.target, body)


def _expect_body(target: load.Target, body: bytes) -> None:
    """One request through the target answers 200 with the upstream's body, or BenchError."""
    headers = dict(target.headers)
    if target.rotate_header is not None:
        headers[target.rotate_header] = target.rotate_values[-1]
    request = urllib.request.Request(target.url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            got = response.read()
            status = response.status
    except OSError as exc:
        raise BenchError(f"{target.url} did not answer 200: {exc}") from exc
    if status != 200 or got != body:
        raise BenchError(f"{target.url} answered {status} with a different body")


def _runner(
    args: argparse.Namespace, wrk: str | None, tmp: Path
) -> Callable[[load.Target, int, float], load.LoadResult]:
    def run_once(target: load.Target, connections: int, duration: float) -> load.LoadResult:
        if wrk is None:
            return load.run_python(target, connections=connections, duration=duration)
        return load.run_wrk(
            wrk,
            target,
            connections=connections,
            threads=args.threads,
            duration=duration,
            work_dir=tmp,
        )

    return run_once


def _median(values: list[float] | None) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def _version(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=5, check=False)
    except OSError:
        return argv[0]
    text = (done.stdout or done.stderr).strip().splitlines()
    return text[0].removeprefix("nginx version: ").split(" Copyright")[0] if text else argv[0]
