"""A Kubernetes Secret (or ConfigMap) volume, written as the kubelet's atomic writer does.

Each version goes into a new hidden directory; the `..data` symlink is swapped to it in one
rename; every file name at the top is a symlink through `..data`; the old version is removed.
A reader holding the path sees the old file or the new one, never a mix.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path


def write_secret_volume(directory: Path, files: dict[str, str]) -> None:
    """Publish `files` (name → text) as the new version of the volume at `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    data = directory / "..data"
    old = data.resolve() if data.is_symlink() else None
    version = directory / f"..{uuid.uuid4().hex}"
    version.mkdir()
    for name, text in files.items():
        (version / name).write_text(text)
    staging = directory / "..data_tmp"
    staging.symlink_to(version.name)
    os.replace(staging, data)
    for name in files:
        link = directory / name
        if not link.is_symlink():
            link.symlink_to(f"..data/{name}")
    if old is not None:
        shutil.rmtree(old)
