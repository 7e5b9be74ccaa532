"""Load: `wrk` where it is installed, else a bounded asyncio load generator; one result type.

Every load goes to 127.0.0.1 and lasts `duration` seconds (plus a bounded grace to stop).
"""

from __future__ import annotations

import asyncio
import re
import shutil
import statistics
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}
_DURATION = r"([0-9.]+)(us|ms|s|m|h)"
WRK_GRACE = 30.0


@dataclass(frozen=True)
class LoadResult:
    """One load run: completed requests, throughput, latency percentiles, failures."""

    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    failed: int


@dataclass(frozen=True)
class Target:
    """Where to send load: URL, fixed headers, optionally tenants to rotate through."""

    url: str
    headers: tuple[tuple[str, str], ...] = ()
    rotate_header: str | None = None
    rotate_values: tuple[str, ...] = ()


def find_wrk() -> str | None:
    """The wrk binary, or None (then the Python load generator stands in)."""
    return shutil.which("wrk")


def to_ms(text: str) -> float:
    """A wrk duration ('85.00us', '1.20ms', '2.00s') in milliseconds."""
    match = re.fullmatch(_DURATION, text.strip())
    if match is None:
        raise ValueError(f"not a wrk duration: {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def parse_wrk(output: str) -> LoadResult:
    """The figures of `wrk --latency` output; failed counts non-2xx/3xx and socket errors."""
    requests = re.search(r"^\s*(\d+) requests in " + _DURATION, output, re.MULTILINE)
    rps = re.search(r"^Requests/sec:\s+([0-9.]+)", output, re.MULTILINE)
    p50 = re.search(r"^\s*50(?:\.000)?%\s+(\S+)", output, re.MULTILINE)
    p99 = re.search(r"^\s*99(?:\.000)?%\s+(\S+)", output, re.MULTILINE)
    if requests is None or rps is None or p50 is None or p99 is None:
        raise ValueError("wrk output without requests, Requests/sec or latency distribution")
    failed = 0
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    if non_2xx is not None:
        failed += int(non_2xx.group(1))
    sockets = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    if sockets is not None:
        failed += sum(int(n) for n in sockets.groups())
    return LoadResult(
        requests=int(requests.group(1)),
        seconds=to_ms(requests.group(2) + requests.group(3)) / 1e3,
        rps=float(rps.group(1)),
        p50_ms=to_ms(p50.group(1)),
        p99_ms=to_ms(p99.group(1)),
        failed=failed,
    )


def rotation_script(header: str, values: Sequence[str], path: str, threads: int = 1) -> str:
    """A wrk Lua script sending `path` with `header` cycling through `values`.

    Requests are formatted once in `init`, so the per-request Lua cost is a table lookup.
    Each of the `threads` threads starts its own share of the way round (wrk's Lua seeds its
    random numbers alike in every thread and run: they would all start at one place and go
    round in step), so together they visit every value once in `len(values)` requests. Each
    request carries its slot (`X-Bench-Slot`): every formatted request is a string of its own,
    as many and as long whatever the values, so the table weighs on wrk's memory the same
    for one tenant repeated as for as many tenants.
    """
    if not re.fullmatch(r"[A-Za-z0-9-]+", header):
        raise ValueError("header names are letters, digits and '-'")
    if not all(re.fullmatch(r"[a-z0-9._-]+", v) for v in values) or not values:
        raise ValueError("rotated values must be tenant ids")
    if not re.fullmatch(r"/[A-Za-z0-9/._~%=&?-]*", path):
        raise ValueError("path must be a plain origin-form path")
    listed = ",\n".join(f'  "{v}"' for v in values)
    width = len(str(len(values)))
    return f"""local values = {{
{listed}
}}
local requests = {{}}
local index = 0
started = 0

setup = function(thread)
  thread:set("share", started)
  started = started + 1
end

init = function(args)
  for i, value in ipairs(values) do
    local slot = string.format("%0{width}d", i)
    requests[i] = wrk.format("GET", "{path}", {{["{header}"] = value, ["X-Bench-Slot"] = slot}})
  end
  index = math.floor((share or 0) * #requests / {max(1, threads)})
end

request = function()
  index = index % #requests + 1
  return requests[index]
end
"""


def wrk_argv(
    wrk: str,
    target: Target,
    *,
    connections: int,
    threads: int,
    duration: float,
    script: Path | None = None,
) -> list[str]:
    """The wrk command line for one run."""
    if not target.url.startswith("http://127.0.0.1:"):
        raise ValueError("the benchmark only sends load to 127.0.0.1")
    argv = [
        wrk,
        f"-c{connections}",
        f"-t{min(threads, connections)}",
        f"-d{max(1, round(duration))}s",
        "--latency",
        "--timeout",
        "5s",
    ]
    for name, value in target.headers:
        argv += ["-H", f"{name}: {value}"]
    if script is not None:
        argv += ["-s", str(script)]
    return [*argv, target.url]


def run_wrk(
    wrk: str,
    target: Target,
    *,
    connections: int,
    threads: int,
    duration: float,
    work_dir: Path,
) -> LoadResult:
    """One wrk run; its output is parsed, its failure raised."""
    script = None
    if target.rotate_header is not None:
        script = work_dir / "rotate.lua"
        path = "/" + target.url.split("/", 3)[3]
        threads_used = min(threads, connections)
        script.write_text(
            rotation_script(target.rotate_header, target.rotate_values, path, threads_used)
        )
    argv = wrk_argv(
        wrk, target, connections=connections, threads=threads, duration=duration, script=script
    )
    done = subprocess.run(
        argv, capture_output=True, text=True, timeout=duration + WRK_GRACE, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr.strip()[:500]}")
    return parse_wrk(done.stdout)


# -- the fallback: a bounded asyncio load generator -------------------------------------------


def run_python(target: Target, *, connections: int, duration: float) -> LoadResult:
    """Keep-alive GETs on `connections` sockets for `duration` seconds (where wrk is absent)."""
    return asyncio.run(_python_load(target, connections, duration))


def _request_bytes(target: Target, rotated: str | None) -> bytes:
    rest = target.url.removeprefix("http://")
    hostport, _, path = rest.partition("/")
    lines = [f"GET /{path} HTTP/1.1", f"Host: {hostport}"]
    lines += [f"{name}: {value}" for name, value in target.headers]
    if target.rotate_header is not None and rotated is not None:
        lines.append(f"{target.rotate_header}: {rotated}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def _python_load(target: Target, connections: int, duration: float) -> LoadResult:
    if not target.url.startswith("http://127.0.0.1:"):
        raise ValueError("the benchmark only sends load to 127.0.0.1")
    port = int(target.url.removeprefix("http://127.0.0.1:").partition("/")[0])
    values: Sequence[str | None] = target.rotate_values or (None,)
    requests = [_request_bytes(target, value) for value in values]
    latencies: list[float] = []
    failed = [0]
    started = time.perf_counter()
    deadline = started + duration

    async def worker(offset: int) -> None:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            failed[0] += 1
            return
        index = offset
        try:
            while time.perf_counter() < deadline:
                index = (index + 1) % len(requests)
                sent = time.perf_counter()
                writer.write(requests[index])
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
                status, headers = _parse_head(head)
                await reader.readexactly(int(headers.get("content-length", "0")))
                latencies.append(time.perf_counter() - sent)
                if not 200 <= status < 400:
                    failed[0] += 1
        except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError):
            failed[0] += 1
        finally:
            writer.close()

    await asyncio.gather(*(worker(i * 7919) for i in range(connections)))
    elapsed = time.perf_counter() - started
    return summarise(latencies, elapsed, failed[0])


def _parse_head(head: bytes) -> tuple[int, Mapping[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers


def summarise(latencies: Sequence[float], elapsed: float, failed: int) -> LoadResult:
    """A LoadResult from per-request latencies in seconds."""
    if not latencies:
        return LoadResult(0, elapsed, 0.0, 0.0, 0.0, failed)
    ordered = sorted(latencies)
    return LoadResult(
        requests=len(ordered),
        seconds=elapsed,
        rps=len(ordered) / elapsed,
        p50_ms=statistics.median(ordered) * 1e3,
        p99_ms=ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1e3,
        failed=failed,
    )
