"""Idle CPU: what a broker with many tenants and no traffic burns in the background.

`python -m bench.idle [--tenants 50000] [--seconds 10]` starts `broker serve` on a local store
holding that many active tenants (the health checks on their defaults, Pleo unreachable at
127.0.0.1:9, so each check's call fails at once), waits `--settle` seconds, then reads the
process's user + system CPU time from /proc over `--seconds` and prints it. CPU time counts
only what the broker itself ran, so the figure holds on a shared machine; it is the CPU the
background work (health-check slots, their claims, refreshes) takes from the proxy.
Not part of `make bench`'s table (docs/performance.md, "50,000 tenants").
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from bench.brokers import start_broker
from bench.processes import BenchError, Supervisor, cpu_seconds, sigterm_as_interrupt
from bench.run import _scratch

UNREACHABLE = "http://127.0.0.1:9"  # the discard port: nothing listens, a call fails at once


def idle_cpu(
    supervisor: Supervisor, work_dir: Path, *, tenants: int, settle: float, seconds: float
) -> float:
    """CPU seconds a broker with `tenants` tenants uses over `seconds` of no traffic, from
    `settle` seconds after it is ready."""
    broker = start_broker(
        supervisor, name="idle", work_dir=work_dir, upstream_url=UNREACHABLE, tenants=tenants
    )
    time.sleep(settle)
    before = cpu_seconds(broker.pid)
    time.sleep(seconds)
    return cpu_seconds(broker.pid) - before


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.idle", description=__doc__)
    parser.add_argument("--tenants", type=int, default=50_000, help="active tenants (50000)")
    parser.add_argument("--seconds", type=float, default=10.0, help="measuring window (10)")
    parser.add_argument("--settle", type=float, default=2.0, help="wait after ready (2)")
    args = parser.parse_args(argv)
    if args.tenants < 1 or not 0 < args.seconds <= 600 or not 0 <= args.settle <= 600:
        parser.error("tenants must be positive, seconds and settle at most 600")
    try:
        with (
            sigterm_as_interrupt(),
            tempfile.TemporaryDirectory(prefix="broker-idle-", dir=_scratch()) as tmp,
            Supervisor() as supervisor,
        ):
            used = idle_cpu(
                supervisor,
                Path(tmp),
                tenants=args.tenants,
                settle=args.settle,
                seconds=args.seconds,
            )
    except KeyboardInterrupt:
        return 130
    except BenchError as exc:
        print(f"bench.idle: {exc}", file=sys.stderr)
        return 1
    print(
        f"{args.tenants} tenants, no traffic: {used:.2f} CPU-s in {args.seconds:g} s"
        f" ({100 * used / args.seconds:.1f} % of a core)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
