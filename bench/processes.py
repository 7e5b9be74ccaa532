"""Child processes the benchmark starts, and the guarantee that every one of them is stopped."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import FrameType, TracebackType

STOP_GRACE = 5.0


class BenchError(Exception):
    """The benchmark cannot go on; the message says why."""


class Supervisor:
    """Starts processes in their own session and stops all of them on exit, whatever happened.

    Children get their own session so that Ctrl-C reaches only the benchmark, which then
    stops them in order (SIGTERM, then SIGKILL after a grace period).
    """

    def __init__(self) -> None:
        self._children: list[tuple[str, subprocess.Popen[bytes]]] = []
        self._logs: dict[int, Path] = {}

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        log: Path | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start `argv`, its output going to `log` (or nowhere)."""
        with contextlib.ExitStack() as files:
            out = files.enter_context(log.open("wb")) if log is not None else subprocess.DEVNULL
            child = subprocess.Popen(
                list(argv),
                env=dict(env) if env is not None else None,
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT if log is not None else subprocess.DEVNULL,
                start_new_session=True,
            )
        self._children.append((name, child))
        if log is not None:
            self._logs[child.pid] = log
        return child

    def stop(self, child: subprocess.Popen[bytes]) -> None:
        """Stop one child: SIGTERM, then SIGKILL if it lingers."""
        if child.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(signal.SIGTERM)
            try:
                child.wait(STOP_GRACE)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    child.kill()
                child.wait(STOP_GRACE)
        self._children = [(n, c) for n, c in self._children if c is not child]

    def wait_for(self, name: str, timeout: float) -> None:
        """Wait for the child called `name` to exit by itself (then forget it)."""
        for known, child in list(self._children):
            if known == name:
                try:
                    child.wait(timeout)
                finally:
                    self.stop(child)

    def stop_pid(self, pid: int) -> None:
        """Stop the child with process id `pid` (nothing if it is not one of them)."""
        for _, child in list(self._children):
            if child.pid == pid:
                self.stop(child)

    def stop_all(self) -> None:
        """Stop every child still known, newest first."""
        for _, child in reversed(list(self._children)):
            self.stop(child)

    def check_alive(self) -> None:
        """Raise BenchError if a child has exited on its own."""
        for name, child in self._children:
            code = child.poll()
            if code is not None:
                log = self._logs.get(child.pid)
                tail = log.read_text(errors="replace").strip()[-800:] if log else ""
                raise BenchError(f"{name} exited unexpectedly with status {code}\n{tail}")

    def __enter__(self) -> Supervisor:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop_all()


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Treat SIGTERM like Ctrl-C, so `finally` blocks (and the supervisor) run."""

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(
    ready: Callable[[], bool], *, what: str, timeout: float, alive: Callable[[], None]
) -> None:
    """Poll `ready` until it is true, `alive` raises, or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while not ready():
        alive()
        if time.monotonic() > deadline:
            raise BenchError(f"{what} was not ready within {timeout:.0f} s")
        time.sleep(0.02)


def http_status(url: str, headers: Mapping[str, str] | None = None) -> int | None:
    """The status of a GET to `url` (127.0.0.1 only), or None if nothing answers."""
    if not url.startswith("http://127.0.0.1:"):
        raise ValueError("the benchmark only talks to 127.0.0.1")
    request = urllib.request.Request(url, headers=dict(headers or {}))
    try:
        with urllib.request.urlopen(request, timeout=2) as response:
            response.read()
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return None


def process_memory(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of a process in MiB, from /proc/<pid>/status."""
    values = {"VmRSS": 0.0, "VmHWM": 0.0}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in values:
            values[name] = int(rest.split()[0]) / 1024
    return values["VmRSS"], values["VmHWM"]


def reset_peak_memory(pid: int) -> bool:
    """Reset VmHWM to the current RSS (Linux `clear_refs` 5); False where not allowed."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def child_pids(pid: int) -> list[int]:
    """The direct children of a process (e.g. nginx's worker under its master)."""
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(part) for part in text.split()]
