"""Change journals: how a store tells a reader which tenants changed since it last looked.

Each store appends `(revision, tenant)` to its journal after every put and delete; revisions
count up from 1. A reader keeps the opaque cursor `changes_since` hands back. The cursor is
`<backend>:<instance>:<revision>`: `instance` names one journal (a database file, a Vault
journal's random epoch), so a cursor from another journal (another file, a recreated database,
a recreated journal secret) cannot be answered and the reader reloads everything. A journal
keeps only its newest entries, so a cursor older than the oldest one kept cannot be answered
either; nor can one ahead of the journal (a store restored from an older backup). A cursor
read while no journal existed (`<backend>:-:0`) is good for the journal the next write
creates, as long as that journal still holds its first entry.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from broker.records import valid_tenant_id

NO_INSTANCE = "-"  # the instance of a journal that does not exist yet


@dataclass(frozen=True, slots=True)
class Cursor:
    """A position in one journal: everything up to `revision` has been seen."""

    backend: str
    instance: str
    revision: int

    def __str__(self) -> str:
        return f"{self.backend}:{self.instance}:{self.revision}"


def parse_cursor(text: str | None) -> Cursor | None:
    """The cursor `text` spells, or None if it is not one."""
    if text is None:
        return None
    parts = text.split(":")
    if len(parts) != 3 or not all(parts) or not parts[2].isdigit():
        return None
    return Cursor(parts[0], parts[1], int(parts[2]))


def readable_from(text: str | None, current: Cursor, oldest_held: int) -> int | None:
    """The revision after which `current`'s journal lists every change, or None if it cannot.

    `oldest_held` is the oldest revision still in the journal (`current.revision + 1` when
    it holds none).
    """
    cursor = parse_cursor(text)
    if cursor is None or cursor.backend != current.backend:
        return None
    before_any = cursor.instance == NO_INSTANCE and cursor.revision == 0
    if cursor.instance != current.instance and not before_any:
        return None
    if not oldest_held - 1 <= cursor.revision <= current.revision:
        return None
    return cursor.revision


def tenants_of(entries: Iterable[tuple[int, str]], after: int) -> list[str]:
    """The distinct well-formed tenant ids of the entries after revision `after`, in order."""
    seen: dict[str, None] = {}
    for revision, tenant in entries:
        if revision > after and valid_tenant_id(tenant):
            seen.setdefault(tenant, None)
    return list(seen)
