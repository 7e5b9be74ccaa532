"""The benchmark's own pieces: configuration, output parsing, the maths of the report.

Nothing here is timed; speed is measured by `make bench`, never asserted in a test.
"""

from __future__ import annotations

import http.server
import importlib.util
import json
import os
import subprocess
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest

from bench import load, nginx, report
from bench.brokers import broker_env, compile_bytecode, restart_broker, start_broker, tenant_ids
from bench.processes import Supervisor
from bench.run import parse_args, sample_json, warmup_seconds

WRK_OUTPUT = """\
Running 5s test @ http://127.0.0.1:8080/v3/export-jobs
  2 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     4.21ms    1.02ms  30.10ms   91.20%
    Req/Sec     3.80k   210.33     4.10k    70.00%
  Latency Distribution
     50%    4.05ms
     75%    4.40ms
     90%    5.10ms
     99%   12.30ms
  37869 requests in 5.00s, 45.10MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 4
Requests/sec:   7573.80
Transfer/sec:      9.02MB
"""


def test_wrk_output_is_parsed_with_failures_counted() -> None:
    result = load.parse_wrk(WRK_OUTPUT)
    assert result == load.LoadResult(
        requests=37869, seconds=5.0, rps=7573.80, p50_ms=4.05, p99_ms=12.30, failed=7
    )


def test_clean_wrk_output_has_no_failures() -> None:
    clean = "\n".join(
        line for line in WRK_OUTPUT.splitlines() if "errors" not in line and "Non-2xx" not in line
    )
    assert load.parse_wrk(clean).failed == 0


def test_wrk_output_without_latency_is_refused() -> None:
    with pytest.raises(ValueError, match="latency"):
        load.parse_wrk("Requests/sec: 10\n  5 requests in 1.00s, 1KB read\n")


@pytest.mark.parametrize(
    ("text", "ms"), [("85.00us", 0.085), ("1.20ms", 1.2), ("2.00s", 2000.0), ("1.00m", 60000.0)]
)
def test_wrk_durations_become_milliseconds(text: str, ms: float) -> None:
    assert load.to_ms(text) == pytest.approx(ms)


def test_wrk_command_line_is_bounded_and_local() -> None:
    target = load.Target("http://127.0.0.1:9/v3/export-jobs", headers=(("X-Broker-Tenant", "t"),))
    argv = load.wrk_argv("wrk", target, connections=1, threads=2, duration=5)
    assert argv == [
        "wrk",
        "-c1",
        "-t1",
        "-d5s",
        "--latency",
        "--timeout",
        "5s",
        "-H",
        "X-Broker-Tenant: t",
        "http://127.0.0.1:9/v3/export-jobs",
    ]
    with pytest.raises(ValueError, match=r"127\.0\.0\.1"):
        load.wrk_argv(
            "wrk", load.Target("http://example.com/"), connections=1, threads=1, duration=1
        )


def test_rotation_script_names_every_tenant_and_refuses_odd_input() -> None:
    script = load.rotation_script("X-Broker-Tenant", ["tenant-00000", "tenant-00001"], "/v3/x")
    assert '"tenant-00000"' in script and '"tenant-00001"' in script
    assert (
        'wrk.format("GET", "/v3/x", {["X-Broker-Tenant"] = value, ["X-Bench-Slot"] = slot})'
        in script
    )
    with pytest.raises(ValueError):
        load.rotation_script("X-Broker-Tenant", ['a"; os.exit()'], "/v3/x")
    with pytest.raises(ValueError):
        load.rotation_script("X Tenant", ["a"], "/v3/x")


def test_summary_of_latencies() -> None:
    latencies = [0.001] * 98 + [0.010, 0.020]
    result = load.summarise(latencies, elapsed=2.0, failed=0)
    assert result.requests == 100
    assert result.rps == 50.0
    assert result.p50_ms == pytest.approx(1.0)
    assert result.p99_ms == pytest.approx(20.0)


