"""Strict (BFCL-AST) scoring on real BFCL records from the installed wheel, and on hand-made tasks."""

import copy
import functools

import pytest

from dfc_ray.tooluse import Task, load_tasks, score
from dfc_ray.tooluse.parse import ToolCall, render_calls
from dfc_ray.tooluse.scoring import reference_calls, seed_lenient

CATEGORIES = ["simple_python", "multiple", "parallel", "parallel_multiple", "live_simple", "live_multiple",
              "live_parallel", "live_parallel_multiple", "irrelevance", "live_irrelevance"]  # fmt: skip


@functools.cache
def bfcl(category: str) -> list[Task]:
    return load_tasks(f"bfcl:{category}")


def schema_of(task: Task, name: str) -> dict:
    return next(t["function"]["parameters"] for t in task.tools if t["function"]["name"] == name)


def reply(calls: list[ToolCall]) -> str:
    return render_calls(calls) or "None of these tools can answer that."


def gold(category: str) -> list[tuple[Task, list[ToolCall]]]:
    """Records whose ground-truth reply is correct, with that reply's calls (a fresh copy each time)."""
    return [(t, copy.deepcopy(c)) for t in bfcl(category) if score(t, reply(c := reference_calls(t))).correct]


@pytest.mark.parametrize("category", CATEGORIES)
def test_ground_truth_reply_is_correct(category):
    tasks = bfcl(category)
    scores = {t.id: score(t, reply(reference_calls(t))) for t in tasks}
    failures = [(i, s.reason) for i, s in scores.items() if not s.correct]
    # The few exceptions are records whose answers break BFCL's own rules (docs/tooluse.md lists them).
    print(category, len(tasks), "exceptions:", failures)
    assert len(failures) <= 0.01 * len(tasks), failures
    for t in tasks:
        assert scores[t.id].format_ok and scores[t.id].name_ok and scores[t.id].lenient == bool(t.ground_truth)


def first_param(task, call, want):
    """The first argument of ``call`` whose schema satisfies ``want(schema, value)``, or None."""
    props = schema_of(task, call.name).get("properties", {})
    return next((p for p, v in call.arguments.items() if p in props and want(props[p], v)), None)


@pytest.mark.parametrize("category", ["simple_python", "multiple", "live_simple", "live_multiple"])
def test_perturbed_replies_fail_for_the_right_reason(category):
    counts = dict.fromkeys(["name", "missing", "unknown", "type", "value", "float_for_int", "bool_for_int"], 0)
    for task, calls in gold(category):
        call = calls[0]

        def check(perturbed_args, expect, *, name=call.name):
            s = score(task, reply([ToolCall(name, perturbed_args)]))
            assert not s.correct and expect in s.reason, (task.id, s.reason)
            return s

        s = check(call.arguments, "called", name=call.name + "_v2")
        assert s.format_ok and not s.name_ok and not s.lenient
        counts["name"] += 1
        check({**call.arguments, "zz_not_a_param": 1}, "unknown parameter 'zz_not_a_param'")
        counts["unknown"] += 1
        required = [p for p in schema_of(task, call.name).get("required", []) if p in call.arguments]
        if required:
            check({k: v for k, v in call.arguments.items() if k != required[0]},
                  f"missing required parameter '{required[0]}'")
            counts["missing"] += 1
        is_int = lambda schema, v: schema.get("type") == "integer" and type(v) is int  # noqa: E731
        if p := first_param(task, call, is_int):
            check({**call.arguments, p: str(call.arguments[p])}, "wrong type")
            check({**call.arguments, p: call.arguments[p] + 0.5}, "wrong type")
            check({**call.arguments, p: True}, "wrong type")
            counts["type"] += 1
            counts["float_for_int"] += 1
            counts["bool_for_int"] += 1
        is_str = lambda schema, v: schema.get("type") == "string" and isinstance(v, str)  # noqa: E731
        if p := first_param(task, call, is_str):
            check({**call.arguments, p: call.arguments[p] + " qqq zzz"}, "wrong value")
            counts["value"] += 1
    print(category, counts)
    assert min(counts.values()) >= 10, counts


@pytest.mark.parametrize("category", ["simple_python", "multiple", "live_simple", "live_multiple"])
def test_int_for_float_and_string_normalisation_stay_correct(category):
    n_float = n_string = 0
    for task, calls in gold(category):
        call = calls[0]
        integral = lambda schema, v: schema.get("type") == "number" and type(v) is float and v.is_integer()  # noqa: E731
        if p := first_param(task, call, integral):
            args = {**call.arguments, p: int(call.arguments[p])}
            assert score(task, reply([ToolCall(call.name, args)])).correct, task.id
            n_float += 1
        spaced = lambda schema, v: schema.get("type") == "string" and isinstance(v, str) and " " in v  # noqa: E731
        if p := first_param(task, call, spaced):
            args = {**call.arguments, p: call.arguments[p].upper().replace(" ", " - ")}
            assert score(task, reply([ToolCall(call.name, args)])).correct, task.id
            n_string += 1
    print(category, n_float, n_string)
    assert n_float + n_string >= 10


