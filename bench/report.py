"""Results: medians of rounds, the docs/performance.md targets checked, as table, JSON, markdown."""

from __future__ import annotations

import json
import os
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.load import LoadResult

DIRECT = "direct to upstream"
NGINX = "nginx proxy (+Authorization)"
NGINX_KEEPALIVE = "nginx proxy, upstream keep-alive (+Authorization)"
BROKER_ONE = "broker, 1 tenant"
BROKER_MANY = "broker, many tenants"
BROKER_SPREAD = "broker, many tenants, rotating"
# One tenant through the rotating run's wrk script, its table as long (the one tenant in every
# slot): the rotating run's baseline, since wrk's table of formatted requests, as large as the
# tenants are many, takes the cache the broker shares with it on two cores.
BROKER_ONE_ROTATING = "broker, 1 tenant, the rotating run's script"
BROKER_CALLERS = "broker, 1 tenant, 1,000 callers"


@dataclass(frozen=True)
class Row:
    """One configuration at one connection count, over every round."""

    name: str
    connections: int
    rounds: tuple[LoadResult, ...]
    cpu_us_per_request: float | None = None

    @property
    def rps(self) -> float:
        return statistics.median(r.rps for r in self.rounds)

    @property
    def p50_ms(self) -> float:
        return statistics.median(r.p50_ms for r in self.rounds)

    @property
    def p99_ms(self) -> float:
        return statistics.median(r.p99_ms for r in self.rounds)

    @property
    def failed(self) -> int:
        return sum(r.failed for r in self.rounds)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "connections": self.connections,
            "rps": round(self.rps, 1),
            "p50_ms": round(self.p50_ms, 3),
            "p99_ms": round(self.p99_ms, 3),
            "failed": self.failed,
            "cpu_us_per_request": _round(self.cpu_us_per_request, 1),
            "rounds": [asdict(r) for r in self.rounds],
        }


@dataclass(frozen=True)
class Check:
    """One target of docs/performance.md: the measured value, and whether it meets the target."""

    name: str
    value: float | None
    unit: str
    target: str
    passed: bool | None  # None: could not be measured here (e.g. no nginx)
    informational: bool = False  # shown beside the targets, not one of them

    @property
    def verdict(self) -> str:
        if self.informational:
            return "–"
        return {True: "pass", False: "FAIL", None: "n/a"}[self.passed]


@dataclass(frozen=True)
class Memory:
    """The brokers' resident memory and the transfers' growth, in MiB."""

    rss_one_mib: float
    hwm_one_mib: float
    rss_many_mib: float
    hwm_many_mib: float
    transfer_growth_mib: Mapping[str, float]
    transfers_ok: bool


@dataclass(frozen=True)
class Startup:
    """Start-up figures (bench/startup.py): seconds to `/readyz` 200 and RSS (MiB) then."""

    idle_seconds: float | None = None
    idle_rss_mib: float | None = None
    many_local_seconds: float | None = None
    many_local_rss_mib: float | None = None
    many_openbao_seconds: float | None = None


@dataclass(frozen=True)
class Report:
    rows: Sequence[Row]
    memory: Memory | None
    checks: Sequence[Check]
    settings: Mapping[str, Any] = field(default_factory=dict)
    transfers: Sequence[Mapping[str, Any]] = ()
    startup: Startup = field(default_factory=Startup)

    @property
    def passed(self) -> bool:
        return all(c.passed is not False for c in self.checks)


def find(rows: Sequence[Row], name: str, connections: int) -> Row | None:
    return next((r for r in rows if r.name == name and r.connections == connections), None)


def _ratio(a: Row | None, b: Row | None) -> float | None:
    if a is None or b is None or b.rps == 0:
        return None
    return a.rps / b.rps


def _check(name: str, value: float | None, unit: str, target: str, ok: bool | None) -> Check:
    return Check(name, value, unit, target, None if value is None else ok)


def _at_most(name: str, value: float | None, unit: str, limit: float) -> Check:
    return _check(name, value, unit, f"≤ {limit:g}", value is not None and value <= limit)