def test_the_broker_runs_from_bytecode_compiled_for_oo_as_the_image_does(tmp_path: Path) -> None:
    # The image compiles its bytecode for -OO at build and runs with it (Dockerfile); a broker
    # started from source with PYTHONDONTWRITEBYTECODE set would compile every module at each
    # start instead.
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    for name in ("__init__.py", "mod.py", "sub/__init__.py", "sub/inner.py"):
        (package / name).write_text("VALUE = 1\n")
    assert compile_bytecode(package, libraries=False) == []
    sources = sorted(package.rglob("*.py"))
    assert len(sources) == 4
    compiled = [Path(importlib.util.cache_from_source(str(s), optimization=2)) for s in sources]
    assert [str(path) for path in compiled if not path.is_file()] == []
    env = broker_env(
        upstream_url="http://127.0.0.1:1",
        store_path=tmp_path / "store",
        master_key=bytes(32),
        proxy_port=1,
        admin_port=2,
    )
    assert env["PYTHONOPTIMIZE"] == "2"


def test_tenant_ids_are_valid_and_distinct() -> None:
    ids = tenant_ids(10_000)
    assert len(set(ids)) == 10_000
    assert ids[0] == "tenant-00000" and ids[-1] == "tenant-09999"


def test_sample_json_has_the_requested_size() -> None:
    body = sample_json(1024)
    assert len(body) == 1024
    assert json.loads(body)["pagination"]["totalCount"] == 1


def test_nginx_configs_keep_everything_in_their_prefix(tmp_path: Path) -> None:
    layout = nginx.Layout(tmp_path / "up")
    upstream = nginx.upstream_conf(layout, 8123, tmp_path / "data")
    assert "listen 127.0.0.1:8123" in upstream
    assert f"pid {layout.pid_file};" in upstream
    assert "daemon off;" in upstream and "worker_processes 1;" in upstream
    assert "dav_methods PUT;" in upstream and "client_max_body_size 0;" in upstream
    assert f"location = {nginx.JSON_PATH}" in upstream
    for line in upstream.splitlines():
        if line.strip().endswith("_temp_path " + line.strip().split()[-1]):
            assert str(tmp_path) in line
    for keepalive in (False, True):
        proxy = nginx.proxy_conf(layout, 8124, 8123, "Basic abc=", keepalive=keepalive)
        assert "server 127.0.0.1:8123;" in proxy
        assert 'proxy_set_header Authorization "Basic abc=";' in proxy
        assert ("keepalive 256;" in proxy) is keepalive
        assert ("proxy_http_version 1.1;" in proxy) is keepalive


@pytest.mark.real  # nginx
@pytest.mark.skipif(nginx.find_nginx() is None, reason="nginx is not installed")
def test_nginx_accepts_the_generated_configs(tmp_path: Path) -> None:
    for name in ("up", "proxy", "proxy-keepalive"):
        layout = nginx.Layout(tmp_path / name)
        layout.prefix.mkdir()
        conf = (
            nginx.upstream_conf(layout, 8123, tmp_path)
            if name == "up"
            else nginx.proxy_conf(
                layout, 8124, 8123, "Basic abc=", keepalive=name.endswith("keepalive")
            )
        )
        argv = nginx.prepare(layout, conf)
        done = subprocess.run([*argv, "-t"], capture_output=True, text=True, timeout=10)
        assert done.returncode == 0, done.stderr


def _row(name: str, connections: int, rps: list[float], p50: float = 1.0) -> report.Row:
    return report.Row(
        name,
        connections,
        tuple(load.LoadResult(100, 1.0, r, p50, p50 * 2, 0) for r in rps),
    )


def _memory(**changes: object) -> report.Memory:
    values: dict[str, object] = {
        "rss_one_mib": 50.0,
        "hwm_one_mib": 60.0,
        "rss_many_mib": 90.0,
        "hwm_many_mib": 100.0,
        "transfer_growth_mib": {"upload": 3.0, "download": 5.0},
        "transfers_ok": True,
    }
    values.update(changes)
    return report.Memory(**values)  # type: ignore[arg-type]


ROWS = [
    _row(report.DIRECT, 1, [10_000, 11_000, 9_000], p50=0.085),
    _row(report.NGINX, 32, [40_000, 41_000, 39_000]),
    _row(report.NGINX_KEEPALIVE, 32, [60_000]),
    _row(report.BROKER_ONE, 1, [2_600], p50=0.40),
    _row(report.BROKER_ONE, 32, [6_000, 5_000, 7_000]),
    _row(report.BROKER_MANY, 32, [5_700]),
    _row(report.BROKER_SPREAD, 32, [5_500]),
]


