"""The callers file, watched: re-read when it changes, the last good version kept.

A background task looks at the file every `WATCH_INTERVAL` seconds (never a request: the
proxy reads `CallerGate.table`, a plain attribute). The file's identity is what `os.stat`
says of the path, symlinks followed: a Kubernetes Secret or ConfigMap update swaps the
`..data` symlink to a new directory, so the file the path leads to is another inode; a file
changed in place changes its mtime or size, and a change of mode alone its ctime.

A new version applies once two consecutive looks found it unchanged (and it did not change
while it was read): a file being rewritten in place is never loaded half-written, where a
cut-off `scopes:` line would widen a caller. Replace the file atomically (a rename, or the
Secret's symlink swap) and a change still applies within a second. A version that cannot be
read or does not validate is logged (`callers.reload_failed`, with the one-line reason, once
per distinct reason), the previous one stays in force (`broker_callers_file_stale` is 1),
and it is tried again at every look until it loads: a transient read error or a mode fixed by
`chmod` does not leave an old file in force. A good one is logged as `callers.loaded`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from broker.callers import CallersFileError, CallerTable, load_callers
from broker.events import emit
from broker.metrics import Metrics
from broker.tasks import Repeating

WATCH_INTERVAL = 0.25  # seconds between looks at the file: a change applies within a second

Signature = tuple[int, int, int, int, int] | None


def signature(path: Path) -> Signature:
    """What identifies one version of the file (None: it cannot be seen now)."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return (info.st_dev, info.st_ino, info.st_mtime_ns, info.st_ctime_ns, info.st_size)


class CallerGate:
    """The callers in force, from `path`; `start` begins watching it."""

    def __init__(
        self, path: Path, *, interval: float = WATCH_INTERVAL, metrics: Metrics | None = None
    ) -> None:
        self.path = path
        self._applied = signature(path)  # the version in force
        self._candidate = self._applied  # what the last look found
        self._failure: str | None = None  # the reason last logged, while the file is stale
        self._stale = (metrics if metrics is not None else Metrics()).callers_file_stale
        try:
            self.table: CallerTable = load_callers(path)
        except CallersFileError as exc:  # a bad file stops start-up, in one line
            raise CallersFileError(f"configuration error: BROKER_CALLERS_FILE: {exc}") from None
        self._stale.set(0)
        emit("callers.loaded", path=str(path), callers=len(self.table))
        self._watch = Repeating(self.reload_if_changed, lambda: interval, "callers-watch")

    def start(self) -> None:
        self._watch.start()

    async def stop(self) -> None:
        await self._watch.stop()

    async def reload_if_changed(self) -> bool:
        """Re-read the file if it changed and has held still since the last look; True if new
        callers took effect."""
        now = signature(self.path)
        if now == self._applied:
            self._candidate = now
            self._fresh()
            return False
        if now != self._candidate:  # changed since the last look: wait until it holds still
            self._candidate = now
            return False
        if now is None:
            self._failed("the file is gone")
            return False
        try:
            table = load_callers(self.path)
        except CallersFileError as exc:
            self._failed(str(exc))
            return False
        if signature(self.path) != now:  # written to while it was read: look again
            return False
        self.table = table
        self._applied = now
        self._fresh()
        emit("callers.loaded", path=str(self.path), callers=len(table))
        return True

    def _failed(self, reason: str) -> None:
        self._stale.set(1)
        if reason == self._failure:
            return
        self._failure = reason
        emit(
            "callers.reload_failed",
            level=logging.WARNING,
            path=str(self.path),
            error=f"{reason}; the previous callers stay in force",
        )

    def _fresh(self) -> None:
        self._failure = None
        self._stale.set(0)
