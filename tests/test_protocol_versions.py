"""The uvicorn the listeners build on (broker/protocol.py uses its HTTP protocol's internals):
the range the module declares, pyproject.toml's requirement, the lock and the installed
version agree, and a uvicorn outside the range is refused at import with what to do."""

from __future__ import annotations

import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from broker.protocol import UVICORN_BELOW, UVICORN_FROM, check_uvicorn

ROOT = Path(__file__).resolve().parent.parent


def declared() -> SpecifierSet:
    low, high = (".".join(map(str, bound)) for bound in (UVICORN_FROM, UVICORN_BELOW))
    return SpecifierSet(f">={low},<{high}")


def test_the_installed_uvicorn_is_one_the_protocol_module_works_with() -> None:
    installed = Version(metadata.version("uvicorn"))
    assert installed in declared(), f"uvicorn {installed} is outside {declared()}"


def test_pyproject_requires_the_range_the_protocol_module_declares() -> None:
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (requirement,) = [r for r in map(Requirement, dependencies) if r.name == "uvicorn"]
    assert requirement.specifier == declared()
    locked = [
        line
        for line in (ROOT / "requirements.lock").read_text().splitlines()
        if line.startswith("uvicorn==")
    ]
    assert locked and Version(locked[0].removeprefix("uvicorn==")) in declared()


@pytest.mark.parametrize("version", ["0.30.0", "0.44.0", "0.55.0", "1.0.0", "dev"])
def test_a_uvicorn_outside_the_range_is_refused_with_what_to_install(version: str) -> None:
    with pytest.raises(ImportError) as refused:
        check_uvicorn(version)
    message = str(refused.value)
    assert f"uvicorn {version} is installed" in message
    assert "need uvicorn >=0.45,<0.55 " in message
    assert "requirements.lock" in message


@pytest.mark.parametrize("version", ["0.45.0", "0.50.1", "0.54.0", "0.54.9rc1"])
def test_a_uvicorn_inside_the_range_is_accepted(version: str) -> None:
    check_uvicorn(version)