def _at_least(name: str, value: float | None, unit: str, limit: float) -> Check:
    return _check(name, value, unit, f"≥ {limit:g}", value is not None and value >= limit)


def evaluate(
    rows: Sequence[Row],
    memory: Memory | None,
    high: int = 32,
    *,
    startup: Startup | None = None,
    tenants: int = 50_000,
) -> list[Check]:
    """Every target of docs/performance.md (second round first) over what was measured;
    a figure not measured in this run (a part left out, no nginx, no OpenBao) is n/a."""
    startup = startup or Startup()
    many = f"{tenants // 1000}k" if tenants % 1000 == 0 else str(tenants)
    one_high = find(rows, BROKER_ONE, high)
    broker_1, direct_1 = find(rows, BROKER_ONE, 1), find(rows, DIRECT, 1)
    added = broker_1.p50_ms - direct_1.p50_ms if broker_1 and direct_1 else None
    # Each many-tenant run against one tenant under the same load generator: plain wrk for
    # the fixed tenant, the rotation script for the rotating ones (when that run was made).
    one_scripted = find(rows, BROKER_ONE_ROTATING, high) or one_high
    spread = [
        r
        for r in (
            _ratio(find(rows, BROKER_MANY, high), one_high),
            _ratio(find(rows, BROKER_SPREAD, high), one_scripted),
        )
        if r is not None
    ]
    failed = sum(r.failed for r in rows) + (0 if memory is None or memory.transfers_ok else 1)
    return [
        _at_most("idle RSS after start, local store, 0 tenants", startup.idle_rss_mib, "MiB", 45),
        _at_most("start to /readyz 200, local store, 0 tenants", startup.idle_seconds, "s", 0.8),
        _at_most(
            f"CPU per proxied request at {high} conns, full policy",
            one_high.cpu_us_per_request if one_high else None,
            "µs",
            100,
        ),
        _at_least(
            f"throughput at {high} conns, broker / nginx proxy with upstream keep-alive",
            _ratio(one_high, find(rows, NGINX_KEEPALIVE, high)),
            "×",
            0.15,
        ),
        _at_most("added p50 at 1 conn, broker − direct", added, "ms", 0.20),
        _at_most(
            f"peak RSS with {many} tenants (VmHWM)",
            memory.hwm_many_mib if memory else startup.many_local_rss_mib,
            "MiB",
            150,
        ),
        _at_most(
            f"start to /readyz 200 with {many} tenants, local store",
            startup.many_local_seconds,
            "s",
            5,
        ),
        _at_most(
            f"start to /readyz 200 with {many} tenants, OpenBao",
            startup.many_openbao_seconds,
            "s",
            60,
        ),
        _at_least(
            f"throughput at {high} conns, {many} tenants / 1 tenant (worst of fixed, rotating)",
            min(spread) if spread else None,
            "×",
            0.95,
        ),
        _at_least(
            f"throughput at {high} conns, broker / nginx proxy",
            _ratio(one_high, find(rows, NGINX, high)),
            "×",
            0.12,
        ),
        _at_least(
            f"throughput at {high} conns, 1,000 callers / no callers file",
            _ratio(find(rows, BROKER_CALLERS, high), one_high),
            "×",
            0.95,
        ),
        _check(
            "RSS growth during a 50 MB upload / download (worst)",
            _growth(memory),
            "MiB",
            "< 20",
            memory is not None and (_growth(memory) or 0) < 20 and memory.transfers_ok,
        ),
        _check("failed requests", float(failed), "", "= 0", failed == 0),
    ]


def _growth(memory: Memory | None) -> float | None:
    if memory is None or not memory.transfer_growth_mib:
        return None
    return max(memory.transfer_growth_mib.values())


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def _fmt(value: float | None, digits: int) -> str:
    return "–" if value is None else f"{value:,.{digits}f}"


