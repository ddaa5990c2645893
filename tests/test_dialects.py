"""Tool-call dialects: the dialect table (each dialect's correct call, read by every dialect), malformed
calls and their reasons, template detection, the tools fallback and system-role merge of chat templates,
and decoding that keeps a dialect's special-token marker."""

import json
from pathlib import Path
from typing import get_args

import pytest

from dfc_ray.config import PairSpec, ToolDialect
from dfc_ray.generation import reply_text
from dfc_ray.pair import load_tokenizer
from dfc_ray.tooluse import DIALECTS, Task, any_call, detect_dialect, get_dialect, load_tasks, render_prompt, score
from dfc_ray.tooluse.dialects import resolve_dialect
from dfc_ray.tooluse.scoring import reference_calls

TEMPLATES = Path(__file__).parent / "data" / "templates"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                   "required": ["city"]}}}
CALL_TASK = Task("weather", [{"role": "user", "content": "Weather in Paris for 3 days?"}], [WEATHER],
                 [{"get_weather": {"city": ["Paris"], "days": [3]}}])
NO_CALL_TASK = Task("chat", [{"role": "user", "content": "hey, i am bored"}], [WEATHER], [])
SYSTEM_TASK = Task("system", [{"role": "system", "content": "Be terse."},
                              {"role": "user", "content": "Weather in Oslo?"}], [WEATHER],
                   [{"get_weather": {"city": ["Oslo"], "days": [""]}}])
PARIS = '"city": "Paris", "days": 3'

# Every accepted shape of one correct call, by dialect (the first of each is the dialect's own writer's).
SHAPES = {
    "hermes": ['<tool_call>\n{"name": "get_weather", "arguments": {' + PARIS + '}}\n</tool_call>'],
    "llama3": ['{"name": "get_weather", "parameters": {' + PARIS + '}}',
               '<|python_tag|>{"name": "get_weather", "arguments": {' + PARIS + '}}',
               '{"type": "function", "name": "get_weather", "parameters": {' + PARIS + '}}',
               '{"type": "function", "function": {"name": "get_weather", "arguments": {' + PARIS + '}}}'],
    "pythonic": ['[get_weather(city="Paris", days=3)]',
                 '```tool_code\nprint(get_weather(city="Paris", days=3))\n```',
                 "Let me check.\n```tool_code\nget_weather(city='Paris', days=3)\n```"],
    "mistral": ['[TOOL_CALLS][{"name": "get_weather", "arguments": {' + PARIS + '}}]',
                '[TOOL_CALLS]get_weather[ARGS]{' + PARIS + '}',
                '[TOOL_CALLS]get_weather[CALL_ID]a1b2c3d4e[ARGS]{' + PARIS + '}'],
    "phi4": ['<|tool_call|>[{"name": "get_weather", "arguments": {' + PARIS + '}}]<|/tool_call|>',
             'functools[{"name": "get_weather", "arguments": {' + PARIS + '}}]'],
    "json": ['```json\n{"name": "get_weather", "arguments": {' + PARIS + '}}\n```',
             'Here is the call:\n```\n[{"name": "get_weather", "parameters": {' + PARIS + '}}]\n```'],
}
# One malformed call per dialect and the reason scoring must give.
MALFORMED = {
    "hermes": ('<tool_call>\n{"name": "get_weather", "arguments": {"city": </tool_call>', "block 1 is not valid JSON"),
    "llama3": ('<|python_tag|>{"name": "get_weather", "parameters": {"city": ', "llama3 call is not valid JSON"),
    "pythonic": ('[get_weather("Paris")]', "calls get_weather with positional arguments"),
    "mistral": ('[TOOL_CALLS]get_weather[ARGS]{"city": ', "arguments of get_weather are not valid JSON"),
    "phi4": ('<|tool_call|>[{"name": 3, "arguments": {}}]<|/tool_call|>', "has no string 'name'"),
    "json": ('```json\n{"name": "get_weather", "arguments": {"city": \n```', "json call 1 is not valid JSON"),
}
# Dialects whose format includes another's: json reads a bare JSON reply, llama3's form.
READS_ALSO = {"json": {"llama3"}}


def tokenizer_with(template: str | None = None):
    """The organism's tokenizer, with a fixture chat template from tests/data/templates when named."""
    tokenizer = load_tokenizer(PairSpec())
    if template is not None:
        tokenizer.chat_template = (TEMPLATES / template).read_text()
    return tokenizer


def test_the_registry_and_the_config_literal_name_the_same_dialects():
    assert set(get_args(ToolDialect)) == {"auto", *DIALECTS}
    assert list(SHAPES) and set(SHAPES) == set(DIALECTS) == set(MALFORMED)


@pytest.mark.parametrize("dialect", list(DIALECTS))
def test_each_dialect_writes_what_it_reads(dialect):
    """The writer's output of the ground truth's calls scores correct in its own dialect (for a whole split)."""
    tasks = [t for t in load_tasks("organism:test") if t.ground_truth][:20]
    for task in tasks:
        assert score(task, get_dialect(dialect).format_calls(reference_calls(task)), dialect).correct