def test_rows_take_the_median_of_rounds() -> None:
    assert ROWS[1].rps == 40_000
    assert ROWS[4].rps == 6_000


STARTUP = report.Startup(
    idle_seconds=0.6,
    idle_rss_mib=40.0,
    many_local_seconds=3.0,
    many_local_rss_mib=110.0,
    many_openbao_seconds=30.0,
)


def _cpu(row: report.Row, us: float) -> report.Row:
    return report.Row(row.name, row.connections, row.rounds, us)


FAST = [*ROWS[:4], _cpu(ROWS[4], 90.0), _row(report.BROKER_MANY, 32, [5_800])]
FAST += [_row(report.BROKER_SPREAD, 32, [5_900]), _row(report.BROKER_CALLERS, 32, [5_800])]


def test_every_figure_of_the_second_round_is_computed_from_what_was_measured() -> None:
    checks = {c.name: c for c in report.evaluate(FAST, _memory(), startup=STARTUP)}
    assert checks["idle RSS after start, local store, 0 tenants"].value == 40.0
    assert checks["start to /readyz 200, local store, 0 tenants"].value == 0.6
    assert checks["CPU per proxied request at 32 conns, full policy"].value == 90.0
    strict = checks["throughput at 32 conns, broker / nginx proxy with upstream keep-alive"]
    assert strict.value == pytest.approx(6_000 / 60_000) and strict.passed is False
    added = checks["added p50 at 1 conn, broker − direct"]
    assert added.value == pytest.approx(0.315) and added.passed is False
    assert checks["peak RSS with 50k tenants (VmHWM)"].value == 100.0
    assert checks["start to /readyz 200 with 50k tenants, local store"].passed
    assert checks["start to /readyz 200 with 50k tenants, OpenBao"].passed
    tenants = checks[TENANTS]
    assert tenants.value == pytest.approx(5_800 / 6_000) and tenants.passed
    default = checks["throughput at 32 conns, broker / nginx proxy"]
    assert default.value == pytest.approx(6_000 / 40_000) and default.passed
    assert checks["failed requests"].value == 0 and checks["failed requests"].passed
    callers = checks["throughput at 32 conns, 1,000 callers / no callers file"]
    assert callers.value == pytest.approx(5_800 / 6_000) and callers.passed
    assert len(checks) == 13


TENANTS = "throughput at 32 conns, 50k tenants / 1 tenant (worst of fixed, rotating)"


def test_rotating_tenants_are_compared_with_one_tenant_under_the_same_load_script() -> None:
    """wrk's rotation script, its table of formatted requests as long as the tenants are
    many, costs the broker it shares two cores with: the rotating run is compared with one
    tenant through the same script, the fixed run with one tenant under plain wrk."""
    scripted = [*FAST, _row(report.BROKER_ONE_ROTATING, 32, [5_000])]
    checks = {c.name: c for c in report.evaluate(scripted, _memory(), startup=STARTUP)}
    # fixed: 5,800 / 6,000; rotating: 5,900 / 5,000
    assert checks[TENANTS].value == pytest.approx(5_800 / 6_000)
    slow_spread = [*scripted[:-3], _row(report.BROKER_SPREAD, 32, [4_500]), *scripted[-2:]]
    checks = {c.name: c for c in report.evaluate(slow_spread, _memory(), startup=STARTUP)}
    assert checks[TENANTS].value == pytest.approx(4_500 / 5_000)


def test_a_missed_target_fails_the_report() -> None:
    slow = [*ROWS[:4], _row(report.BROKER_ONE, 32, [4_000]), *ROWS[5:]]
    checks = report.evaluate(slow, _memory(hwm_many_mib=160.0), startup=STARTUP)
    failed = {c.name for c in checks if c.passed is False}
    assert "throughput at 32 conns, broker / nginx proxy" in failed
    assert "peak RSS with 50k tenants (VmHWM)" in failed
    assert "CPU per proxied request at 32 conns, full policy" not in failed  # not measured
    assert not report.Report(slow, _memory(), checks).passed