def table_lines(report: Report) -> list[str]:
    """The report as markdown tables (also readable as plain text)."""
    lines = [
        "| configuration | conns | req/s | p50 ms | p99 ms | CPU µs/req | failed |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in report.rows:
        lines.append(
            f"| {row.name} | {row.connections} | {row.rps:,.0f} | {row.p50_ms:.3f}"
            f" | {row.p99_ms:.3f} | {_fmt(row.cpu_us_per_request, 0)} | {row.failed} |"
        )
    lines += ["", "| target | measured | required | result |", "|---|---:|---:|---|"]
    for check in report.checks:
        digits = {"": 0, "µs": 0, "MiB": 1, "s": 2}.get(check.unit, 3)
        measured = "–" if check.value is None else f"{_fmt(check.value, digits)} {check.unit}"
        measured = measured.strip()
        lines.append(f"| {check.name} | {measured} | {check.target} | {check.verdict} |")
    memory = report.memory
    if memory is not None:
        lines += [
            "",
            f"Peak RSS (VmHWM): 1 tenant {memory.hwm_one_mib:.1f} MiB,"
            f" many tenants {memory.hwm_many_mib:.1f} MiB; RSS now {memory.rss_one_mib:.1f}"
            f" / {memory.rss_many_mib:.1f} MiB. Transfer growth: "
            + (
                ", ".join(f"{k} {v:.1f} MiB" for k, v in memory.transfer_growth_mib.items())
                or "not measured"
            )
            + ".",
        ]
    return lines


def as_json(report: Report) -> dict[str, Any]:
    return {
        "settings": dict(report.settings),
        "configurations": [r.as_dict() for r in report.rows],
        "memory": None if report.memory is None else _memory_json(report.memory),
        "startup": {k: _round(v, 3) for k, v in asdict(report.startup).items()},
        "transfers": [dict(t) for t in report.transfers],
        "checks": [
            {
                "name": c.name,
                "value": _round(c.value, 4),
                "unit": c.unit,
                "target": c.target,
                "passed": c.passed,
                "informational": c.informational,
            }
            for c in report.checks
        ],
        "passed": report.passed,
    }


def _memory_json(memory: Memory) -> dict[str, Any]:
    return {
        **{k: round(v, 2) for k, v in asdict(memory).items() if isinstance(v, float)},
        "transfer_growth_mib": {k: round(v, 2) for k, v in memory.transfer_growth_mib.items()},
        "transfers_ok": memory.transfers_ok,
    }


BEGIN_MARK = "<!-- bench-results -->"
END_MARK = "<!-- /bench-results -->"


def results_block(text: str) -> tuple[int, int]:
    """The line numbers of the results block's two marker lines in `text`: each marker alone
    on its line, once (a marker quoted in prose is not one)."""
    lines = text.split("\n")
    begins = [i for i, line in enumerate(lines) if line.strip() == BEGIN_MARK]
    ends = [i for i, line in enumerate(lines) if line.strip() == END_MARK]
    if len(begins) != 1 or len(ends) != 1 or ends[0] < begins[0]:
        raise ValueError(
            f"no single block to regenerate: it needs one line {BEGIN_MARK} and, after it,"
            f" one line {END_MARK}"
        )
    return begins[0], ends[0]


def update_document(path: Path, header: str, report: Report) -> None:
    """Replace the block between the `BEGIN_MARK` and `END_MARK` lines of `path` (the
    README's performance section, docs/performance.md) with this run's header and tables;
    the new text replaces the file whole (written beside it, then renamed over it)."""
    text = path.read_text(encoding="utf-8")
    try:
        begin, end = results_block(text)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    lines = text.split("\n")
    block = [BEGIN_MARK, header, "", *table_lines(report), ""]
    written = path.with_name(path.name + ".tmp")
    written.write_text("\n".join([*lines[:begin], *block, *lines[end:]]), encoding="utf-8")
    os.replace(written, path)


def write(report: Report, out_dir: Path, header: str) -> tuple[Path, Path]:
    """`latest.json` and `latest.md` in `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "latest.json"
    md_path = out_dir / "latest.md"
    json_path.write_text(json.dumps(as_json(report), indent=2, ensure_ascii=False) + "\n")
    md_path.write_text("\n".join([header, "", *table_lines(report)]) + "\n")
    return json_path, md_path
