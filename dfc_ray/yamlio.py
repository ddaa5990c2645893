"""YAML a user hands dfc-ray (sweep specs, cluster files), read with bounds.

PyYAML's safe loader still builds whatever a document describes: nine nested aliases ("billion laughs")
describe 10⁹ strings that the first traversal (a merge, a dump, a schema check) expands until memory
runs out, and a repeated key silently keeps its last value. `load_yaml` refuses, in one line, a file
larger than `MAX_YAML_BYTES`, a document whose aliases would expand to more than `MAX_YAML_NODES`
nodes (counted without expanding them), an alias that contains itself, and a key given twice in one
mapping as written (a key merged in with ``<<: *defaults`` may still be overridden).
"""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

MAX_YAML_BYTES = 1 << 20
"""Largest YAML file read (1 MiB; the shipped specs and cluster files are a few KiB)."""
MAX_YAML_NODES = 100_000
"""Most nodes a document may hold once every alias is expanded (the largest shipped spec has ~600)."""
MERGE_TAG = "tag:yaml.org,2002:merge"


class _Refused(Exception):
    """A bound the document breaks; the message is the part after the file name."""


def _check_keys(node: MappingNode) -> None:
    """Refuse a key given twice in one mapping, as written (read before construction, where merge keys
    would already have been folded in)."""
    seen: set[tuple[str, str]] = set()
    for key_node, _ in node.value:
        if key_node.tag == MERGE_TAG or not isinstance(key_node, ScalarNode):
            continue
        key = (key_node.tag, key_node.value)
        if key in seen:
            raise _Refused(f"line {key_node.start_mark.line + 1}: key {key_node.value!r} given twice in one mapping "
                           "(expected each key once; YAML would keep only the last)")
        seen.add(key)


def checked_size(node: Node) -> int:
    """Nodes in the document once every alias is expanded, computed without expanding (each node's size is
    counted once and reused), each mapping's keys checked on the way; raises _Refused on an alias that
    contains itself or a key given twice."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()
    stack: list[tuple[Node, bool]] = [(node, False)]
    while stack:  # iterative post-order: a deeply nested document cannot hit the recursion limit
        current, children_done = stack.pop()
        key = id(current)
        if key in sizes:
            continue
        children: list[Node] = []
        if isinstance(current, SequenceNode):
            children = list(current.value)
        elif isinstance(current, MappingNode):
            children = [part for pair in current.value for part in pair]
            if not children_done:
                _check_keys(current)
        if children_done:
            open_nodes.discard(key)
            sizes[key] = 1 + sum(sizes[id(child)] for child in children)
            continue
        if key in open_nodes:
            raise _Refused(f"line {current.start_mark.line + 1}: an alias that contains itself")
        open_nodes.add(key)
        stack.append((current, True))
        for child in children:
            if id(child) in open_nodes:
                raise _Refused(f"line {child.start_mark.line + 1}: an alias that contains itself")
            stack.append((child, False))
    return sizes[id(node)]


def load_yaml(path: str | Path) -> Any:
    """The document in the file at `path` (None when empty); ValueError (one line naming the file) when it
    is not valid YAML or breaks a bound above."""
    path = Path(path)
    info = path.stat()
    if not stat.S_ISREG(info.st_mode):  # a FIFO would block the read, /dev/zero never end it
        raise ValueError(f"{path}: not a regular file (a folder, FIFO or device); expected a YAML file")
    if info.st_size > MAX_YAML_BYTES:
        raise ValueError(f"{path}: {info.st_size:,} bytes; expected a YAML file of at most {MAX_YAML_BYTES:,} bytes")
    with path.open("rb") as handle:  # bounded: a file that grows after the check is cut, then refused whole
        data = handle.read(MAX_YAML_BYTES + 1)
    try:
        text = data.decode()
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start}); expected a YAML file") from None
    return parse_yaml(text, str(path))


def parse_yaml(text: str, where: str) -> Any:
    """`load_yaml` for YAML already read (a run folder's spec.yaml, local or s3://); `where` names it in
    the one-line error."""
    if len(text) > MAX_YAML_BYTES:
        raise ValueError(f"{where}: {len(text):,} characters; expected a YAML file of at most {MAX_YAML_BYTES:,} bytes")
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        nodes = checked_size(node)
        if nodes > MAX_YAML_NODES:
            raise _Refused(f"its aliases expand to {nodes:,} nodes; expected at most {MAX_YAML_NODES:,} "
                           "(an alias bomb?)")
        return loader.construct_document(node)
    except _Refused as err:
        raise ValueError(f"{where}: {err}") from None
    except yaml.YAMLError as err:
        raise ValueError(f"{where}: not valid YAML ({' '.join(str(err).split())})") from None
    finally:
        loader.dispose()
