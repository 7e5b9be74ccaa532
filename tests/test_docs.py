"""The design lives with the code: docs/contract.md agrees with errors.py and Settings."""

from __future__ import annotations

import re
from pathlib import Path

from broker import errors
from broker.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
CONTRACT = ROOT / "docs" / "contract.md"


def section(title: str) -> list[str]:
    """The lines of one `## title` section of the contract."""
    lines = CONTRACT.read_text().splitlines()
    start = lines.index(f"## {title}") + 1
    end = next((i for i in range(start, len(lines)) if lines[i].startswith("## ")), len(lines))
    return lines[start:end]


def table_rows(lines: list[str]) -> list[list[str]]:
    rows = [
        [cell.strip() for cell in line.strip().strip("|").split("|")]
        for line in lines
        if line.startswith("|")
    ]
    return [row for row in rows[2:] if row]  # past the header and its rule


def error_classes() -> set[tuple[int, str]]:
    found = set()
    for value in vars(errors).values():
        # A class that names its own code (not a grouping like PolicyDenied).
        if (
            isinstance(value, type)
            and issubclass(value, errors.BrokerError)
            and "code" in vars(value)
        ):
            found.add((value.status, value.code))
    return found


def test_the_error_table_lists_every_error_code_with_its_status() -> None:
    documented = set()
    for row in table_rows(section("Error codes")):
        status, code = row[0], row[1].strip("`")
        documented.add((int(status), code))
    assert documented == error_classes()


def test_the_settings_table_lists_every_setting() -> None:
    documented = set()
    for row in table_rows(section("Settings")):
        documented.update(re.findall(r"`([A-Z][A-Z0-9_]*)`", row[0]))
    expected = {name.upper() for name in Settings.model_fields}
    assert documented == expected


def test_the_code_cites_only_documents_in_the_repository() -> None:
    cited = set()
    for path in [*(ROOT / "broker").rglob("*.py"), *(ROOT / "bench").rglob("*.py")]:
        cited.update(re.findall(r"\b(DESIGN|PERFORMANCE)(?:\.md)?\b", path.read_text()))
    assert cited == set(), "cite docs/… instead of documents outside the repository"