def test_slow_starts_and_a_fat_idle_broker_fail() -> None:
    heavy = report.Startup(idle_seconds=1.7, idle_rss_mib=70.0, many_openbao_seconds=61.0)
    checks = {c.name: c for c in report.evaluate(FAST, _memory(), startup=heavy)}
    assert checks["idle RSS after start, local store, 0 tenants"].passed is False
    assert checks["start to /readyz 200, local store, 0 tenants"].passed is False
    assert checks["start to /readyz 200 with 50k tenants, OpenBao"].passed is False
    assert checks["start to /readyz 200 with 50k tenants, local store"].verdict == "n/a"


def test_a_broken_transfer_counts_as_failure() -> None:
    checks = report.evaluate(ROWS, _memory(transfers_ok=False))
    by_name = {c.name: c for c in checks}
    assert by_name["failed requests"].value == 1 and by_name["failed requests"].passed is False
    assert by_name["RSS growth during a 50 MB upload / download (worst)"].passed is False


def test_parts_left_out_are_not_applicable_and_do_not_fail() -> None:
    rows = [r for r in FAST if r.name not in (report.NGINX, report.NGINX_KEEPALIVE)]
    checks = report.evaluate(rows, None, tenants=10_000)
    by_name = {c.name: c for c in checks}
    assert by_name["throughput at 32 conns, broker / nginx proxy"].verdict == "n/a"
    assert by_name["idle RSS after start, local store, 0 tenants"].verdict == "n/a"
    assert by_name["start to /readyz 200 with 10k tenants, OpenBao"].verdict == "n/a"
    assert by_name["RSS growth during a 50 MB upload / download (worst)"].verdict == "n/a"
    assert {c.name for c in checks if c.passed is False} == {
        "added p50 at 1 conn, broker − direct"  # measured: 0.315 ms
    }


def test_results_are_written_as_json_and_markdown(tmp_path: Path) -> None:
    checks = report.evaluate(FAST, _memory(), startup=STARTUP)
    result = report.Report(FAST, _memory(), checks, {"rounds": 3}, startup=STARTUP)
    json_path, md_path = report.write(result, tmp_path, "header")
    written = json.loads(json_path.read_text())
    assert written["passed"] is False  # the keep-alive ratio and the added p50 miss
    assert written["configurations"][1]["rps"] == 40_000
    assert written["startup"]["idle_rss_mib"] == 40.0
    assert [c["passed"] for c in written["checks"]].count(True) == 11
    markdown = md_path.read_text()
    assert markdown.startswith("header\n")
    assert "| nginx proxy (+Authorization) | 32 | 40,000 |" in markdown
    assert "| idle RSS after start, local store, 0 tenants | 40.0 MiB | ≤ 45 | pass |" in markdown
    assert markdown.count("| pass |") == 11 and markdown.count("| FAIL |") == 2


def test_arguments_are_bounded() -> None:
    args = parse_args(["--duration", "2", "--rounds", "1"])
    assert (args.duration, args.rounds, args.connections) == (2.0, 1, [1, 32])
    with pytest.raises(SystemExit):
        parse_args(["--duration", "0"])
    with pytest.raises(SystemExit):
        parse_args(["--duration", "600"])


def test_quick_mode_runs_short_and_parts_can_be_chosen() -> None:
    quick = parse_args(["--quick"])
    assert (quick.duration, quick.rounds, quick.start_rounds) == (2.0, 1, 1)
    assert quick.parts == ["startup", "load"]
    assert parse_args(["--quick", "--parts", "openbao"]).parts == ["openbao"]
    assert parse_args([]).parts == ["startup", "load", "transfer", "openbao"]
    assert parse_args([]).tenants == 50_000
    with pytest.raises(SystemExit):
        parse_args(["--parts", "everything"])


def test_a_callers_file_slower_by_more_than_5_percent_fails() -> None:
    slow = [*FAST[:-1], _row(report.BROKER_CALLERS, 32, [5_600])]
    checks = {c.name: c for c in report.evaluate(slow, _memory(), startup=STARTUP)}
    assert checks["throughput at 32 conns, 1,000 callers / no callers file"].passed is False


