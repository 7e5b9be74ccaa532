"""`broker sandbox --state-file PATH`: the sandbox's state kept in a JSON file across restarts.

Kept: keys (their SHA-256 digests and settings, never key text), companies and employees,
every Pleo record (vendors, tax codes, tags, accounts, export jobs and items, subscriptions
with their webhook secrets), and the rate limit. Not kept: the request log, faults, webhook
deliveries. The file is written after every request that may change state (any method but
GET and HEAD), atomically (a temporary file renamed over it) and readable by its owner only.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from broker.sandbox.state import Company, KeyRecord, SandboxState

VERSION = 1


class StateFileError(ValueError):
    """The state file cannot be read as a sandbox's state."""


def dump(state: SandboxState) -> dict[str, Any]:
    limit = state.rate_limit
    return {
        "version": VERSION,
        "keys": [dataclasses.asdict(key) for key in state.keys.values()],
        "companies": [
            {
                "id": c.id,
                "name": c.name,
                "organization_id": c.organization_id,
                "employees": c.employees,
            }
            for c in state.companies.values()
        ],
        "records": state.records,
        "job_items": state.job_items,
        "rate_limit": None if limit is None else limit.to_json(),
    }


def restore(state: SandboxState, saved: dict[str, Any]) -> None:
    """Put what `dump` wrote back into `state` (whose named collections stay the same dicts)."""
    if saved.get("version") != VERSION:
        raise StateFileError(f"unknown state file version {saved.get('version')!r}")
    for fields in saved["keys"]:
        key = KeyRecord(**fields)
        key.scopes = tuple(key.scopes)
        state.adopt_key(key)
    for fields in saved["companies"]:
        state.companies[fields["id"]] = Company(**fields)
    for path, records in saved["records"].items():
        state.collection(path).update(records)
    state.job_items.update(saved["job_items"])
    limit = saved.get("rate_limit")
    if limit is not None:
        state.limit_rate(limit["requests_per_second"], limit["burst"])


def load(path: Path) -> SandboxState:
    """The state saved at `path`; a fresh state when there is no file yet."""
    state = SandboxState()
    if not path.exists():
        return state
    try:
        restore(state, json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise StateFileError(f"{path} is not a sandbox state file: {error}") from None
    return state


def save(state: SandboxState, path: Path) -> None:
    """Write the state to `path` atomically, readable by its owner only."""
    text = json.dumps(dump(state))
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(descriptor, "w") as file:
            file.write(text)
        os.chmod(temporary, 0o600)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
