"""Reading the YAML and JSON files that users hand to lmerge (configs, catalogs, adapter configs),
strictly and with one-line errors.

Strict means: a file larger than :data:`MAX_FILE_BYTES` is refused before it is parsed; a key
given twice in one mapping is refused (PyYAML and ``json`` keep the last one silently); YAML
aliases are followed only while the expanded document stays under :data:`MAX_NODES` values (an
alias-expansion bomb is refused after composing its small node graph, before anything is
expanded); and nesting deeper than :data:`MAX_DEPTH` is refused.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from lmerge.errors import ConfigError, LMergeError

MAX_FILE_BYTES = 16 << 20
"""Largest config file read: far above any real config, far below what would exhaust memory."""
MAX_DEPTH = 64
"""Deepest nesting of mappings and lists accepted (real configs stay under ten)."""
MAX_NODES = 1_000_000
"""Most values a YAML document may expand to once its aliases are followed."""

_MERGE_TAG = "tag:yaml.org,2002:merge"


def read_yaml(path: str | Path, what: str = "config file") -> dict[str, Any]:
    """A YAML mapping from ``path``; malformed, hostile or non-mapping files name the file and line."""
    path = Path(path)
    data = parse_yaml(_read_text(path, what), str(path))
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys, got {type(data).__name__}")
    return data


def parse_yaml(text: str, source: str = "<string>") -> Any:
    """The YAML value in ``text``, read strictly (duplicate keys, alias expansion and depth
    checked); any problem is a :class:`ConfigError` naming ``source`` and the line."""
    try:
        return _parse(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "parse error"
        raise ConfigError(f"{source}:{where}: malformed YAML ({problem})") from None
    except _Refused as exc:
        raise ConfigError(f"{source}: {exc}") from None


def _parse(text: str) -> Any:
    """The strict reading of ``text``: raises :class:`yaml.YAMLError` or :class:`_Refused`."""
    loader = _StrictLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_graph(node)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def strict_loader(load: Callable[[str], Any], source: str = "config value") -> Callable[[str], Any]:
    """``load`` (a YAML loader taking text, such as jsonargparse's) with the text first read
    strictly: duplicate keys, alias bombs and deep nesting are a :class:`ConfigError` naming
    ``source``; text that is not YAML at all raises ``load``'s own error, as before."""

    def strict(text: str) -> Any:
        try:
            _parse(text)
        except _Refused as exc:
            raise ConfigError(f"{source}: {exc}") from None
        except yaml.YAMLError:
            pass  # ``load`` raises its own error, which its caller knows how to take
        return load(text)

    return strict


def read_json(path: str | Path, what: str = "JSON file", error: type[LMergeError] = ConfigError) -> Any:
    """The JSON value in ``path``: size, duplicate keys and nesting depth checked; any problem is
    ``error`` with one line naming the file."""
    path = Path(path)
    try:
        text = _read_text(path, what)
    except ConfigError as exc:
        raise error(str(exc)) from None
    try:
        data = json.loads(text, object_pairs_hook=_unique_pairs)
    except json.JSONDecodeError as exc:
        raise error(f"{path}: invalid JSON ({exc})") from None
    except _Refused as exc:
        raise error(f"{path}: {exc}") from None
    except RecursionError:
        raise error(f"{path}: nested deeper than {MAX_DEPTH} levels") from None
    if _depth(data) > MAX_DEPTH:
        raise error(f"{path}: nested deeper than {MAX_DEPTH} levels")
    return data


class _Refused(Exception):
    """A hostile or ambiguous document, refused while it is read (carries the reason)."""


def _read_text(path: Path, what: str) -> str:
    if not path.is_file():
        raise ConfigError(f"{path}: {what} does not exist")
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{path}: {what} cannot be read ({exc.strerror or exc})") from None
    if len(data) > MAX_FILE_BYTES:
        raise ConfigError(f"{path}: {what} is larger than {MAX_FILE_BYTES >> 20} MiB; refusing to read it")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file") from None


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing duplicate keys and nesting beyond :data:`MAX_DEPTH` while
    scanning and composing (before Python's recursion limit could turn deep nesting into a crash)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def fetch_flow_collection_start(self, token_class: type) -> None:
        # Refused while scanning: the scanner looks ahead over every open ``[``/``{``, so a deep
        # flow collection would cost quadratic time before the composer saw its depth.
        super().fetch_flow_collection_start(token_class)
        if self.flow_level > MAX_DEPTH:
            raise _Refused(f"line {self.line + 1}: nested deeper than {MAX_DEPTH} levels")

    def compose_node(self, parent: Node | None, index: Any) -> Node:
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise _Refused(f"line {self.peek_event().start_mark.line + 1}: nested deeper than {MAX_DEPTH} levels")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def compose_mapping_node(self, anchor: str | None) -> MappingNode:
        node = super().compose_mapping_node(anchor)
        _refuse_duplicate_keys(self, node)
        return node


def _refuse_duplicate_keys(loader: _StrictLoader, node: MappingNode) -> None:
    # Checked as composed, before ``<<`` merges are flattened into the mapping: a key that
    # overrides one brought in by a merge is YAML's way to specialize an anchor, not a duplicate.
    first_line: dict[Any, int] = {}
    for key_node, _ in node.value:
        if not isinstance(key_node, ScalarNode) or key_node.tag == _MERGE_TAG:
            continue
        key = loader.construct_object(key_node)
        line = key_node.start_mark.line + 1
        if key in first_line:
            raise _Refused(f"line {line}: duplicate key {key!r} (first given on line {first_line[key]})")
        first_line[key] = line


def _check_graph(root: Node) -> None:
    """Refuse a composed document whose alias expansion would exceed :data:`MAX_NODES` values or
    :data:`MAX_DEPTH` levels, or that refers to itself. Sizes are memoized per node, so a bomb of
    a few lines costs a few steps, never its expansion."""
    sizes: dict[int, tuple[int, int]] = {}  # id(node) -> (expanded values, depth)
    active: set[int] = set()
    stack: list[tuple[Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if key in sizes:
            continue
        children = _children(node)
        if not children_done:
            if key in active:
                raise _Refused(f"line {node.start_mark.line + 1}: an alias refers to the value that contains it")
            active.add(key)
            stack.append((node, True))
            stack.extend((child, False) for child in children if id(child) not in sizes)
            continue
        active.discard(key)
        size = 1 + sum(sizes[id(child)][0] for child in children)
        depth = 1 + max((sizes[id(child)][1] for child in children), default=0)
        if size > MAX_NODES:
            raise _Refused(f"line {node.start_mark.line + 1}: aliases expand to more than {MAX_NODES:,} values")
        if depth > MAX_DEPTH:
            raise _Refused(f"line {node.start_mark.line + 1}: aliases nest deeper than {MAX_DEPTH} levels")
        sizes[key] = (size, depth)


def _children(node: Node) -> list[Node]:
    if isinstance(node, SequenceNode):
        return list(node.value)
    if isinstance(node, MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _Refused(f"duplicate key {key!r}")
        result[key] = value
    return result


def _depth(value: Any) -> int:
    """Nesting depth of parsed JSON, without recursion."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            item = list(item.values())
        if isinstance(item, list):
            deepest = max(deepest, level)
            if level <= MAX_DEPTH:
                stack.extend((child, level + 1) for child in item)
    return deepest
