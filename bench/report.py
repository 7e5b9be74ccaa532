"""Results: medians of rounds, the docs/performance.md targets checked, as table, JSON, markdown."""

from __future__ import annotations

import json
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
BROKER_MANY = "broker, 10k tenants"
BROKER_SPREAD = "broker, 10k tenants, rotating"
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
class Report:
    rows: Sequence[Row]
    memory: Memory
    checks: Sequence[Check]
    settings: Mapping[str, Any] = field(default_factory=dict)
    transfers: Sequence[Mapping[str, Any]] = ()

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


def evaluate(rows: Sequence[Row], memory: Memory, high: int = 32) -> list[Check]:
    """The targets of docs/performance.md over measured rows and memory."""
    throughput = _ratio(find(rows, BROKER_ONE, high), find(rows, NGINX, high))
    strict = _ratio(find(rows, BROKER_ONE, high), find(rows, NGINX_KEEPALIVE, high))
    broker_1, direct_1 = find(rows, BROKER_ONE, 1), find(rows, DIRECT, 1)
    added = broker_1.p50_ms - direct_1.p50_ms if broker_1 and direct_1 else None
    many = [
        r
        for r in (
            _ratio(find(rows, n, high), find(rows, BROKER_ONE, high))
            for n in (BROKER_MANY, BROKER_SPREAD)
        )
        if r is not None
    ]
    tenants = min(many) if many else None
    callers = _ratio(find(rows, BROKER_CALLERS, high), find(rows, BROKER_ONE, high))
    growth = max(memory.transfer_growth_mib.values()) if memory.transfer_growth_mib else None
    failed = sum(r.failed for r in rows) + (0 if memory.transfers_ok else 1)
    return [
        _check(
            f"throughput at {high} conns, broker / nginx proxy",
            throughput,
            "×",
            "≥ 0.12",
            throughput is not None and throughput >= 0.12,
        ),
        # For information: a stricter bar than docs/performance.md's reference, never judged.
        Check(
            f"throughput at {high} conns, broker / nginx proxy with upstream keep-alive",
            strict,
            "×",
            "(information)",
            None if strict is None else True,
            informational=True,
        ),
        _check(
            "added p50 at 1 conn, broker − direct",
            added,
            "ms",
            "≤ 0.35",
            added is not None and added <= 0.35,
        ),
        _check(
            f"throughput at {high} conns, 10k tenants / 1 tenant (worst of fixed, rotating)",
            tenants,
            "×",
            "≥ 0.9",
            tenants is not None and tenants >= 0.9,
        ),
        _check(
            f"throughput at {high} conns, 1,000 callers / no callers file",
            callers,
            "×",
            "≥ 0.95",
            callers is not None and callers >= 0.95,
        ),
        _check(
            "peak RSS with 10k tenants (VmHWM)",
            memory.hwm_many_mib,
            "MiB",
            "≤ 120",
            memory.hwm_many_mib <= 120,
        ),
        _check(
            "RSS growth during a 50 MB upload / download (worst)",
            growth,
            "MiB",
            "< 20",
            growth is not None and growth < 20 and memory.transfers_ok,
        ),
        _check("failed requests", float(failed), "", "= 0", failed == 0),
    ]


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
        digits = 0 if check.name == "failed requests" else (1 if check.unit == "MiB" else 3)
        measured = f"{_fmt(check.value, digits)} {check.unit}".strip()
        lines.append(f"| {check.name} | {measured} | {check.target} | {check.verdict} |")
    memory = report.memory
    lines += [
        "",
        f"Peak RSS (VmHWM): 1 tenant {memory.hwm_one_mib:.1f} MiB,"
        f" 10k tenants {memory.hwm_many_mib:.1f} MiB; RSS now {memory.rss_one_mib:.1f}"
        f" / {memory.rss_many_mib:.1f} MiB. Transfer growth: "
        + ", ".join(f"{k} {v:.1f} MiB" for k, v in memory.transfer_growth_mib.items())
        + ".",
    ]
    return lines


def as_json(report: Report) -> dict[str, Any]:
    return {
        "settings": dict(report.settings),
        "configurations": [r.as_dict() for r in report.rows],
        "memory": {
            **{k: round(v, 2) for k, v in asdict(report.memory).items() if isinstance(v, float)},
            "transfer_growth_mib": {
                k: round(v, 2) for k, v in report.memory.transfer_growth_mib.items()
            },
            "transfers_ok": report.memory.transfers_ok,
        },
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


def write(report: Report, out_dir: Path, header: str) -> tuple[Path, Path]:
    """`latest.json` and `latest.md` in `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "latest.json"
    md_path = out_dir / "latest.md"
    json_path.write_text(json.dumps(as_json(report), indent=2, ensure_ascii=False) + "\n")
    md_path.write_text("\n".join([header, "", *table_lines(report)]) + "\n")
    return json_path, md_path