@pytest.mark.parametrize("dialect", list(DIALECTS))
def test_dialect_table(dialect):
    """A correct call in `dialect` is correct there; under every other dialect it is a call (never a correct
    abstention) and fails strict scoring naming the dialect, unless that dialect's format includes it."""
    for text in SHAPES[dialect]:
        assert score(CALL_TASK, text, dialect).correct, text
        assert score(NO_CALL_TASK, text, dialect).reason.startswith("called get_weather"), text
        assert any_call(text) is not None
        for other in DIALECTS:
            if other == dialect:
                continue
            assert not score(NO_CALL_TASK, text, other).correct, (text, other)
            s = score(CALL_TASK, text, other)
            if dialect not in READS_ALSO.get(other, set()):
                assert not s.correct and not s.format_ok and not s.lenient and s.foreign_dialect, (text, other)
                assert s.reason == f"a call in the {s.foreign_dialect} dialect; the pair's dialect is {other}"


@pytest.mark.parametrize("dialect", list(DIALECTS))
def test_a_malformed_call_gets_its_reason_and_is_no_abstention(dialect):
    text, reason = MALFORMED[dialect]
    s = score(CALL_TASK, text, dialect)
    assert not s.correct and not s.format_ok and reason in s.reason
    assert reason in score(NO_CALL_TASK, text, dialect).reason and not score(NO_CALL_TASK, text, dialect).correct


@pytest.mark.parametrize("dialect", list(DIALECTS))
def test_prose_and_non_call_json_stay_abstentions(dialect):
    for text in ("I'm sorry, I can't help with that.", '{"answer": 4}', "[1, 2, 3]", "[see (below)]"):
        assert score(NO_CALL_TASK, text, dialect).correct, text
        assert any_call(text) is None


def test_the_issues_llama3_call_on_a_no_call_task_is_not_correct():
    task = load_tasks("organism:test")[10]
    assert not task.ground_truth
    s = score(task, '{"name": "convert_currency", "parameters": {}}')
    assert not s.correct and s.foreign_dialect == "llama3"


def test_pythonic_arguments_are_read_never_evaluated(tmp_path):
    marker = tmp_path / "ran"
    text = f"[get_weather(city=__import__('pathlib').Path({str(marker)!r}).touch())]"
    s = score(CALL_TASK, text, "pythonic")
    assert not s.correct and "not a literal" in s.reason and not marker.exists()
    assert score(CALL_TASK, "[get_weather(city='Paris', days=3, extra=null)]", "pythonic").reason.startswith(
        "unknown parameter 'extra'")


def test_unknown_dialect_is_one_line():
    with pytest.raises(ValueError, match="^tool-call dialect 'klingon' unknown; expected one of hermes") as err:
        get_dialect("klingon")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("template, dialect", [
    (None, "hermes"),  # the organism's own Qwen2.5-style template
    ("dialect_llama31.jinja", "llama3"),
    ("dialect_llama32_pythonic.jinja", "pythonic"),
    ("dialect_gemma_tool_code.jinja", "pythonic"),
    ("dialect_mistral.jinja", "mistral"),
    ("dialect_phi4.jinja", "phi4"),
])
def test_detection_on_template_fixtures(template, dialect):
    tokenizer = tokenizer_with(template)
    assert detect_dialect(tokenizer) == dialect == resolve_dialect("auto", tokenizer)
    assert resolve_dialect("json", tokenizer) == "json"  # an explicit choice wins


def test_a_template_without_a_marker_is_refused_in_one_line_naming_the_field():
    with pytest.raises(ValueError, match="names no known tool-call marker.*set pair.dialect to one of") as err:
        detect_dialect(tokenizer_with("dialect_gemma2.jinja"))
    assert "\n" not in str(err.value)


def test_a_template_that_renders_tools_is_left_alone():
    tokenizer = tokenizer_with("dialect_llama31.jinja")
    prompt = render_prompt(tokenizer, CALL_TASK, "auto")
    assert "get_weather" in prompt and "You may call these functions" not in prompt
    assert prompt == tokenizer.apply_chat_template(CALL_TASK.messages, tools=CALL_TASK.tools, tokenize=False,
                                                   add_generation_prompt=True)


