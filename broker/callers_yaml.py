"""Reading the callers file's YAML (`broker.callers`): safe, with a key given twice noted.

YAML's usual last-one-wins would let `tenants: ['*']` below a narrower list widen a caller,
so each mapping remembers the first key it was given twice (`duplicate`) and the callers
file refuses it. PyYAML is imported with this module, which `broker.callers` imports when it
reads a file: a broker without `BROKER_CALLERS_FILE` does not load it (docs/decisions.md,
"What `broker serve` imports when").
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import yaml


class YamlSyntaxError(ValueError):
    """The text is not YAML; `line` (1-based) is where the parser stopped, when known."""

    def __init__(self, line: int | None) -> None:
        super().__init__("not valid YAML")
        self.line = line


class NotedMapping(dict[Any, Any]):
    """A YAML mapping that remembers the first key it was given twice."""

    duplicate: str | None = None


class _StrictLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` whose mappings note a duplicate key instead of keeping the last."""


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> NotedMapping:
    loader.flatten_mapping(node)
    mapping = NotedMapping()
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, Hashable):
            raise yaml.constructor.ConstructorError(
                None, None, "found an unhashable key", key_node.start_mark
            )
        if key in mapping and mapping.duplicate is None:
            mapping.duplicate = str(key)[:40]
        mapping[key] = loader.construct_object(value_node, deep=True)
    return mapping


_StrictLoader.add_constructor("tag:yaml.org,2002:map", _construct_mapping)


def load_document(text: str) -> object:
    """The document `text` holds, its mappings `NotedMapping`s; `YamlSyntaxError` if none."""
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise YamlSyntaxError(mark.line + 1 if mark is not None else None) from None
