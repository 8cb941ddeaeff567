"""The one YAML loader for files that come with a dataset (`data.yaml`, a Hugging Face dataset card).

PyYAML's `safe_load` runs no code, but it still expands aliases: a "billion laughs" document of a
few hundred bytes (`b: &b [*a, *a, ...]` nested ten deep) is a graph of shared lists that anything
walking it (printing a class name, copying the card) turns into gigabytes. This loader counts, while
composing, how many nodes every alias stands for and refuses the document once aliases would add more
than `MAX_YAML_ALIAS_NODES`, before anything is constructed; recursive aliases, and nesting too deep
for PyYAML's recursion, are refused outright. Documents larger than `MAX_YAML_BYTES` are refused
before they are read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from app.datasets.problems import ErrorCode

# A data.yaml or a dataset card's front matter is a few kilobytes; a megabyte is not a config file.
MAX_YAML_BYTES = 2**20
# Nodes that aliases may add to a document. Anchors reusing a list of class names fit easily; the
# fifth level of a billion-laughs document does not.
MAX_YAML_ALIAS_NODES = 100_000


class UnsafeYaml(Exception):
    """A YAML document this service does not load; `text` says what to fix, naming the limit."""

    code: ErrorCode = "unreadable_file"

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text


class YamlTooLarge(UnsafeYaml):
    code: ErrorCode = "file_too_large"


class YamlTooComplex(UnsafeYaml):
    code: ErrorCode = "yaml_too_complex"


def _too_large(size: int) -> YamlTooLarge:
    return YamlTooLarge(
        f"is {size} bytes, more than the {MAX_YAML_BYTES} bytes a YAML file may have (MAX_YAML_BYTES)"
    )


class _BoundedLoader(yaml.SafeLoader):
    """`SafeLoader` that weighs every collection node (itself and everything under it, aliases
    expanded) as it is composed, so the expansion is known before any Python object is built."""

    def __init__(self, stream: str | bytes) -> None:
        super().__init__(stream)
        # Weights of finished collection nodes by id (scalars weigh 1; nodes live as long as the loader).
        self._weights: dict[int, int] = {}
        self._alias_nodes = 0

    def _weight(self, node: yaml.Node) -> int:
        return 1 if isinstance(node, yaml.ScalarNode) else self._weights[id(node)]

    def compose_node(self, parent: yaml.Node | None, index: object) -> yaml.Node:
        if self.check_event(yaml.AliasEvent):
            node: yaml.Node = super().compose_node(parent, index)
            if not isinstance(node, yaml.ScalarNode) and id(node) not in self._weights:
                # The anchor is still being composed: the alias is inside its own anchor.
                raise YamlTooComplex("has a recursive alias (an anchor used inside itself); remove it")
            self._alias_nodes += self._weight(node)
            if self._alias_nodes > MAX_YAML_ALIAS_NODES:
                raise YamlTooComplex(
                    f"has aliases (*name) that expand to more than {MAX_YAML_ALIAS_NODES} nodes "
                    "(MAX_YAML_ALIAS_NODES; a 'billion laughs' document?); write the values out "
                    "instead of nesting anchors"
                )
            return node
        node = super().compose_node(parent, index)
        if isinstance(node, yaml.SequenceNode):
            self._weights[id(node)] = 1 + sum(self._weight(child) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            self._weights[id(node)] = 1 + sum(self._weight(k) + self._weight(v) for k, v in node.value)
        return node


def load_yaml(text: str | bytes) -> Any:
    """The document in `text`. Raises `UnsafeYaml` (too large, aliases expanding too far) or
    `yaml.YAMLError` (not valid YAML)."""
    size = len(text.encode() if isinstance(text, str) else text)
    if size > MAX_YAML_BYTES:
        raise _too_large(size)
    loader = _BoundedLoader(text)
    try:
        return loader.get_single_data()
    except RecursionError as exc:  # PyYAML composes and constructs nested collections by recursion
        raise YamlTooComplex("nests collections too deeply ([[[...); flatten it") from exc
    finally:
        loader.dispose()


def load_yaml_file(path: Path) -> Any:
    """The document in the file at `path`, refused by its size before it is read (see `load_yaml`).
    Raises `OSError` too."""
    with path.open("rb") as f:
        data = f.read(MAX_YAML_BYTES + 1)
        if len(data) > MAX_YAML_BYTES:
            raise _too_large(max(path.stat().st_size, len(data)))
    return load_yaml(data)
