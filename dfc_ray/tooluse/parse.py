"""Tool-call records and the parser of the Hermes dialect (Qwen2.5-style ``<tool_call>`` blocks).

The other dialects' parsers and the registry are in ``dialects.py``; they share the records and the JSON
helpers below.

A reply calls tools with one or more ``<tool_call>`` blocks, each holding JSON::

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

Accepted inside a block: one call object or a JSON list of them; ``arguments`` as an object or as a
JSON-encoded string; ``parameters`` instead of ``arguments``; no ``arguments`` at all (= ``{}``);
a markdown code fence (```json ... ```) around the JSON; several call objects one per line (the
ToolRL format the seed study's model A was trained on), read as a list when the block as a whole is
not JSON. Everything inside ``<think>...</think>`` is ignored (an unclosed ``<think>`` hides the rest
of the text). A block without its closing tag (generation stopped at max tokens, or at
``</tool_call>`` used as a stop string and removed) runs to the next ``<tool_call>`` or to the end of
the text and is parsed like any other: it counts if its JSON is complete. Python-dict syntax
(single quotes, ``True``) is not accepted.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_THINK = re.compile(r"<think>.*?(?:</think>|\Z)", re.DOTALL)
_FENCE = re.compile(r"\A```[A-Za-z0-9_-]*[ \t]*\n?(.*?)\n?[ \t]*```\Z", re.DOTALL)


@dataclass
class ToolCall:
    """One well-formed call."""

    name: str
    """Called function name, verbatim."""
    arguments: dict[str, Any]
    """Decoded arguments (``{}`` if the call gave none)."""


@dataclass
class ParseResult:
    """Everything a scorer needs to know about a reply's tool calls."""

    calls: list[ToolCall]
    """Well-formed calls, in the order they appear."""
    n_blocks: int
    """Number of call attempts found (well-formed or not), outside ``<think>``: ``<tool_call>`` blocks for
    hermes, a dialect's markers or bare calls for the others (dialects.py)."""
    names: list[str]
    """Every string ``"name"`` found in an attempt's decoded call, even when the rest of that call is
    malformed; the seed study's lenient rule looks only at these."""
    errors: list[str] = field(default_factory=list)
    """One short message per malformed block or call."""

    @property
    def format_ok(self) -> bool:
        """At least one attempt, and every attempt parsed into ``{name: str, arguments: dict}`` calls."""
        return self.n_blocks > 0 and not self.errors


def strip_fence(body: str) -> str:
    """``body`` without a markdown code fence around it (any language tag)."""
    body = body.strip()
    match = _FENCE.match(body)
    return match.group(1).strip() if match else body


def _to_call(obj: Any) -> ToolCall | str:
    """A decoded JSON object as a call, or the reason it is not one."""
    if not isinstance(obj, dict):
        return f"call is a JSON {type(obj).__name__}, expected an object"
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        return "call has no string 'name'"
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return f"arguments of {name} are a string that is not JSON"
    if not isinstance(args, dict):
        return f"arguments of {name} are a JSON {type(args).__name__}, expected an object"
    return ToolCall(name, args)


def _decode_block(body: str) -> Any:
    """The block's JSON value; failing that, one JSON value per non-empty line (ToolRL) as a list."""
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        lines = [line for line in body.splitlines() if line.strip()]
        if len(lines) < 2:
            raise
        return [json.loads(line) for line in lines]


def strip_think(text: str) -> str:
    """``text`` without its ``<think>...</think>`` spans (an unclosed one runs to the end): every dialect
    ignores what a model writes while thinking."""
    return _THINK.sub("", text)


def parse_tool_calls(text: str) -> ParseResult:
    """Parse every ``<tool_call>`` block of ``text``; never raises, whatever the string."""
    text = strip_think(text)
    result = ParseResult(calls=[], n_blocks=0, names=[])
    for segment in text.split(OPEN)[1:]:
        result.n_blocks += 1
        body = strip_fence(segment.split(CLOSE, 1)[0])
        try:
            decoded = _decode_block(body)
        except (ValueError, RecursionError):
            result.errors.append(f"block {result.n_blocks} is not valid JSON")
            continue
        add_calls(result, decoded, f"block {result.n_blocks}")
    return result


def add_calls(result: ParseResult, decoded: Any, where: str) -> None:
    """Record the call object(s) ``decoded`` (an object or a list of them) of call attempt ``where``; the
    OpenAI wrapper ``{"type": "function", "function": {...}}`` is read as the call inside it."""
    objects = decoded if isinstance(decoded, list) else [decoded]
    if not objects:
        result.errors.append(f"{where} is an empty list")
    for obj in objects:
        if isinstance(obj, dict) and isinstance(obj.get("function"), dict):
            obj = obj["function"]
        if isinstance(obj, dict) and isinstance(obj.get("name"), str):
            result.names.append(obj["name"])
        call = _to_call(obj)
        if isinstance(call, str):
            result.errors.append(f"{where}: {call}")
        else:
            result.calls.append(call)


def render_calls(calls: list[ToolCall]) -> str:
    """The canonical reply for ``calls``: one ``<tool_call>`` block per call (what Qwen2.5 emits)."""
    return "\n".join(
        f"{OPEN}\n{json.dumps({'name': c.name, 'arguments': c.arguments}, ensure_ascii=False)}\n{CLOSE}"
        for c in calls
    )
