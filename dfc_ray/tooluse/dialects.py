"""Tool-call dialects: how each model family writes a call, read and written in one place.

One ``Dialect`` per family convention (docs/tooluse.md has the table): its name, the marker a call opens
with, the template text that identifies it (``detect_dialect``), the special tokens decoding must keep, a
parser and a writer. Every parser returns ``parse.ParseResult`` and never raises; Python-call syntax
(pythonic) is read with ``ast`` and never evaluated. ``n_blocks`` counts call attempts, well-formed or not,
so "did the reply try to call a tool" has one answer per dialect (``any_call`` asks every dialect).
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dfc_ray.tooluse.parse import (
    CLOSE,
    OPEN,
    ParseResult,
    ToolCall,
    add_calls,
    parse_tool_calls,
    render_calls,
    strip_fence,
    strip_think,
)

PYTHON_TAG = "<|python_tag|>"
MISTRAL_OPEN, MISTRAL_ARGS, MISTRAL_CALL_ID = "[TOOL_CALLS]", "[ARGS]", "[CALL_ID]"
PHI4_OPEN, PHI4_CLOSE, FUNCTOOLS = "<|tool_call|>", "<|/tool_call|>", "functools"
LLAMA31_PHRASE = '"parameters": dictionary of argument name and its value'
"""The Llama-3.1 chat template's instruction for JSON tool calls."""
LLAMA32_PYTHONIC_PHRASE = "[func_name1(params_name1=params_value1"
"""The Llama-3.2 pythonic template's instruction (``[func_name1(params_name1=params_value1, ...)]``)."""
BARE_JSON_OPENING = '{"name": "'
"""What tool_logprob scores for a dialect whose calls open with no marker (bare JSON)."""
THINK_TAGS = ("<think>", "</think>")
"""Not a dialect's, but every parser drops thinking: decoding keeps these too."""

_JSON = json.JSONDecoder()
_SEPARATORS = " \t\r\n;,"
_FENCE = re.compile(r"```([A-Za-z0-9_-]*)[ \t]*\n?(.*?)(?:```|\Z)", re.DOTALL)
_PYTHONIC_START = re.compile(r"\[\s*[A-Za-z_][\w.]*\(")  # "[f(", not prose "[see (below)]"
_TRUTHY = {"true": True, "True": True, "false": False, "False": False, "null": None, "None": None}


@dataclass(frozen=True)
class Dialect:
    """One tool-call convention: its declaration and its parser/writer."""

    name: str
    """Registry key: hermes | llama3 | pythonic | mistral | phi4 | json."""
    opening: str
    """The marker a call opens with, "" if none (bare JSON or a bare Python list)."""
    bare_opening: str
    """What a call's text starts with when ``opening`` is empty; tool_logprob scores ``logprob_text``."""
    template_markers: tuple[str, ...]
    """Texts of a chat template that identify this dialect (``detect_dialect``); empty: explicit choice only."""
    keep_tokens: tuple[str, ...]
    """Marker strings that must survive decoding even when the tokenizer makes them special tokens."""
    parser: Callable[[str], ParseResult]
    """Reads every call attempt of a reply."""
    writer: Callable[[list[ToolCall]], str]
    """Writes calls the way a model of this dialect does."""
    families: str
    """Model families that speak it (for docs and error messages)."""

    def parse(self, text: str) -> ParseResult:
        """Every call attempt in ``text`` under this dialect; never raises."""
        return self.parser(text)

    def format_calls(self, calls: list[ToolCall]) -> str:
        """How a model of this dialect writes ``calls``."""
        return self.writer(calls)

    @property
    def logprob_text(self) -> str:
        """The reply opening tool_logprob teacher-forces: the marker, or the bare call's first characters."""
        return self.opening or self.bare_opening

    def tool_instructions(self, tools: list[dict[str, Any]]) -> str:
        """The fallback tools block for a template that does not render ``tools=`` (docs/tooluse.md): the
        tools as JSON and one example call in this dialect."""
        example = self.format_calls([ToolCall("function_name", {"argument_name": "value"})])
        listing = "\n".join(json.dumps(tool, ensure_ascii=False) for tool in tools)
        return (f"You may call these functions:\n{listing}\n\nTo call functions, reply with the calls only, "
                f"in this format:\n{example}\nIf no function fits, reply in plain text.")


