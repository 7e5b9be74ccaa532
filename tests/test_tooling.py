"""The development tooling a newcomer relies on: the dev lock agrees with pyproject.toml."""

from __future__ import annotations

import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent


def pins(lock: str) -> dict[str, Version]:
    found: dict[str, Version] = {}
    for line in (ROOT / lock).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        requirement = Requirement(line)
        (spec,) = requirement.specifier
        assert spec.operator == "==", f"{lock}: not pinned: {line}"
        found[canonicalize_name(requirement.name)] = Version(spec.version)
    return found


def pyproject() -> dict[str, object]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_dev_lock_pins_every_runtime_and_dev_requirement_within_its_range() -> None:
    locked = pins("requirements-dev.lock")
    project = pyproject()
    runtime = project["project"]["dependencies"]  # type: ignore[index]
    dev = project["dependency-groups"]["dev"]  # type: ignore[index]
    for line in [*runtime, *dev]:
        requirement = Requirement(line)
        name = canonicalize_name(requirement.name)
        assert name in locked, f"{name} is required but not in requirements-dev.lock"
        assert requirement.specifier.contains(locked[name]), f"{name}=={locked[name]} vs {line}"


def test_dev_lock_agrees_with_the_image_lock() -> None:
    dev, image = pins("requirements-dev.lock"), pins("requirements.lock")
    differing = {name: (image[name], dev[name]) for name in image if dev.get(name) != image[name]}
    assert differing == {}, "run scripts/lock-requirements.sh"


def test_the_environment_is_the_locked_one() -> None:
    # `make` installs exactly the dev lock: a test run against other versions is not reproducible.
    drifted: dict[str, Version | None] = {}
    for name, version in pins("requirements-dev.lock").items():
        try:
            installed = Version(metadata.version(name))
        except metadata.PackageNotFoundError:
            drifted[name] = None
            continue
        if installed != version:
            drifted[name] = installed
    assert drifted == {}, "the environment differs from requirements-dev.lock; run `make`"
