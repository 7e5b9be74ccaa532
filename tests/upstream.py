"""Old import path of `support.upstream`, for test files not moved to it yet."""

from __future__ import annotations

from support.upstream import RecordingUpstream as RecordingUpstream