@pytest.mark.parametrize("category", ["parallel", "parallel_multiple", "live_parallel"])
def test_parallel_calls_match_in_any_order(category):
    n = 0
    for task, calls in gold(category):
        if len(calls) < 2:
            continue
        assert score(task, reply(calls[::-1])).correct, task.id
        assert score(task, reply(calls[1:] + calls[:1])).correct, task.id
        s = score(task, reply(calls[:-1]))
        assert not s.correct and "made" in s.reason and not s.name_ok, task.id
        s = score(task, reply(calls + calls[:1]))
        assert not s.correct and not s.name_ok, task.id
        n += 1
    assert n >= 10


def test_irrelevance_is_correct_only_without_a_call():
    tasks = bfcl("irrelevance")
    for task in tasks[:50]:
        offered = task.tools[0]["function"]
        required = offered["parameters"].get("required", [])
        s = score(task, "I cannot compute that with the tools I have.")
        assert (s.format_ok, s.name_ok, s.correct, s.lenient) == (True, True, True, False)
        s = score(task, reply([ToolCall(offered["name"], dict.fromkeys(required, 1))]))
        assert s.format_ok and not s.name_ok and not s.correct and s.lenient, task.id
        assert "no call was expected" in s.reason
        s = score(task, "<tool_call>\n{broken\n</tool_call>")
        assert not s.correct and not s.format_ok and "attempted a call" in s.reason


# --- hand-made tasks: each rule on its own -----------------------------------------------------------

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather forecast.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "days": {"type": "integer"},
                "scale": {"type": "number"},
                "hours": {"type": "array", "items": {"type": "integer"}},
                "where": {"type": "object", "properties": {"lat": {"type": "number"}, "lon": {"type": "number"}}},
                "stops": {"type": "array", "items": {"type": "object"}},
                "extra": {},
            },
            "required": ["city"],
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object",
                                                                            "properties": {"tz": {"type": "string"}}}}}


def make(truth, tools=(WEATHER, TIME)):
    return Task(id="t", messages=[{"role": "user", "content": "?"}], tools=list(tools), ground_truth=truth)


def call(name="get_weather", **args):
    return reply([ToolCall(name, args)])


def test_hand_made_rules():
    task = make([{"get_weather": {
        "city": ["New York City", "NYC"], "days": ["", 3], "scale": [1.5], "hours": [[9, 12], ""],
        "where": [{"lat": [40.7], "lon": [-74.0, ""]}, ""], "stops": [[{"name": ["a"]}, {"name": ["b"]}], ""],
        "extra": ["", "anything"],
    }}])  # fmt: skip
    good = dict(city="new-york city", scale=1.5)
    assert score(task, call(**good)).correct
    cases = {
        "missing required parameter 'city'": dict(scale=1.5),
        "missing parameter 'scale'": dict(city="NYC"),  # the ground truth lists it without ""
        "wrong value for parameter 'city'": dict(good, city="Boston"),
        "wrong type": dict(good, days=3.0),
        "wrong type: parameter 'hours' of get_weather[1]": dict(good, hours=[9, 12.0]),
        "wrong value for parameter 'hours'": dict(good, hours=[12, 9]),
        "wrong type: parameter 'where' of get_weather.lat": dict(good, where={"lat": "40.7"}),
        "wrong value for parameter 'where'": dict(good, where={"lat": 40.7, "alt": 3}),
        "wrong value for parameter 'stops'": dict(good, stops=[{"name": "b"}, {"name": "a"}]),
        "wrong value for parameter 'extra'": dict(good, extra=[1]),
        "unknown parameter 'zz'": dict(good, zz=1),
    }
    for expect, args in cases.items():
        s = score(task, call(**args))
        assert s.format_ok and s.name_ok and not s.correct and expect in s.reason, (expect, s.reason)
    for args in (dict(good, days=3), dict(good, hours=[9, 12]),
                 dict(good, where={"lat": 40.7}), dict(good, where={"lat": 40.7, "lon": -74}),
                 dict(good, stops=[{"name": "A"}, {"name": "b"}]), dict(good, extra="Any thing")):  # fmt: skip
        assert score(task, call(**args)).correct, args


def test_unexpected_parameter_known_to_the_schema():
    task = make([{"get_weather": {"city": ["Paris"]}}])
    s = score(task, call(city="Paris", days=2))
    assert not s.correct and "unexpected parameter 'days'" in s.reason