def test_gemma2_template_gets_the_fallback_block_and_the_system_text_merged():
    """Gemma-2's template ignores tools= and raises on a system message: the tools come as the dialect's
    block and the system text goes to the front of the first user turn, never a TemplateError."""
    tokenizer = tokenizer_with("dialect_gemma2.jinja")
    assert "get_weather" not in tokenizer.apply_chat_template(CALL_TASK.messages, tools=CALL_TASK.tools,
                                                              tokenize=False)
    prompt = render_prompt(tokenizer, SYSTEM_TASK, "pythonic")
    user_turn = prompt.split("<start_of_turn>user\n", 1)[1]
    assert user_turn.startswith("You may call these functions:\n" + json.dumps(WEATHER))
    assert "[function_name(argument_name=\"value\")]" in user_turn
    assert user_turn.index("Be terse.") < user_turn.index("Weather in Oslo?")
    assert prompt.count("<start_of_turn>") == 2  # one merged user turn, then the model's
    plain = render_prompt(tokenizer, Task("plain", SYSTEM_TASK.messages, [], []), "pythonic")
    assert "Be terse.\n\nWeather in Oslo?" in plain and "You may call" not in plain
    with pytest.raises(ValueError, match="names no known tool-call marker"):  # auto cannot pick the fallback
        render_prompt(tokenizer, CALL_TASK, "auto")


def test_templates_that_fail_otherwise_are_one_line():
    tokenizer = tokenizer_with("dialect_gemma2.jinja")
    twice = Task("twice", [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], [], [])
    with pytest.raises(ValueError, match="rejects task twice: Conversation roles must alternate") as err:
        render_prompt(tokenizer, twice, "json")
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="drops the offered tools of task weather .no 'get_weather'") as err:
        render_prompt(tokenizer_with("dialect_last_line_only.jinja"), CALL_TASK, "json")
    assert "\n" not in str(err.value)


def test_decoding_keeps_a_special_token_marker_and_drops_eos():
    """With <|python_tag|> a special token (as in Llama-3), a reply keeps it and loses eos; plain
    skip_special_tokens decoding would lose the marker, and with it the llama3 parser's evidence of a call."""
    tokenizer = tokenizer_with()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|python_tag|>"]})
    body = '{"name": "get_weather", "parameters": {"city": '  # broken: only the tag shows it is a call
    ids = tokenizer("<|python_tag|>" + body, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert tokenizer.convert_ids_to_tokens(ids[0]) == "<|python_tag|>"
    assert tokenizer.decode(ids, skip_special_tokens=True) == body
    text = reply_text(tokenizer, ids)
    assert text == "<|python_tag|>" + body
    assert any_call(text) == "llama3" and not score(NO_CALL_TASK, text, "llama3").correct


def test_decoding_is_unchanged_for_the_organism():
    tokenizer = tokenizer_with()
    ids = tokenizer(SHAPES["hermes"][0] + "<|im_end|>", add_special_tokens=False)["input_ids"]
    assert reply_text(tokenizer, ids) == tokenizer.decode(ids, skip_special_tokens=True,
                                                          clean_up_tokenization_spaces=False) == SHAPES["hermes"][0]


def test_logprob_openings():
    assert {n: d.logprob_text for n, d in DIALECTS.items()} == {
        "hermes": "<tool_call>", "mistral": "[TOOL_CALLS]", "phi4": "<|tool_call|>", "pythonic": "[",
        "llama3": '{"name": "', "json": '{"name": "'}
    assert all(d.logprob_text.startswith(d.opening) for d in DIALECTS.values())


def test_spaces_validate_refuses_auto_on_a_template_without_a_marker(tmp_path):
    """A local pair whose template names no dialect fails validation on pair.dialect (before any harvest);
    naming the dialect passes, and the tools then come through the dialect's fallback block."""
    from transformers import Qwen2Config

    from dfc_ray.spaces import SpecError, check_against_pair, load_spec

    tokenizer = tokenizer_with("dialect_gemma2.jinja")
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    config = Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=4096)
    for name in "ab":
        config.save_pretrained(tmp_path / name)
    pair = {"a": str(tmp_path / "a"), "b": str(tmp_path / "b"), "tokenizer": str(tmp_path / "tokenizer")}
    spec = {"pair": pair, "layers": [1], "train": {"batch_size": 64}, "grid": {"dict_size": [256], "k": [8]}}
    path = tmp_path / "spec.yaml"
    path.write_text(json.dumps(spec))
    with pytest.raises(SpecError, match="field pair.dialect: tokenizer .* names no known tool-call marker") as err:
        check_against_pair(load_spec(str(path)))
    assert "\n" not in str(err.value)
    path.write_text(json.dumps(spec | {"pair": pair | {"dialect": "pythonic"}}))
    assert check_against_pair(load_spec(str(path))) == []


def test_the_report_names_the_dialect_the_judges_read():
    from dfc_ray.report import build_report, to_markdown
    from dfc_ray.report.build import TrialResult

    trials = [TrialResult("t1", {"k": 4}, {"a_clean": 0.8, "b_clean": 0.2, "delta_a_pp": 3.0})]
    report = build_report(trials, {"dialect": "llama3"})
    assert report["dialect"] == "llama3" and "judged with protocol ours (docs/replication.md), tool-call dialect " \
        "llama3." in to_markdown(report)
    assert "dialect" not in build_report(trials, {})  # a run without judges resolved none
