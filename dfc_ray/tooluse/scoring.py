"""Strict tool-call scoring with BFCL's AST-checker semantics, plus the seed study's lenient rule.

Strict (``correct``) means: the reply's calls are, as a multiset, the expected calls; each call has
every required parameter, no parameter unknown to its schema or absent from the ground truth, values
of the schema's JSON type (an int passes for a number, a float never for an integer, a bool never for
either; arrays and objects are checked item by item), and a value among the ground truth's allowed
values (strings compared after BFCL's standardisation). Parallel calls match in any order.
An empty ground truth (irrelevance) is correct iff the reply makes no call at all, in any dialect.

Replies are read in the pair's tool-call dialect (``dialects.py``, default ``hermes``). A reply that calls
in another dialect and not in the pair's fails every criterion, lenient ones included, with a reason
naming both dialects: the lenient rules read names the way the seed study did, in the pair's own format.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any

from dfc_ray.tooluse.dialects import any_call, get_dialect
from dfc_ray.tooluse.parse import ToolCall
from dfc_ray.tooluse.task import Task

OPTIONAL = ""
"""In a ground truth's allowed-value list, this marker means the parameter may be omitted."""

_JSON_TYPES = {
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "array": (list,),
    "object": (dict,),
    "null": (type(None),),
}
_PUNCT = re.compile(r"[ ,./\-_*^]")


@dataclass
class Score:
    """How one reply fares against one task."""

    format_ok: bool
    """The reply parses in the pair's dialect: at least one well-formed call and no malformed one; for a task
    whose ground truth is empty, a reply with no call attempt in any dialect is also well-formed."""
    name_ok: bool
    """The called function names equal the expected ones as a multiset (no call for an empty truth)."""
    correct: bool
    """Strict: BFCL-AST semantics against the ground truth (see the module docstring)."""
    lenient: bool
    """Some call of the pair's dialect has a ``"name"`` that is exactly one of the offered tools, whatever
    the arguments and the ground truth."""
    seed_lenient: bool
    """The seed study's headline rule (``seed_lenient``): a called name fuzzy-matches an offered tool."""
    calls: list[ToolCall]
    """The well-formed calls parsed from the reply."""
    reason: str
    """Why the reply is not correct (empty when it is)."""
    foreign_dialect: str = ""
    """The dialect of a call the reply makes in another dialect than the pair's (and none in the pair's);
    empty otherwise."""

    def passes(self, metric: str) -> bool:
        """Correct under a judging protocol's `metric`: "strict" (``correct``) or "seed_lenient"."""
        return self.correct if metric == "strict" else self.seed_lenient


def standardize(text: str) -> str:
    """BFCL's string normalisation: drop spaces and ``,./-_*^``, lowercase, ``'`` -> ``"``."""
    return _PUNCT.sub("", text).lower().replace("'", '"')


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _type_error(value: Any, schema: dict[str, Any], where: str) -> str:
    """Why ``value`` does not have the JSON type ``schema`` asks for ("" if it does); recursive."""
    types = schema.get("type")
    if types is None:  # untyped ("any"): anything goes
        return ""
    types = [types] if isinstance(types, str) else list(types)
    fits = any(
        isinstance(value, _JSON_TYPES.get(t, ())) and not (isinstance(value, bool) and t in ("integer", "number"))
        for t in types
    )
    if not fits:
        return f"{where} should be {'|'.join(types)}, got {json.dumps(value)}"
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            if error := _type_error(item, schema["items"], f"{where}[{i}]"):
                return error
    if isinstance(value, dict):
        props = schema.get("properties") or {}
        for key, item in value.items():
            if key in props and (error := _type_error(item, props[key], f"{where}.{key}")):
                return error
    return ""


