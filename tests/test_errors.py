"""The error tree drawn in broker.errors' docstring is the tree of its classes."""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass

import pytest

from broker import errors

# "    │   ├── KeyInvalid               422 key_invalid (any remark)"
LINE = re.compile(
    r"^(?P<branches>(?:[│ ]   )*)(?:[├└]── )?(?P<name>[A-Z]\w*)"
    r"(?:\s+(?P<status>\d{3}) (?P<code>[a-z_]+))?(?:\s+\(.*\))?\s*$"
)


@dataclass(frozen=True)
class Drawn:
    name: str
    parent: str | None
    status: int | None
    code: str | None


def drawing() -> list[Drawn]:
    """The tree in the module docstring: the indented block before the first blank line
    after it, one class a line, four columns a level."""
    doc = errors.__doc__ or ""
    lines = doc.split("\n\n")[1].splitlines()
    path: list[str] = []
    drawn = []
    for line in lines:
        match = LINE.match(line.removeprefix("    "))
        assert match, f"not a line of the tree: {line!r}"
        depth = len(match["branches"]) // 4 + (1 if "──" in line else 0)
        assert depth <= len(path), f"{match['name']} is drawn deeper than its parent"
        del path[depth:]
        drawn.append(
            Drawn(
                name=match["name"],
                parent=path[-1] if path else None,
                status=int(match["status"]) if match["status"] else None,
                code=match["code"],
            )
        )
        path.append(match["name"])
    return drawn


def classes() -> dict[str, type[errors.BrokerError]]:
    return {
        name: cls
        for name, cls in vars(errors).items()
        if inspect.isclass(cls)
        and issubclass(cls, errors.BrokerError)
        and cls.__module__ == errors.__name__
    }


def test_the_drawing_is_a_tree_rooted_in_broker_error() -> None:
    drawn = drawing()
    assert drawn[0] == Drawn("BrokerError", None, None, None)
    assert [d.parent for d in drawn[1:]].count(None) == 0


def test_every_class_is_drawn_once() -> None:
    names = [d.name for d in drawing()]
    assert sorted(names) == sorted(set(names)), "a class is drawn twice"
    assert set(names) == set(classes())


@pytest.mark.parametrize("drawn", drawing(), ids=lambda d: d.name)
def test_each_class_sits_where_it_is_drawn(drawn: Drawn) -> None:
    cls = classes()[drawn.name]
    if drawn.parent is not None:
        broker_bases = [b for b in cls.__bases__ if issubclass(b, errors.BrokerError)]
        assert [b.__name__ for b in broker_bases] == [drawn.parent]
    if drawn.code is not None:
        assert (cls.status, cls.code) == (drawn.status, drawn.code)
    elif cls is not errors.BrokerError:  # the root's 500 internal_error is its default
        # undrawn: never answered with a code of its own (a parent's, or the root's)
        assert "code" not in vars(cls)
        assert "status" not in vars(cls)


def test_every_code_is_one_class() -> None:
    answered = [cls.code for cls in classes().values() if "code" in vars(cls)]
    assert sorted(answered) == sorted(set(answered))


def test_the_parse_notices_a_misplaced_class() -> None:
    """The test itself: a drawing that puts a class under the wrong parent is caught."""
    moved = (errors.__doc__ or "").replace(
        "    │   └── PleoUnavailable ", "    ├── PleoUnavailable     "
    )
    assert moved != errors.__doc__
    original = errors.__doc__
    try:
        errors.__doc__ = moved
        drawn = {d.name: d for d in drawing()}
    finally:
        errors.__doc__ = original
    assert drawn["PleoUnavailable"].parent == "BrokerError"
    assert drawn["CompanyInUse"].parent == "ActivationError"


def test_old_import_paths_still_work() -> None:
    """The classes moved into errors.py; the modules that defined them still offer them."""
    from broker import catalog, pleo, settings
    from broker.stores import crypto

    assert catalog.CatalogError is errors.CatalogError
    assert settings.ConfigError is errors.ConfigError
    assert crypto.UnsealError is errors.UnsealError
    assert pleo.PleoError is errors.PleoError
    assert pleo.PleoKeyRejected is errors.PleoKeyRejected
    assert pleo.PleoUnreachable is errors.PleoUnreachable
    assert pleo.PleoUnexpectedAnswer is errors.PleoUnexpectedAnswer


def test_a_catalog_error_is_still_a_value_error() -> None:
    assert issubclass(errors.CatalogError, ValueError)
    assert str(errors.CatalogError("x.json: cannot be read")) == "x.json: cannot be read"


def test_store_errors_share_a_parent() -> None:
    for cls in (
        errors.StoreUnavailable,
        errors.StoreConflict,
        errors.StoreIntegrityError,
        errors.UnsealError,
    ):
        assert issubclass(cls, errors.StoreError)
    assert not issubclass(errors.PleoUnavailable, errors.StoreError)


def test_a_rejected_key_keeps_pleos_status() -> None:
    rejected = errors.PleoKeyRejected(403)
    assert rejected.status == 403
    assert str(rejected) == "Pleo rejected the key (HTTP 403)"
    assert errors.PleoKeyRejected.status == 500  # the class: never answered by the broker
