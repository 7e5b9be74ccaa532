"""The callers file, watched: re-read when it changes, the last good version kept.

A background task looks at the file every `WATCH_INTERVAL` seconds (never a request: the
proxy reads `CallerGate.table`, a plain attribute). The file's identity is what `os.stat`
says of the path, symlinks followed: a Kubernetes Secret or ConfigMap update swaps the
`..data` symlink to a new directory, so the file the path leads to is another inode. A new
version that does not validate is logged (`callers.reload_failed`, with the one-line reason)
and the previous one stays in force; a good one is logged as `callers.loaded`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from broker.callers import CallersFileError, CallerTable, load_callers
from broker.events import emit
from broker.tasks import Repeating

WATCH_INTERVAL = 0.25  # seconds between looks at the file: a change applies within a second

Signature = tuple[int, int, int, int] | None


def signature(path: Path) -> Signature:
    """What identifies one version of the file (None: it cannot be seen now)."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return (info.st_dev, info.st_ino, info.st_mtime_ns, info.st_size)


class CallerGate:
    """The callers in force, from `path`; `start` begins watching it."""

    def __init__(self, path: Path, *, interval: float = WATCH_INTERVAL) -> None:
        self.path = path
        self._seen = signature(path)
        try:
            self.table: CallerTable = load_callers(path)
        except CallersFileError as exc:  # a bad file stops start-up, in one line
            raise CallersFileError(f"configuration error: BROKER_CALLERS_FILE: {exc}") from None
        emit("callers.loaded", path=str(path), callers=len(self.table))
        self._watch = Repeating(self.reload_if_changed, lambda: interval, "callers-watch")

    def start(self) -> None:
        self._watch.start()

    async def stop(self) -> None:
        await self._watch.stop()

    async def reload_if_changed(self) -> bool:
        """Re-read the file if it changed since last seen; True if new callers took effect."""
        now = signature(self.path)
        if now == self._seen:
            return False
        self._seen = now
        if now is None:
            emit(
                "callers.reload_failed",
                level=logging.WARNING,
                path=str(self.path),
                error="the file is gone; the previous callers stay in force",
            )
            return False
        try:
            table = load_callers(self.path)
        except CallersFileError as exc:
            emit(
                "callers.reload_failed",
                level=logging.WARNING,
                path=str(self.path),
                error=f"{exc}; the previous callers stay in force",
            )
            return False
        self.table = table
        emit("callers.loaded", path=str(self.path), callers=len(table))
        return True
