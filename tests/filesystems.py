"""Old import path of `support.filesystems`, for test files not moved to it yet."""

from __future__ import annotations

from support.filesystems import fill as fill
from support.filesystems import freeze as freeze
from support.filesystems import tmpfs as tmpfs
from support.filesystems import writable_until_frozen as writable_until_frozen
