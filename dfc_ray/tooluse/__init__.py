"""Tool-calling tasks (organism, BFCL, ToolRL-style, JSONL), prompt rendering, tool-call dialects and scoring."""

from dfc_ray.tooluse.dialects import DIALECTS, Dialect, any_call, detect_dialect, get_dialect
from dfc_ray.tooluse.parse import ParseResult, ToolCall, parse_tool_calls
from dfc_ray.tooluse.scoring import Score, score, seed_lenient
from dfc_ray.tooluse.tasks import Task, load_tasks, render_for, render_prompt, render_raw_prompt

__all__ = ["DIALECTS", "Dialect", "ParseResult", "Score", "Task", "ToolCall", "any_call", "detect_dialect",
           "get_dialect", "load_tasks", "parse_tool_calls", "render_for", "render_prompt", "render_raw_prompt", "score",
           "seed_lenient"]