def _matches(value: Any, allowed: Any, literal: bool = False) -> bool:
    """Whether ``value`` equals the allowed alternative ``allowed``. As in BFCL, an object given as a
    parameter's alternative (or inside a list that is one) is in ``{key: [allowed values]}`` form, and
    those allowed values are plain literals; lists compare item by item, in order; strings compare
    after ``standardize`` at any depth."""
    if isinstance(allowed, dict):
        if not isinstance(value, dict):
            return False
        if literal:
            return value.keys() == allowed.keys() and all(_matches(value[k], allowed[k], True) for k in value)
        return all(k in allowed and _matches_any(v, allowed[k], True) for k, v in value.items()) and all(
            k in value or OPTIONAL in alts for k, alts in allowed.items()
        )
    if isinstance(allowed, list):
        return (
            isinstance(value, list)
            and len(value) == len(allowed)
            and all(_matches(v, a, literal) for v, a in zip(value, allowed))
        )
    if isinstance(allowed, str):
        return isinstance(value, str) and standardize(value) == standardize(allowed)
    if isinstance(allowed, bool) or allowed is None:
        return value is allowed
    return _is_number(value) and value == allowed


def _matches_any(value: Any, alternatives: list[Any], literal: bool = False) -> bool:
    return any(_matches(value, alt, literal) for alt in alternatives)


def _is_literal_alternative(value: Any, alternatives: list[Any]) -> bool:
    """BFCL's escape from the schema type: possible answers sometimes give ``null``, ``"dontcare"`` or
    a variable name for a typed parameter; a scalar literally equal to such an alternative (same JSON
    type) is accepted whatever the schema says."""
    return any(
        type(value) is type(alt) and not isinstance(alt, (list, dict)) and alt != OPTIONAL and _matches(value, alt)
        for alt in alternatives
    )


def check_call(call: ToolCall, expected: dict[str, dict[str, list[Any]]], function: dict[str, Any]) -> str:
    """Why ``call`` is not the expected call ``{name: {param: [allowed values]}}`` ("" if it is).
    ``function`` is the expected function's OpenAI-style definition (name, parameters schema)."""
    (name, allowed), = expected.items()
    if call.name != name:
        return f"called {call.name}, expected {name}"
    schema = function.get("parameters") or {}
    props = schema.get("properties") or {}
    for param in schema.get("required") or []:
        if param not in call.arguments:
            return f"missing required parameter '{param}' in {name}"
    for param, value in call.arguments.items():
        if param not in props:
            return f"unknown parameter '{param}' in {name}"
        if param not in allowed:
            return f"unexpected parameter '{param}' in {name} (the ground truth omits it)"
        where = f"parameter '{param}' of {name}"
        if (error := _type_error(value, props[param], where)) and not _is_literal_alternative(value, allowed[param]):
            return f"wrong type: {error}"
        if not _matches_any(value, allowed[param]):
            shown = [alt for alt in allowed[param] if alt != OPTIONAL]
            return f"wrong value for {where}: {json.dumps(value)} not in {json.dumps(shown)}"
    for param, alternatives in allowed.items():
        if param not in call.arguments and OPTIONAL not in alternatives:
            return f"missing parameter '{param}' in {name} (the ground truth requires it)"
    return ""


def reference_calls(task: Task) -> list[ToolCall]:
    """One correct reply's calls, built from the ground truth (for tests and supervised targets): the
    first allowed value of each parameter, omitting a parameter whose first alternative is the omission
    marker unless the schema requires it (then its first real alternative, or ``""`` if that is all)."""
    functions = _functions(task)
    calls = []
    for expected in task.ground_truth:
        (name, allowed), = expected.items()
        required = (functions.get(name, {}).get("parameters") or {}).get("required") or []
        args = {}
        for param, alternatives in allowed.items():
            if param in required:  # a real value first; a lone "" can only be given as an empty string
                alternatives = [alt for alt in alternatives if alt != OPTIONAL] or alternatives
                if alternatives:
                    args[param] = _concrete(alternatives[0])
            elif alternatives and alternatives[0] != OPTIONAL:
                args[param] = _concrete(alternatives[0])
        calls.append(ToolCall(name, args))
    return calls


def _concrete(allowed: Any) -> Any:
    """A value equal to the alternative ``allowed`` (the inverse of ``_matches``)."""
    if isinstance(allowed, dict):
        return {k: alts[0] for k, alts in allowed.items() if alts and alts[0] != OPTIONAL}
    if isinstance(allowed, list):
        return [_concrete(a) for a in allowed]
    return allowed


