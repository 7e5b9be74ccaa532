"""What the sandbox implements, as the Markdown in the README's sandbox section.

`tests/sandbox/test_sandbox_walk.py` checks that the README holds exactly `markdown()` between the
markers; after changing routes, regenerate it with `python -m broker.sandbox.inventory`.
"""

from __future__ import annotations

import sys
from pathlib import Path

from starlette.routing import Route

from broker.sandbox import generic, specs
from broker.sandbox.app import HANDWRITTEN, PLEO_ROUTES
from broker.sandbox.control import CONTROL_ROUTES

START = "<!-- sandbox-inventory:start (python -m broker.sandbox.inventory) -->"
END = "<!-- sandbox-inventory:end -->"
README = Path(__file__).parents[2] / "README.md"


def _how(method: str, template: str) -> str:
    written = {(r.method, r.template): r for r in HANDWRITTEN}
    route = written.get((method, template))
    if route is not None:
        module = route.handler.__module__.rsplit(".", 1)[-1]
        return f"`{module}.{route.handler.__name__}`"
    return f"spec-driven ({generic.plan(method, template).kind})"


def markdown() -> str:
    operations = specs.operations()
    served = {(route.method, route.template) for route in PLEO_ROUTES}
    lines = [
        f"All {len(operations)} operations of Pleo's {len(_spec_names())} published specs "
        f"({len(served & set(operations))} served):",
        "",
        "<details><summary>Every operation and what answers it</summary>",
        "",
        "| spec | operation | answered by |",
        "|---|---|---|",
    ]
    for (method, template), op in sorted(operations.items(), key=lambda kv: (kv[1].spec, kv[0])):
        lines.append(f"| {op.spec} | `{method} {template}` | {_how(method, template)} |")
    lines += ["", "</details>", "", "Control API (no auth; keep the sandbox on 127.0.0.1):", ""]
    for route in CONTROL_ROUTES:
        assert isinstance(route, Route)
        for method in sorted((route.methods or set()) - {"HEAD"}):
            lines.append(f"- `{method} /_sandbox{route.path}`")
    return "\n".join(lines) + "\n"


def _spec_names() -> list[str]:
    return sorted(path.name for path in specs.SPEC_DIR.glob("pleo-*-openapi.yml"))


def current(readme: str) -> str:
    """The generated block as the README holds it now ('' when missing)."""
    start, end = readme.find(START), readme.find(END)
    if start < 0 or end < start:
        return ""
    return readme[start + len(START) : end].strip("\n") + "\n"


def write(path: Path = README) -> None:
    text = path.read_text()
    start, end = text.index(START), text.index(END)
    path.write_text(text[: start + len(START)] + "\n" + markdown() + text[end:])


if __name__ == "__main__":
    write(Path(sys.argv[1]) if len(sys.argv) > 1 else README)
