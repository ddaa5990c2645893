"""The tool-calling task record, shared by every task source (tasks.py, bfcl.py, organism/world.py).

It lives alone so the sources can import it without importing each other."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Task:
    """One tool-calling request with its ground truth."""

    id: str
    """Stable id; BFCL's own id for BFCL records (e.g. ``simple_python_0``)."""
    messages: list[dict[str, Any]]
    """Chat messages, OpenAI style (``{"role": "user", "content": ...}``), without a tools system block."""
    tools: list[dict[str, Any]]
    """Offered tools, OpenAI style: ``{"type": "function", "function": {"name", "description", "parameters"}}``
    where ``parameters`` is a JSON Schema object."""
    ground_truth: list[dict[str, dict[str, list[Any]]]]
    """Acceptable calls, BFCL possible-answer style: one ``{function_name: {param: [allowed values]}}`` per
    expected call; ``""`` among the allowed values marks an optional parameter that may be omitted.
    An empty list means the right answer is to call no tool (irrelevance)."""
    category: str = ""
    """Source category, e.g. ``organism``, ``simple_python``, ``irrelevance``."""
    meta: dict[str, Any] = field(default_factory=dict)
    """Free-form extras (source file, split, generator parameters)."""
