"""The tool-call parser: every accepted reply shape, malformed blocks, and properties under hypothesis."""

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from dfc_ray.tooluse import parse_tool_calls
from dfc_ray.tooluse.parse import ToolCall, render_calls

CALL = {"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}
EXPECTED = [ToolCall("get_weather", {"city": "Paris", "days": 3})]


def block(body: str) -> str:
    return f"<tool_call>\n{body}\n</tool_call>"


def test_one_block():
    result = parse_tool_calls(block(json.dumps(CALL)))
    assert result.format_ok and result.calls == EXPECTED and result.n_blocks == 1


def test_several_blocks_keep_order():
    other = {"name": "get_time", "arguments": {"tz": "UTC"}}
    text = "Sure.\n" + block(json.dumps(CALL)) + "\n" + block(json.dumps(other))
    result = parse_tool_calls(text)
    assert result.format_ok and [c.name for c in result.calls] == ["get_weather", "get_time"]


def test_list_of_calls_in_one_block():
    result = parse_tool_calls(block(json.dumps([CALL, {"name": "get_time", "arguments": {}}])))
    assert result.format_ok and result.n_blocks == 1 and len(result.calls) == 2


def test_arguments_as_json_string_and_parameters_key():
    as_string = {"name": "get_weather", "arguments": json.dumps(CALL["arguments"])}
    as_parameters = {"name": "get_weather", "parameters": CALL["arguments"]}
    for shape in (as_string, as_parameters):
        result = parse_tool_calls(block(json.dumps(shape)))
        assert result.format_ok and result.calls == EXPECTED


def test_openai_wrapper_is_read_as_its_call():
    result = parse_tool_calls(block(json.dumps({"type": "function", "function": CALL})))
    assert result.format_ok and result.calls == EXPECTED and result.names == ["get_weather"]


def test_missing_arguments_is_an_empty_call():
    result = parse_tool_calls(block('{"name": "get_time"}'))
    assert result.format_ok and result.calls == [ToolCall("get_time", {})]


def test_think_prefix_is_ignored():
    decoy = block('{"name": "decoy", "arguments": {}}')
    text = f"<think>maybe {decoy} or <tool_call> broken</think>\n" + block(json.dumps(CALL))
    result = parse_tool_calls(text)
    assert result.format_ok and result.calls == EXPECTED and result.n_blocks == 1


def test_unclosed_think_hides_the_rest():
    result = parse_tool_calls("<think>I could " + block(json.dumps(CALL)))
    assert result.n_blocks == 0 and not result.format_ok and result.calls == []


def test_code_fences_inside_and_around():
    inside = block("```json\n" + json.dumps(CALL) + "\n```")
    around = "```json\n" + block(json.dumps(CALL)) + "\n```"
    bare_fence = block("```\n" + json.dumps(CALL) + "```")
    for text in (inside, around, bare_fence):
        result = parse_tool_calls(text)
        assert result.format_ok and result.calls == EXPECTED, text


def test_unclosed_final_block_counts_when_its_json_is_complete():
    stopped = f"<tool_call>\n{json.dumps(CALL)}\n"  # stop string </tool_call> removed
    result = parse_tool_calls(stopped)
    assert result.format_ok and result.calls == EXPECTED
    truncated = f"<tool_call>\n{json.dumps(CALL)[:-5]}"  # max tokens hit mid-JSON
    result = parse_tool_calls(truncated)
    assert not result.format_ok and result.calls == [] and result.n_blocks == 1


def test_unclosed_block_followed_by_another():
    text = f"<tool_call>\n{json.dumps(CALL)}\n" + block(json.dumps(CALL))
    result = parse_tool_calls(text)
    assert result.format_ok and result.calls == EXPECTED * 2


def test_malformed_blocks_break_the_format_but_keep_good_calls():
    cases = {
        "not json": "{'name': 'get_weather', 'arguments': {}}",  # python-dict syntax is not accepted
        "no name": '{"arguments": {}}',
        "name not a string": '{"name": 3, "arguments": {}}',
        "arguments a list": '{"name": "f", "arguments": [1]}',
        "arguments a non-JSON string": '{"name": "f", "arguments": "city=Paris"}',
        "a bare number": "42",
        "an empty list": "[]",
    }
    for why, body in cases.items():
        result = parse_tool_calls(block(json.dumps(CALL)) + block(body))
        assert not result.format_ok and result.calls == EXPECTED and result.errors, why


def test_names_survive_malformed_arguments():
    result = parse_tool_calls(block('{"name": "get_weather", "arguments": [1]}'))
    assert result.calls == [] and result.names == ["get_weather"]


def test_no_block():
    result = parse_tool_calls("The weather in Paris is nice.")
    assert result.n_blocks == 0 and not result.format_ok and result.calls == []


json_scalars = st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=False) | st.text(max_size=8)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
calls_strategy = st.lists(
    st.builds(
        ToolCall,
        name=st.text(min_size=1, max_size=12).filter(lambda s: "<" not in s),
        arguments=st.dictionaries(st.text(max_size=6), json_values, max_size=4),
    ),
    min_size=1,
    max_size=3,
)


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_arbitrary_text_never_raises(text):
    result = parse_tool_calls(text)
    assert result.n_blocks >= 0


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(["<tool_call>", "</tool_call>", "<think>", "</think>", "```json\n", "```",
                                 '{"name": "f", "arguments": {}}', "[", "]", '"', "{", "}", "\n", "x"]), max_size=12))
def test_tag_soup_never_raises(pieces):
    result = parse_tool_calls("".join(pieces))
    assert len(result.calls) <= len(result.names)


def _shapes(calls: list[ToolCall]) -> list[str]:
    """The same calls written in every accepted shape."""
    plain = [{"name": c.name, "arguments": c.arguments} for c in calls]
    dumps = lambda x: json.dumps(x, ensure_ascii=False)  # noqa: E731
    return [
        render_calls(calls),
        "".join(block(dumps({"name": c.name, "arguments": dumps(c.arguments)})) for c in calls),
        "".join(block(dumps({"name": c.name, "parameters": c.arguments})) for c in calls),
        block(dumps(plain)),
        "<think>\nfirst I plan\n</think>\n" + "".join(block("```json\n" + dumps(p) + "\n```") for p in plain),
        "\n".join(f"<tool_call>\n{dumps(p)}\n" for p in plain),  # every block unclosed
    ]


@settings(max_examples=150, deadline=None)
@given(calls_strategy)
def test_round_trip_every_shape(calls):
    for text in _shapes(calls):
        result = parse_tool_calls(text)
        assert result.format_ok, text
        assert result.calls == calls, text
