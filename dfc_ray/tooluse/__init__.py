"""Tool-calling tasks (organism, BFCL, ToolRL-style, JSONL), prompt rendering and scoring."""

from dfc_ray.tooluse.parse import ParseResult, ToolCall, parse_tool_calls
from dfc_ray.tooluse.scoring import Score, score, seed_lenient
from dfc_ray.tooluse.tasks import Task, load_tasks, render_for, render_prompt, render_raw_prompt

__all__ = ["ParseResult", "Score", "Task", "ToolCall", "load_tasks", "parse_tool_calls", "render_for", "render_prompt",
           "render_raw_prompt", "score", "seed_lenient"]