def test_the_bench_callers_file_is_valid_and_its_token_allows_every_tenant(
    tmp_path: Path,
) -> None:
    from bench.brokers import write_callers
    from broker.callers import load_callers

    token = write_callers(tmp_path / "callers.yaml", 1000)
    table = load_callers(tmp_path / "callers.yaml")
    assert len(table) == 1000
    caller = table.identify(f"Bearer {token}".encode())
    assert caller.allows_tenant("tenant-00000")


def test_a_run_regenerates_the_results_block_of_a_document(tmp_path: Path) -> None:
    checks = report.evaluate(FAST, _memory(), startup=STARTUP)
    result = report.Report(FAST, _memory(), checks, {"rounds": 3}, startup=STARTUP)
    readme = tmp_path / "README.md"
    readme.write_text(
        f"# Title\n\n## Performance\n\nProse.\n\n{report.BEGIN_MARK}\nold table\n"
        f"{report.END_MARK}\n\n## After\n"
    )
    report.update_document(readme, "Measured now.", result)
    text = readme.read_text()
    assert text.startswith("# Title\n\n## Performance\n\nProse.\n\n")
    assert text.endswith(f"{report.END_MARK}\n\n## After\n")
    assert "old table" not in text
    assert f"{report.BEGIN_MARK}\nMeasured now.\n\n| configuration |" in text
    assert "| idle RSS after start, local store, 0 tenants | 40.0 MiB | ≤ 45 | pass |" in text
    assert text.count(report.BEGIN_MARK) == text.count(report.END_MARK) == 1


def test_a_document_without_a_results_block_is_refused_before_the_run(tmp_path: Path) -> None:
    plain = tmp_path / "plain.md"
    plain.write_text("# No block here\n")
    with pytest.raises(SystemExit):
        parse_args(["--update", str(plain)])
    with pytest.raises(SystemExit):
        parse_args(["--update", str(tmp_path / "missing.md")])
    readme = Path(__file__).resolve().parents[1] / "README.md"
    assert parse_args(["--update", str(readme)]).update == [readme]
    with pytest.raises(ValueError, match="no single block to regenerate"):
        report.update_document(plain, "header", report.Report(FAST, _memory(), [], {}))


def test_a_marker_quoted_in_prose_is_not_the_block(tmp_path: Path) -> None:
    # The first version took the first occurrence of the marker, quoted in a sentence above
    # the block, and replaced the whole page between that sentence and the block's end.
    checks = report.evaluate(FAST, _memory(), startup=STARTUP)
    result = report.Report(FAST, _memory(), checks, {"rounds": 3}, startup=STARTUP)
    page = tmp_path / "performance.md"
    prose = f"The bench regenerates the block between `{report.BEGIN_MARK}` markers.\n\n## Keep\n"
    page.write_text(f"{prose}\n{report.BEGIN_MARK}\nold\n{report.END_MARK}\n\n## After\n")
    report.update_document(page, "Measured now.", result)
    text = page.read_text()
    assert text.startswith(prose) and text.endswith(f"{report.END_MARK}\n\n## After\n")
    assert "old" not in text and "Measured now." in text
    twice = tmp_path / "twice.md"
    twice.write_text(f"{report.BEGIN_MARK}\n{report.END_MARK}\n{report.BEGIN_MARK}\n")
    with pytest.raises(SystemExit):
        parse_args(["--update", str(twice)])


async def test_bench_cost_takes_the_tenants_in_turn_after_a_warm_up_of_each() -> None:
    """`python -m bench.cost --tenants N`: the direct upstream sees every tenant's request in
    turn, N of them in the warm-up (each tenant served once) and then the measured ones."""
    import argparse
    import asyncio

    from bench import cost

    tenants = tenant_ids(3)
    requests = [cost.request_for("127.0.0.1", t) for t in tenants]
    seen: list[bytes] = []

    class Recording(cost.UpstreamProtocol):
        def data_received(self, data: bytes) -> None:
            seen.append(data)
            super().data_received(data)

    server = await asyncio.get_running_loop().create_server(Recording, "127.0.0.1", 0)
    try:
        args = argparse.Namespace(warmup=1, requests=4, connections=1)
        measured = await cost.measure(server.sockets[0].getsockname()[1], requests, args, None)
    finally:
        server.close()
    assert measured.statuses == {200: 4}
    named = [next(t for t in tenants if t.encode() in request) for request in seen]
    assert named == [*tenants, *tenants, tenants[0]]  # a warm-up of 3 (not 1), then 4