def test_null_and_dontcare_escape_the_schema_type():
    task = make([{"get_weather": {"city": ["Paris"], "days": [None, ""], "scale": ["dontcare"]}}])
    assert score(task, call(city="Paris", days=None, scale="dontcare")).correct
    assert not score(task, call(city="Paris", days="none", scale="dontcare")).correct


def test_parallel_matching_is_not_greedy():
    task = make([{"get_weather": {"city": ["Paris"], "days": [1, 2]}}, {"get_weather": {"city": ["Paris"],
                                                                                        "days": [1]}}])
    text = reply([ToolCall("get_weather", {"city": "Paris", "days": 1}), ToolCall("get_weather", {"city": "Paris",
                                                                                                  "days": 2})])
    assert score(task, text).correct
    bad = reply([ToolCall("get_weather", {"city": "Paris", "days": 2})] * 2)
    s = score(task, bad)
    assert not s.correct and s.name_ok and "expected call 2" in s.reason


def test_name_ok_is_a_multiset():
    task = make([{"get_weather": {"city": ["Paris"]}}, {"get_time": {"tz": ["UTC"]}}])
    both = reply([ToolCall("get_time", {"tz": "utc"}), ToolCall("get_weather", {"city": "paris"})])
    assert score(task, both).correct and score(task, both).name_ok
    twice = reply([ToolCall("get_weather", {"city": "Paris"})] * 2)
    assert not score(task, twice).name_ok


def test_lenient_is_the_seed_rule():
    task = make([{"get_weather": {"city": ["Paris"]}}])
    s = score(task, '<tool_call>\n{"name": "get_time", "arguments": "oops"}\n</tool_call>')
    assert s.lenient and not s.format_ok and not s.correct and not s.name_ok
    s = score(task, call("search", q="Paris"))
    assert not s.lenient and s.format_ok and not s.name_ok and "called search" in s.reason
    s = score(task, "The weather in Paris is sunny.")
    assert not s.lenient and not s.format_ok and s.reason == "no call in the hermes dialect"


def test_format_and_think():
    task = make([{"get_weather": {"city": ["Paris"]}}])
    s = score(task, "<think>call get_time?</think>\n```json\n" + call(city="Paris") + "\n```")
    assert s.format_ok and s.correct and s.calls == [ToolCall("get_weather", {"city": "Paris"})]
    s = score(task, call(city="Paris") + "<tool_call>{oops</tool_call>")
    assert not s.format_ok and not s.correct and "not valid JSON" in s.reason and s.name_ok


def test_seed_lenient_is_the_studys_fuzzy_name_rule():
    """Either name contains the other; arguments, call count, ground truth and format are ignored."""
    task = make([{"get_weather": {"city": ["Paris"]}}])
    block = '<tool_call>\n{{"name": "{}", "parameters": {{}}}}\n</tool_call>'.format
    cases = {
        "get_weather": (True, True),  # exact: both rules
        "weather": (True, False),  # called name inside an offered one
        "get_weather_forecast": (True, False),  # offered name inside the called one
        "time": (True, False),  # fuzzy hit on the OTHER tool, get_time: the ground truth does not matter
        "Get_Weather": (False, False),  # case-sensitive
        "search": (False, False),
        "": (False, False),  # an empty name would otherwise be inside every tool name
    }
    for name, (fuzzy, exact) in cases.items():
        assert (seed_lenient(task, block(name)), score(task, block(name)).lenient) == (fuzzy, exact), name
    no_args = '<tool_call>\n{"name": "weather", "arguments": "oops"}\n</tool_call>'
    assert seed_lenient(task, no_args) and not score(task, no_args).format_ok
    assert not seed_lenient(task, "get_weather is the tool I would call.")  # a name outside any block
    assert not seed_lenient(task, "<think>" + block("get_weather") + "</think>")
    irrelevant = make([])
    assert seed_lenient(irrelevant, block("get_time")) and not score(irrelevant, block("get_time")).correct


def test_toolrl_reply_with_one_call_per_line():
    """ToolRL's reply format: <think>, then one block holding a JSON call per line, then <response>."""
    task = make([{"get_weather": {"city": ["Paris"]}}, {"get_time": {"tz": ["UTC"]}}])
    text = ('<think>two tools</think>\n<tool_call>\n{"name": "get_weather", "parameters": {"city": "Paris"}}\n'
            '{"name": "get_time", "parameters": {"tz": "UTC"}}\n</tool_call>\n<response>Done.</response>')
    s = score(task, text)
    assert s.format_ok and s.correct and [c.name for c in s.calls] == ["get_weather", "get_time"]
    assert seed_lenient(task, text)
    broken = text.replace('{"name": "get_time"', '{"name" "get_time"')
    assert not score(task, broken).format_ok
