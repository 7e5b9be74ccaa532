"""50 MB through the broker each way, while its resident memory is sampled."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from bench.processes import process_memory, reset_peak_memory

CHUNK = 64 * 1024
SAMPLE_EVERY = 0.002


@dataclass(frozen=True)
class TransferResult:
    """One streamed transfer: bytes moved, status, time, and the broker's memory growth."""

    direction: str
    expected_bytes: int
    moved_bytes: int
    status: int
    seconds: float
    rss_before_mib: float
    rss_peak_mib: float

    @property
    def growth_mib(self) -> float:
        return self.rss_peak_mib - self.rss_before_mib

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300 and self.moved_bytes == self.expected_bytes


class MemoryWatch:
    """Samples a process's VmRSS on a thread; the peak also counts VmHWM after a reset."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.before = process_memory(pid)[0]
        self.hwm_reset = reset_peak_memory(pid)
        self.peak = self.before
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(SAMPLE_EVERY):
            self.peak = max(self.peak, process_memory(self.pid)[0])

    def __enter__(self) -> MemoryWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        rss, hwm = process_memory(self.pid)
        self.peak = max(self.peak, rss, hwm if self.hwm_reset else rss)


def _zeros(size: int) -> Iterator[bytes]:
    block = bytes(CHUNK)
    remaining = size
    while remaining > 0:
        step = min(CHUNK, remaining)
        yield block[:step]
        remaining -= step


@dataclass(frozen=True)
class Through:
    """The broker a transfer goes through: its proxy, the tenant named, its process."""

    proxy_url: str
    tenant_header: str
    tenant: str
    pid: int


def upload(through: Through, path: str, size: int, landed: Path) -> TransferResult:
    """PUT `size` bytes as application/octet-stream; `landed` is where the upstream writes them."""
    proxy_url, pid = through.proxy_url, through.pid
    headers = {
        through.tenant_header: through.tenant,
        "Content-Type": "application/octet-stream",
        "Content-Length": str(size),
    }
    with httpx.Client(base_url=proxy_url, trust_env=False, timeout=60) as client:
        started = time.perf_counter()
        with MemoryWatch(pid) as watch:
            response = client.put(path, content=_zeros(size), headers=headers)
        elapsed = time.perf_counter() - started
    moved = landed.stat().st_size if landed.exists() else 0
    return TransferResult(
        "upload", size, moved, response.status_code, elapsed, watch.before, watch.peak
    )


def download(through: Through, path: str, size: int) -> TransferResult:
    """GET a `size`-byte body, counting it as it streams."""
    proxy_url, pid = through.proxy_url, through.pid
    headers = {through.tenant_header: through.tenant}
    moved = 0
    with httpx.Client(base_url=proxy_url, trust_env=False, timeout=60) as client:
        started = time.perf_counter()
        with (
            MemoryWatch(pid) as watch,
            client.stream("GET", path, headers=headers) as response,
        ):
            for chunk in response.iter_raw(CHUNK):
                moved += len(chunk)
        elapsed = time.perf_counter() - started
    return TransferResult(
        "download", size, moved, response.status_code, elapsed, watch.before, watch.peak
    )