@pytest.mark.real  # real `broker serve` processes
def test_a_broker_restarted_for_a_round_is_a_fresh_process_on_the_same_ports_and_store(
    tmp_path: Path,
) -> None:
    """Each round of load runs on fresh broker processes (bench.run.Process): identical
    brokers differ by a few % per process, which a single process would make a bias."""
    with Supervisor() as supervisor:
        first = start_broker(
            supervisor,
            name="broker-1",
            work_dir=tmp_path,
            upstream_url="http://127.0.0.1:9",
            tenants=1,
            callers=3,
        )
        fresh = restart_broker(supervisor, first)
        assert fresh.pid != first.pid
        assert (fresh.proxy_url, fresh.admin_url) == (first.proxy_url, first.admin_url)
        assert fresh.tenants == first.tenants and fresh.caller_token == first.caller_token
        with pytest.raises(ProcessLookupError):
            os.kill(first.pid, 0)  # the old one is gone
        tenant = httpx.get(
            f"{fresh.admin_url}/v1/tenants/{fresh.tenants[0]}",
            headers={"Authorization": f"Bearer {fresh.env['BROKER_ADMIN_TOKEN']}"},
        )
        assert tenant.status_code == 200 and tenant.json()["state"] == "active"


def test_a_rotating_warm_up_lasts_long_enough_to_visit_every_tenant() -> None:
    plain = load.Target("http://127.0.0.1:1/x")
    assert warmup_seconds(plain, 1.0) == 1.0
    many = load.Target(
        "http://127.0.0.1:1/x", rotate_header="X", rotate_values=tuple(tenant_ids(50_000))
    )
    assert warmup_seconds(many, 1.0) == pytest.approx(6.0)  # 50,000 at 10,000 a second, at least
    one = load.Target("http://127.0.0.1:1/x", rotate_header="X", rotate_values=("t",) * 50_000)
    assert warmup_seconds(one, 1.0) == pytest.approx(1.0001)


@pytest.mark.real  # the real wrk
def test_the_rotation_script_gives_each_wrk_thread_its_share_and_each_slot_its_request(
    tmp_path: Path,
) -> None:
    """wrk's Lua seeds its random numbers alike in every thread: a random start put both
    threads at one place, going round in step. Each now starts its share of the way round,
    and every formatted request carries its slot, so a table of one tenant repeated weighs
    on wrk as much as one of as many tenants."""
    wrk = load.find_wrk()
    if wrk is None:
        if os.environ.get("CI") == "true":
            pytest.fail("wrk is missing: scripts/system-deps.sh installs it")
        pytest.skip("wrk is not installed (make system-deps)")
    seen: list[tuple[str, str]] = []
    first_by_connection: dict[int, int] = {}  # each wrk thread has its own connection here

    class Recording(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            seen.append((self.headers["X-Broker-Tenant"], self.headers["X-Bench-Slot"]))
            first_by_connection.setdefault(self.client_address[1], int(seen[-1][1]))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Recording)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        values = tuple(f"tenant-{i:04d}" for i in range(1000))
        target = load.Target(
            f"http://127.0.0.1:{server.server_address[1]}/v3/x",
            rotate_header="X-Broker-Tenant",
            rotate_values=values,
        )
        load.run_wrk(wrk, target, connections=2, threads=2, duration=2, work_dir=tmp_path)
    finally:
        server.shutdown()
        server.server_close()
    # one thread starts at the first slot, the other halfway round (wrk may take a request
    # or two from each before it sends)
    first = sorted(list(first_by_connection.values())[:2])  # the two connections wrk opened
    assert first[0] <= 3 and 501 <= first[1] <= 503
    assert all(tenant == values[int(slot) - 1] for tenant, slot in seen)
    assert {tenant for tenant, _ in seen} == set(values)
    script = (tmp_path / "rotate.lua").read_text()
    assert "/ 2)" in script  # the threads' shares: two of them
