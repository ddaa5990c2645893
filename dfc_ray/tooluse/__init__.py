"""Tool-calling tasks (organism, BFCL, JSONL), prompt rendering and strict scoring."""

from dfc_ray.tooluse.parse import ParseResult, ToolCall, parse_tool_calls
from dfc_ray.tooluse.scoring import Score, score
from dfc_ray.tooluse.tasks import Task, load_tasks, render_prompt

__all__ = ["ParseResult", "Score", "Task", "ToolCall", "load_tasks", "parse_tool_calls", "render_prompt", "score"]