# ---------------------------------------------------------------- shared readers


def _json_values(text: str) -> list[Any]:
    """The JSON values at the start of ``text``, separated by whitespace, ``;`` or ``,``; text after the last
    one is ignored. Raises ValueError when the first value is not JSON."""
    values, pos = [], 0
    while True:
        while pos < len(text) and text[pos] in _SEPARATORS:
            pos += 1
        if pos >= len(text) or text[pos] not in "{[":
            return values
        try:
            value, pos = _JSON.raw_decode(text, pos)
        except (ValueError, RecursionError):
            if not values:
                raise ValueError("not valid JSON") from None
            return values
        values.append(value)


def _is_call_object(value: Any) -> bool:
    """Whether a decoded JSON value looks like a call (an object, or a list of objects, with a name or a
    function), so a JSON answer that is not a call is not mistaken for one."""
    items = value if isinstance(value, list) else [value]
    return bool(items) and all(isinstance(v, dict) and ("name" in v or "function" in v) for v in items)


def _read_bare_json(text: str, result: ParseResult, label: str, tagged: bool = False) -> None:
    """Bare JSON call(s) opening ``text`` (one attempt); ``tagged``: a marker announced a call, so JSON
    that is missing or malformed is a broken attempt rather than prose."""
    try:
        values = _json_values(text)
    except ValueError:
        if tagged or re.match(r"\s*[\[{]\s*\{?\s*\"(name|function|type)\"", text):
            result.n_blocks += 1
            result.errors.append(f"{label} is not valid JSON")
        return
    values = [v for v in values if _is_call_object(v)]
    if not values:
        if tagged:
            result.n_blocks += 1
            result.errors.append(f"{label} holds no call object")
        return
    result.n_blocks += 1
    for value in values:
        add_calls(result, value, label)


def _literal(node: ast.expr) -> Any:
    """A literal's value read from the syntax tree (never evaluated); JSON's true/false/null accepted."""
    if isinstance(node, ast.Name) and node.id in _TRUTHY:
        return _TRUTHY[node.id]
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_literal(item) for item in node.elts]
    if isinstance(node, ast.Dict):
        return {_literal(k) if k is not None else None: _literal(v) for k, v in zip(node.keys, node.values)}
    return ast.literal_eval(node)


