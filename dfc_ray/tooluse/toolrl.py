"""The seed study's prompt format: the offered tools as a numbered list inside a ToolRL-style system prompt.

The study's data put the tools into the system text as `1. Name: X` entries and fed system + user text
to the tokenizer without a chat template; its model A was RL-trained (ToolRL reward) to answer with
`<think>`, then one `<tool_call>` block holding one `{"name", "parameters"}` object per line. This module
renders any task that way (`as_toolrl`) and loads JSONL tasks in it (`load_toolrl`, `toolrl:` sources).
The wording is dfc-ray's own; the layout (numbered `Name:` / `Description:` / `Parameters:` entries) is the
study's. Scoring such replies: `dfc_ray.tooluse.scoring.seed_lenient` (the study's metric) and `score`.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from dfc_ray.tooluse.jsonl import load_jsonl
from dfc_ray.tooluse.task import Task

SAMPLE = Path(__file__).parent / "data" / "toolrl_sample.jsonl"
"""Twenty hand-written tasks (ground truth included) in the JSONL format of docs/tooluse.md."""
PROMPT_FORMAT = "toolrl"
"""`Task.meta["prompt_format"]` of a task whose system message holds the numbered tool list."""

_INSTRUCTIONS = """You help the user by calling tools when a tool can do what they ask.

Available tools:
{tools}

How to answer:
First reason inside <think> </think>. To call tools, write one <tool_call> </tool_call> block that holds
one JSON object per call, each on its own line:
<tool_call>
{{"name": "tool name", "parameters": {{"parameter name": "value"}}}}
</tool_call>
If no tool fits the request, call none and answer inside <response> </response>."""


def numbered_tool_list(tools: list[dict[str, Any]]) -> str:
    """`1. Name: X` entries with their description, parameters (JSON Schema properties) and required ones."""
    entries = []
    for number, tool in enumerate(tools, 1):
        function = tool["function"]
        params = function.get("parameters") or {}
        lines = [f"{number}. Name: {function['name']}",
                 f"   Description: {function.get('description', '')}",
                 f"   Parameters: {json.dumps(params.get('properties') or {}, ensure_ascii=False)}"]
        if params.get("required"):
            lines.append(f"   Required: {', '.join(params['required'])}")
        entries.append("\n".join(lines))
    return "\n".join(entries)


def toolrl_system_prompt(tools: list[dict[str, Any]]) -> str:
    """The system text: instructions around the numbered tool list and the reply format."""
    return _INSTRUCTIONS.format(tools=numbered_tool_list(tools))


def as_toolrl(task: Task) -> Task:
    """`task` with the numbered tool list as its system message (the task's own system text follows the
    instructions); tools, ground truth and id unchanged, so the strict score still applies."""
    own = [m["content"] for m in task.messages if m["role"] == "system"]
    system = "\n\n".join([toolrl_system_prompt(task.tools), *own])
    rest = [m for m in task.messages if m["role"] != "system"]
    return replace(task, messages=[{"role": "system", "content": system}, *rest],
                   meta={**task.meta, "prompt_format": PROMPT_FORMAT})


def load_toolrl(source: str) -> list[Task]:
    """`sample` (the shipped file) or a JSONL path (docs/tooluse.md's format), rendered with `as_toolrl`."""
    return [as_toolrl(task) for task in load_jsonl(SAMPLE if source == "sample" else source)]
