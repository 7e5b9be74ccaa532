"""The Vault journal secret's contents: appending keeps the newest, garbage reads as none."""

from __future__ import annotations

import pytest

from broker.stores.vault_journal import Journal


def test_appending_numbers_the_changes_and_keeps_the_newest() -> None:
    journal = Journal("e1", 0, ()).append(["a", "b", "c"], keep=2)
    assert journal == Journal("e1", 3, ((2, "b"), (3, "c")))
    assert journal.append(["a"], keep=2).entries == ((3, "c"), (4, "a"))


def test_a_journal_round_trips_through_its_secret_data() -> None:
    journal = Journal("e1", 0, ()).append(["acme", "globex"], keep=10)
    assert Journal.decode(journal.encode()) == journal


@pytest.mark.parametrize(
    "data",
    [
        None,
        [],
        {"epoch": "e1", "revision": 1},
        {"epoch": "e-1", "revision": 1, "recent": []},  # not alphanumeric: not an epoch
        {"epoch": "e1", "revision": "1", "recent": []},
        {"epoch": "e1", "revision": True, "recent": []},
        {"epoch": "e1", "revision": 1, "recent": [[1]]},
        {"epoch": "e1", "revision": 1, "recent": [["1", "acme"]]},
        {"epoch": "e1", "revision": 1, "recent": [[1, 2]]},
    ],
)
def test_data_that_is_not_a_journal_reads_as_none(data: object) -> None:
    assert Journal.decode(data) is None