def _dotted(node: ast.expr) -> str:
    """``f`` or ``math.factorial`` as written; ValueError for any other callee."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    raise ValueError("the callee is not a name")


def _python_calls(body: str) -> list[ToolCall]:
    """Calls written as Python (``[f(a=1), g()]``, ``f(a=1)``, ``print(f(a=1))``), read with ``ast``;
    ValueError with the reason when ``body`` is not such a call list."""
    try:
        tree = ast.parse(body.strip(), mode="eval").body
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        raise ValueError("is not a Python call list") from None
    nodes = tree.elts if isinstance(tree, (ast.List, ast.Tuple)) else [tree]
    calls = []
    for node in nodes:
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print" \
                and len(node.args) == 1 and isinstance(node.args[0], ast.Call):  # Gemma's print(f(...))
            node = node.args[0]
        if not isinstance(node, ast.Call):
            raise ValueError("holds something other than a function call")
        name = _dotted(node.func)
        if node.args or any(kw.arg is None for kw in node.keywords):
            raise ValueError(f"calls {name} with positional arguments; expected keyword arguments only")
        try:
            arguments = {kw.arg: _literal(kw.value) for kw in node.keywords if kw.arg is not None}
        except (ValueError, TypeError, SyntaxError, RecursionError):
            raise ValueError(f"gives {name} an argument that is not a literal") from None
        calls.append(ToolCall(name, arguments))
    return calls


def _python_literal(value: Any) -> str:
    """``value`` as Python source (JSON strings are valid Python strings)."""
    if isinstance(value, bool) or value is None:
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_python_literal(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))}: {_python_literal(v)}" for k, v in value.items()) + "}"
    return json.dumps(value, ensure_ascii=False)


def _plain(call: ToolCall, key: str = "arguments") -> dict[str, Any]:
    return {"name": call.name, key: call.arguments}


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


# ---------------------------------------------------------------- one parser per dialect


def parse_llama3(text: str) -> ParseResult:
    """Llama-3.x: the reply is a bare JSON call object (``{"name", "parameters"|"arguments"}`` or
    ``{"type": "function", ...}``), optionally after ``<|python_tag|>``; several calls may follow each
    other (whitespace or ``;`` between them). Text after the last call is ignored."""
    result = ParseResult(calls=[], n_blocks=0, names=[])
    body = strip_think(text).strip()
    tagged = body.startswith(PYTHON_TAG)
    body = body.removeprefix(PYTHON_TAG).strip()
    _read_bare_json(body, result, "llama3 call", tagged)
    return result


def parse_pythonic(text: str) -> ParseResult:
    """Python call syntax: the reply is ``[f(a=1, b="x"), ...]`` (Llama-3.2), or holds ```` ```tool_code ````
    fences (Gemma) around ``f(a=1)`` / ``print(f(a=1))`` / a list of calls. Keyword arguments only."""
    result = ParseResult(calls=[], n_blocks=0, names=[])
    body = strip_think(text).strip().removeprefix(PYTHON_TAG).strip()
    fences = [m.group(2) for m in _FENCE.finditer(body) if m.group(1) == "tool_code"]
    if not fences and _PYTHONIC_START.match(body):
        end = body.find("]\n\n")  # a call list, then prose: the prose is not part of it
        fences = [body if end < 0 else body[: end + 1]]
    for i, fence in enumerate(fences, 1):
        result.n_blocks += 1
        try:
            calls = _python_calls(fence)
        except ValueError as err:
            result.errors.append(f"pythonic call {i} {err}")
            continue
        result.calls.extend(calls)
        result.names.extend(c.name for c in calls)
        if not calls:
            result.errors.append(f"pythonic call {i} is an empty list")
    return result


def parse_mistral(text: str) -> ParseResult:
    """Mistral: ``[TOOL_CALLS]`` followed by a JSON list of calls (v3), or ``[TOOL_CALLS]name[ARGS]{...}``
    (v11+, optionally ``[CALL_ID]id`` before ``[ARGS]``), once per call."""
    result = ParseResult(calls=[], n_blocks=0, names=[])
    for i, segment in enumerate(strip_think(text).split(MISTRAL_OPEN)[1:], 1):
        result.n_blocks += 1
        where = f"mistral call {i}"
        if MISTRAL_ARGS in segment:
            name, _, rest = segment.partition(MISTRAL_ARGS)
            name = name.split(MISTRAL_CALL_ID, 1)[0].strip()
            try:
                arguments = _JSON.raw_decode(rest.strip())[0]
            except (ValueError, RecursionError):
                result.errors.append(f"{where}: arguments of {name or '?'} are not valid JSON")
                continue
            add_calls(result, {"name": name, "arguments": arguments}, where)
            continue
        try:
            values = _json_values(segment.strip())
        except ValueError:
            values = []
        if not values:
            result.errors.append(f"{where} is not valid JSON")
        for value in values:
            add_calls(result, value, where)
    return result


def parse_phi4(text: str) -> ParseResult:
    """Phi-4: ``<|tool_call|>`` JSON ``<|/tool_call|>`` blocks (a call object or a list), or
    ``functools[...]`` (a JSON list of calls)."""
    result = ParseResult(calls=[], n_blocks=0, names=[])
    body = strip_think(text)
    for segment in body.split(PHI4_OPEN)[1:]:
        _read_bare_json(strip_fence(segment.split(PHI4_CLOSE, 1)[0]), result, f"phi4 call {result.n_blocks + 1}",
                        tagged=True)
    for match in re.finditer(re.escape(FUNCTOOLS) + r"\s*(?=\[)", body):
        _read_bare_json(body[match.end():], result, f"phi4 call {result.n_blocks + 1}", tagged=True)
    return result


def parse_json(text: str) -> ParseResult:
    """Prompted models: ```` ```json ```` (or untagged) fences holding call JSON anywhere in the reply, or
    else a reply that opens with a bare JSON call."""
    result = ParseResult(calls=[], n_blocks=0, names=[])
    body = strip_think(text).strip()
    fences = [m.group(2) for m in _FENCE.finditer(body) if m.group(1) in ("json", "")]
    for fence in fences:
        _read_bare_json(fence.strip(), result, f"json call {result.n_blocks + 1}")
    if not fences:
        _read_bare_json(body, result, "json call")
    return result


def _write_llama3(calls: list[ToolCall]) -> str:
    return "; ".join(_dumps(_plain(c, "parameters")) for c in calls)


def _write_pythonic(calls: list[ToolCall]) -> str:
    written = (f"{c.name}({', '.join(f'{k}={_python_literal(v)}' for k, v in c.arguments.items())})" for c in calls)
    return "[" + ", ".join(written) + "]"


DIALECTS: dict[str, Dialect] = {d.name: d for d in (
    Dialect("hermes", OPEN, "", (OPEN,), (OPEN, CLOSE), parse_tool_calls, render_calls,
            "Qwen2.5, Qwen3, Hermes, ToolRL (and the shipped organism)"),
    Dialect("mistral", MISTRAL_OPEN, "", (MISTRAL_OPEN,), (MISTRAL_OPEN, MISTRAL_ARGS, MISTRAL_CALL_ID),
            parse_mistral, lambda calls: MISTRAL_OPEN + _dumps([_plain(c) for c in calls]), "Mistral, Mixtral"),
    Dialect("phi4", PHI4_OPEN, "", (PHI4_OPEN, FUNCTOOLS), (PHI4_OPEN, PHI4_CLOSE), parse_phi4,
            lambda calls: PHI4_OPEN + _dumps([_plain(c) for c in calls]) + PHI4_CLOSE, "Phi-4"),
    Dialect("pythonic", "", "[", ("tool_code", LLAMA32_PYTHONIC_PHRASE), (), parse_pythonic, _write_pythonic,
            "Llama-3.2 (pythonic template), Gemma (tool_code)"),
    Dialect("llama3", "", BARE_JSON_OPENING, (PYTHON_TAG, LLAMA31_PHRASE), (PYTHON_TAG,), parse_llama3,
            _write_llama3, "Llama-3.1, Llama-3.2, Llama-3.3"),
    Dialect("json", "", BARE_JSON_OPENING, (), (), parse_json,
            lambda calls: "```json\n" + _dumps([_plain(c) for c in calls] if len(calls) != 1 else _plain(calls[0]))
            + "\n```", "prompted models (explicit choice only)"),
)}
"""Every dialect, in detection order: a template that names several markers gets the first match."""

KEEP_TOKENS = tuple(dict.fromkeys(t for d in DIALECTS.values() for t in d.keep_tokens)) + THINK_TAGS
"""Strings decoding must keep even when the tokenizer has them as special tokens."""


def get_dialect(name: str) -> Dialect:
    """The registered dialect ``name``; one line naming the known ones otherwise."""
    if name not in DIALECTS:
        raise ValueError(f"tool-call dialect {name!r} unknown; expected one of {', '.join(DIALECTS)}")
    return DIALECTS[name]


def template_text(tokenizer: Any) -> str:
    """The tokenizer's chat template source(s), "" if it has none (a dict of named templates is joined)."""
    template = getattr(tokenizer, "chat_template", None) or ""
    return "\n".join(template.values()) if isinstance(template, dict) else str(template)


def detect_dialect(tokenizer: Any) -> str:
    """The dialect a tokenizer's chat template speaks: the first in ``DIALECTS`` order whose template marker
    the template contains (docs/tooluse.md lists the rules); one line naming the field otherwise."""
    template = template_text(tokenizer)
    for dialect in DIALECTS.values():
        if any(marker in template for marker in dialect.template_markers):
            return dialect.name
    source = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    what = "has no chat template" if not template else "names no known tool-call marker"
    raise ValueError(f"tokenizer {source!r} {what}, so pair.dialect: auto cannot choose a tool-call dialect; "
                     f"set pair.dialect to one of {', '.join(DIALECTS)}")


def any_call(text: str) -> str | None:
    """The first dialect (``DIALECTS`` order) in which ``text`` attempts a call, else None: a reply that
    calls in any dialect is a call, never an abstention."""
    return next((d.name for d in DIALECTS.values() if d.parse(text).n_blocks), None)


def resolve_dialect(choice: str, tokenizer: Any) -> str:
    """The dialect a pair setting ``pair.dialect`` names: ``auto`` detects it from the tokenizer's template."""
    return detect_dialect(tokenizer) if choice == "auto" else get_dialect(choice).name
