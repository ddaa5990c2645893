"""BFCL tasks from the data shipped inside the installed ``bfcl-eval`` wheel, and JSON Schema conversion.

BFCL describes functions with its own type names (``dict``, ``float``, ``tuple``, ``any``); the rest of
dfc-ray speaks JSON Schema, so every schema is converted on load (``to_json_schema``).
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

from dfc_ray.tooluse.task import Task

CATEGORIES = (
    "simple_python",
    "multiple",
    "parallel",
    "parallel_multiple",
    "live_simple",
    "live_multiple",
    "live_parallel",
    "live_parallel_multiple",
    "irrelevance",
    "live_irrelevance",
)
"""Single-turn categories with JSON-typed answers (Java/JavaScript answers are source-code literals;
multi-turn, memory and web-search need an executor)."""
ALIASES = {"simple": "simple_python"}
"""Older BFCL names still seen in papers and configs."""
NO_CALL_CATEGORIES = ("irrelevance", "live_irrelevance")
"""Categories without a possible-answer file: the right reply calls no tool."""

_TYPE_NAMES = {
    "string": "string", "str": "string", "char": "string",
    "integer": "integer", "int": "integer", "long": "integer", "short": "integer", "byte": "integer",
    "number": "number", "float": "number", "double": "number",
    "boolean": "boolean", "bool": "boolean",
    "array": "array", "list": "array", "tuple": "array", "arraylist": "array",
    "object": "object", "dict": "object", "hashmap": "object", "map": "object",
    "null": "null", "none": "null",
}  # fmt: skip
"""Lower-cased type names (BFCL's, Python's, Java's) and their JSON Schema type; ``any`` and names not
listed here (``Union[int, float]``) become untyped."""


def json_type(name: str) -> str | None:
    """The JSON Schema type for a type name such as ``float``, ``String``, ``List[str]``, ``int, optional``."""
    base = name.split(",")[0].split("[")[0].strip().lower()
    return _TYPE_NAMES.get(base)


def to_json_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``schema`` with every type name mapped to JSON Schema (recursively through
    ``properties`` and ``items``); an untyped result means any value is accepted."""
    out = {k: v for k, v in schema.items() if k not in ("type", "properties", "items")}
    types = schema.get("type")
    if isinstance(types, str) and json_type(types):
        out["type"] = json_type(types)
    elif isinstance(types, list):
        out["type"] = [json_type(t) for t in types if json_type(t)]
    if isinstance(schema.get("properties"), dict):
        out["properties"] = {k: to_json_schema(v) for k, v in schema["properties"].items()}
    if isinstance(schema.get("items"), dict):
        out["items"] = to_json_schema(schema["items"])
    return out


def to_tool(function: dict[str, Any]) -> dict[str, Any]:
    """A BFCL function description as an OpenAI-style tool with a JSON Schema for its parameters."""
    inner = {"name": function["name"], "description": function.get("description", "")}
    inner["parameters"] = to_json_schema(function.get("parameters") or {"type": "dict", "properties": {}})
    return {"type": "function", "function": inner}


def data_dir() -> Path:
    """The ``data`` folder of the installed ``bfcl-eval`` package."""
    return Path(str(resources.files("bfcl_eval") / "data"))


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_bfcl(category: str) -> list[Task]:
    """Tasks of one BFCL category; ``Task.id`` is BFCL's id, the ground truth its possible answers."""
    category = ALIASES.get(category, category)
    if category not in CATEGORIES:
        raise ValueError(f"bfcl category {category!r} is not supported; expected one of {', '.join(CATEGORIES)}")
    name = f"BFCL_v4_{category}.json"
    answers = {}
    if category not in NO_CALL_CATEGORIES:
        answers = {r["id"]: r["ground_truth"] for r in _read_jsonl(data_dir() / "possible_answer" / name)}
    return [
        Task(
            id=record["id"],
            messages=record["question"][0],
            tools=[to_tool(f) for f in record["function"]],
            ground_truth=[] if category in NO_CALL_CATEGORIES else answers[record["id"]],
            category=category,
            meta={"source": f"bfcl:{category}"},
        )
        for record in _read_jsonl(data_dir() / name)
    ]
