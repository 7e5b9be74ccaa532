"""Real file-system failures for tests: a directory made read-only, a small disk that fills up.

As root (the CI container and the build machine) a private tmpfs is mounted and remounted
read-only, or filled to its size; root ignores file modes, so `chmod` alone would not stop
it writing. As another user `chmod` is the real thing, and a full disk cannot be made without
privileges: those tests skip, saying why.
"""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


def _mount(*args: str) -> None:
    done = subprocess.run(["mount", *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise OSError(f"mount {' '.join(args)}: {done.stderr.strip()}")


def _unmount(path: Path) -> None:
    # Lazy: a broker still holding files open there does not keep the mount busy.
    subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


@contextmanager
def tmpfs(path: Path, *, size: str = "4m") -> Iterator[Path]:
    """A private tmpfs of `size` at `path` (root only; otherwise the test skips)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    path.mkdir(parents=True, exist_ok=True)
    try:
        _mount("-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path))
    except OSError as exc:
        pytest.skip(f"cannot mount a tmpfs here ({exc})")
    try:
        yield path
    finally:
        _unmount(path)


@contextmanager
def writable_until_frozen(path: Path) -> Iterator[Path]:
    """A directory at `path` that `freeze(path)` later makes read-only for this process."""
    if os.geteuid() != 0:
        path.mkdir(parents=True, exist_ok=True)
        try:
            yield path
        finally:
            for item in [path, *path.iterdir()]:  # let pytest clean up
                item.chmod(0o700)
        return
    with tmpfs(path) as mounted:
        yield mounted


def freeze(path: Path) -> None:
    """Make `path` (from `writable_until_frozen`) read-only: a read-only mount, or modes."""
    if os.geteuid() != 0:
        for item in path.iterdir():
            item.chmod(0o400)
        path.chmod(0o500)
    else:
        _mount("-o", "remount,ro", str(path))
    probe = path / "probe"
    try:
        probe.touch()
    except OSError as exc:
        assert exc.errno in (errno.EROFS, errno.EACCES)
    else:
        raise AssertionError(f"{path} is still writable")


def fill(path: Path) -> Path:
    """Fill the file system `path` is on; returns the filler file (delete it to free space)."""
    filler = path / "filler"
    chunk = b"\0" * 65536
    with filler.open("wb", buffering=0) as out:
        try:
            while True:
                out.write(chunk)  # unbuffered: a short write, then ENOSPC
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    return filler