def _functions(task: Task) -> dict[str, dict[str, Any]]:
    """The task's offered functions by name (the inner dicts of its OpenAI-style tools)."""
    return {t["function"]["name"]: t["function"] for t in task.tools}


def _perfect_matching(ok: list[list[bool]]) -> bool:
    """Whether every expected call i can get its own produced call j with ok[i][j] (augmenting paths)."""
    owner: dict[int, int] = {}

    def place(i: int, seen: set[int]) -> bool:
        for j, fits in enumerate(ok[i]):
            if fits and j not in seen:
                seen.add(j)
                if j not in owner or place(owner[j], seen):
                    owner[j] = i
                    return True
        return False

    return all(place(i, set()) for i in range(len(ok)))


def _strict_reason(task: Task, calls: list[ToolCall]) -> str:
    """Why ``calls`` (a well-formed reply) is not strictly correct for ``task`` ("" if it is)."""
    expected = task.ground_truth
    if not expected:
        return f"called {calls[0].name} where no call was expected" if calls else ""
    if len(calls) != len(expected):
        return f"made {len(calls)} call(s), expected {len(expected)}"
    functions = _functions(task)
    errors = [[check_call(call, exp, functions.get(next(iter(exp)), {})) for call in calls] for exp in expected]
    if _perfect_matching([[not e for e in row] for row in errors]):
        return ""
    if len(expected) == 1:
        return errors[0][0]
    # Explain with the first expected call that has no match, against its most similar candidate.
    for i, row in enumerate(errors):
        if all(row):
            named = [e for e in row if not e.startswith("called ")]
            return f"expected call {i + 1}: {(named or row)[0]}"
    return "no one-to-one assignment of the calls to the expected calls"


def seed_lenient(task: Task, text: str, dialect: str = "hermes") -> bool:
    """The seed study's headline metric: some call's ``"name"`` (in ``dialect``) fuzzy-matches a tool of the
    prompt's numbered list (``task.tools``, which ``toolrl.as_toolrl`` renders): either string contains the
    other (case-sensitive; an empty name matches nothing). Arguments and the ground truth are ignored.
    Unlike ``Score.lenient`` (exact name), ``weather`` or ``get_weather_v2`` count for ``get_weather``."""
    offered = [name for name in _functions(task) if name]
    called = [name for name in get_dialect(dialect).parse(text).names if name]
    return any(c in t or t in c for c in called for t in offered)


def score(task: Task, text: str, dialect: str = "hermes") -> Score:
    """Score one generated reply ``text`` against ``task``, reading calls in ``dialect`` (dialects.py)."""
    parsed = get_dialect(dialect).parse(text)
    if parsed.n_blocks == 0 and (other := any_call(text)):
        reason = f"a call in the {other} dialect; the pair's dialect is {dialect}"
        return Score(False, False, False, False, False, [], reason, foreign_dialect=other)
    lenient = any(name in _functions(task) for name in parsed.names)
    fuzzy = seed_lenient(task, text, dialect)
    name_ok = Counter(c.name for c in parsed.calls) == Counter(next(iter(e)) for e in task.ground_truth)
    no_call_expected = not task.ground_truth
    if no_call_expected and parsed.n_blocks > 0 and not parsed.format_ok:
        # A broken call attempt is still a call attempt: wrong for a task that needs none.
        return Score(False, False, False, lenient, fuzzy, parsed.calls, f"attempted a call: {parsed.errors[0]}")
    format_ok = parsed.format_ok or (no_call_expected and parsed.n_blocks == 0)
    if not format_ok:
        reason = parsed.errors[0] if parsed.errors else f"no call in the {dialect} dialect"
        return Score(False, name_ok, False, lenient, fuzzy, parsed.calls, reason)
    reason = _strict_reason(task, parsed.calls)
    return Score(True, name_ok, not reason, lenient, fuzzy, parsed.calls, reason)
