"""Task sources (BFCL wheel, JSONL, organism) and prompt rendering through a Qwen2.5-style chat template."""

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from dfc_ray.tooluse import (
    load_tasks,
    parse_tool_calls,
    render_prompt,
    render_raw_prompt,
    score,
)
from dfc_ray.tooluse.bfcl import CATEGORIES, data_dir, json_type, to_json_schema
from dfc_ray.tooluse.parse import render_calls
from dfc_ray.tooluse.scoring import reference_calls, seed_lenient
from dfc_ray.tooluse.toolrl import as_toolrl

# Qwen2.5-Instruct's chat template (tool-calling part verbatim in spirit: <tools> in the system turn,
# each tool written with tojson, replies as <tool_call> JSON).
QWEN25_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""


@pytest.fixture(scope="module")
def tokenizer():
    words = ["<unk>", "<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>", "system", "user", "assistant"]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="<unk>", eos_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>", "<tool_call>", "</tool_call>"], chat_template=QWEN25_TEMPLATE,
    )  # fmt: skip


def test_render_prompt_puts_tools_in_the_system_turn(tokenizer):
    task = load_tasks("bfcl:live_simple")[0]
    prompt = render_prompt(tokenizer, task)
    assert prompt.startswith("<|im_start|>system\nYou are Qwen") and prompt.endswith("<|im_start|>assistant\n")
    tools_block = prompt.split("<tools>\n", 1)[1].split("\n</tools>", 1)[0]
    assert [json.loads(line) for line in tools_block.splitlines()] == task.tools
    assert f"<|im_start|>user\n{task.messages[0]['content']}<|im_end|>" in prompt
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert ids.count(tokenizer.convert_tokens_to_ids("<|im_start|>")) == 3


def test_render_prompt_keeps_a_system_message(tokenizer):
    task = next(t for t in load_tasks("bfcl:live_simple") if t.messages[0]["role"] == "system")
    prompt = render_prompt(tokenizer, task)
    assert prompt.startswith("<|im_start|>system\n" + task.messages[0]["content"] + "\n\n# Tools")
    assert prompt.count("<|im_start|>system") == 1


def test_template_written_calls_parse_and_score(tokenizer):
    """A call written by the template itself (as in supervised targets) is what the parser reads."""
    task = load_tasks("bfcl:simple_python")[0]
    (name, allowed), = task.ground_truth[0].items()
    args = {"base": allowed["base"][0], "height": allowed["height"][0]}
    convo = task.messages + [{"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": name, "arguments": args}}]}]  # fmt: skip
    text = tokenizer.apply_chat_template(convo, tools=task.tools, tokenize=False)
    reply = text.rsplit("<|im_start|>assistant", 1)[1].removesuffix("<|im_end|>\n")
    assert parse_tool_calls(reply).calls[0].arguments == args
    assert score(task, reply).correct


@pytest.mark.parametrize("category", ["simple_python", "simple", "multiple", "live_simple", "live_multiple",
                                      "irrelevance"])
def test_bfcl_tasks_load(category):
    tasks = load_tasks(f"bfcl:{category}")
    name = "simple_python" if category == "simple" else category
    lines = sum(1 for line in open(data_dir() / f"BFCL_v4_{name}.json") if line.strip())
    assert len(tasks) == lines and tasks[0].id.startswith(name) and len({t.id for t in tasks}) == len(tasks)
    for task in tasks:
        assert task.category == name and task.messages and task.messages[-1]["role"] == "user"
        assert all(t["type"] == "function" and t["function"]["parameters"]["type"] == "object" for t in task.tools)
        assert (task.ground_truth == []) == (name == "irrelevance")
        offered = {t["function"]["name"] for t in task.tools}
        assert all(next(iter(call)) in offered for call in task.ground_truth)


def test_every_supported_category_is_in_the_wheel():
    for category in CATEGORIES:
        assert (data_dir() / f"BFCL_v4_{category}.json").is_file()


def test_bfcl_types_become_json_schema():
    task = load_tasks("bfcl:simple_python")[0]
    params = task.tools[0]["function"]["parameters"]
    assert params["type"] == "object" and params["properties"]["base"]["type"] == "integer"
    schema = to_json_schema({"type": "dict", "properties": {
        "a": {"type": "float"}, "b": {"type": "tuple", "items": {"type": "String"}}, "c": {"type": "any",
                                                                                           "description": "x"},
        "d": {"type": "dict", "properties": {"e": {"type": "boolean"}}}}})  # fmt: skip
    assert schema == {"type": "object", "properties": {
        "a": {"type": "number"}, "b": {"type": "array", "items": {"type": "string"}}, "c": {"description": "x"},
        "d": {"type": "object", "properties": {"e": {"type": "boolean"}}}}}  # fmt: skip
    assert [json_type(t) for t in ("str", "int, optional", "List[str]", "Dict", "Union[int, float]")] == [
        "string", "integer", "array", "object", None]  # fmt: skip


def test_unknown_sources_are_one_line_errors():
    for source in ("bfcl:nope", "bfcl:simple_java", "tasks.csv", "organism"):
        with pytest.raises(ValueError) as err:
            load_tasks(source)
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="organism:train"):
        load_tasks("somewhere")
    with pytest.raises(FileNotFoundError):
        load_tasks("/nonexistent/tasks.jsonl")


def test_organism_splits():
    pytest.importorskip("dfc_ray.organism.world", reason="dfc_ray.organism.world is written by another helper")
    for split in ("train", "dev", "test"):
        tasks = load_tasks(f"organism:{split}")
        assert tasks and all(t.tools and isinstance(t.ground_truth, list) for t in tasks)
        if split != "train":  # every organism answer must be reachable under the strict checker
            for task in tasks:
                assert score(task, render_calls(reference_calls(task)) or "no call").correct, task.id


# --- JSONL -------------------------------------------------------------------------------------------

OPENAI_RECORD = {
    "id": "w1",
    "messages": [{"role": "user", "content": "Weather in Paris for 3 days?"}],
    "tools": [{"type": "function", "function": {"name": "get_weather", "description": "Forecast.", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"},
                                         "days": {"type": "integer"}}, "required": ["city"]}}}],
    "ground_truth": [{"get_weather": {"city": ["Paris", "Paris, France"], "days": [3, ""]}}],
}  # fmt: skip
XLAM_RECORD = {
    "query": "Is 17 a prime? Also give me 5 jokes.",
    "tools": json.dumps([
        {"name": "is_prime", "description": "Primality.", "parameters": {"num": {"type": "int", "description": "n"}}},
        {"name": "get_jokes", "description": "Jokes.", "parameters": {
            "limit": {"type": "int, optional", "description": "How many.", "default": 10},
            "topic": {"type": "str", "description": "Topic.", "default": ""}}},
    ]),
    "answers": json.dumps([{"name": "is_prime", "arguments": {"num": 17}}, {"name": "get_jokes",
                                                                            "arguments": {"limit": 5}}]),
}  # fmt: skip


def with_parameters(parameters: dict) -> dict:
    """OPENAI_RECORD whose tool takes `parameters` as its schema."""
    record = json.loads(json.dumps(OPENAI_RECORD))
    record["tools"][0]["function"]["parameters"] = parameters
    return record


def write(tmp_path, *records):
    path = tmp_path / "tasks.jsonl"
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def test_jsonl_openai_record(tmp_path):
    (task,) = load_tasks(str(write(tmp_path, OPENAI_RECORD)))
    assert task.id == "w1" and task.ground_truth == OPENAI_RECORD["ground_truth"] and task.category == "jsonl"
    assert task.tools == OPENAI_RECORD["tools"]
    ok = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "paris, france"}}\n</tool_call>'
    assert score(task, ok).correct


def test_jsonl_xlam_record(tmp_path):
    (task,) = load_tasks(str(write(tmp_path, "", XLAM_RECORD)))
    assert task.id == "tasks-2" and task.messages == [{"role": "user", "content": XLAM_RECORD["query"]}]
    jokes = task.tools[1]["function"]["parameters"]
    assert jokes["properties"]["limit"]["type"] == "integer" and jokes["required"] == []
    assert task.tools[0]["function"]["parameters"]["required"] == ["num"]
    assert task.ground_truth == [{"is_prime": {"num": [17]}}, {"get_jokes": {"limit": [5], "topic": ["", ""]}}]
    both = ('<tool_call>\n{"name": "get_jokes", "arguments": {"limit": 5}}\n</tool_call>\n'
            '<tool_call>\n{"name": "is_prime", "arguments": {"num": 17}}\n</tool_call>')  # fmt: skip
    assert score(task, both).correct
    assert not score(task, both.replace('"limit": 5', '"limit": 10')).correct


def test_jsonl_concrete_calls_with_nested_values(tmp_path):
    record = {"query": "q", "system": "Be brief.", "tools": [{"name": "book", "parameters": {
        "type": "object", "properties": {"who": {"type": "object"}, "legs": {"type": "array",
                                                                             "items": {"type": "object"}}}}}],
        "calls": [{"name": "book", "arguments": {"who": {"name": "Ann", "age": 3, "pet": {"kind": "cat"}},
                                                 "legs": [{"from": "A", "to": "B"}]}}]}  # fmt: skip
    (task,) = load_tasks(str(write(tmp_path, record)))
    assert task.messages[0] == {"role": "system", "content": "Be brief."}
    good = {"name": "book", "arguments": {"who": {"age": 3, "name": "ann", "pet": {"kind": "Cat"}},
                                          "legs": [{"to": "B", "from": "A"}]}}  # fmt: skip
    assert score(task, f"<tool_call>{json.dumps(good)}</tool_call>").correct
    good["arguments"]["who"]["pet"] = {"kind": "cat", "age": 1}
    assert not score(task, f"<tool_call>{json.dumps(good)}</tool_call>").correct
    good["arguments"]["who"] = {"age": 4, "name": "ann", "pet": {"kind": "cat"}}
    assert not score(task, f"<tool_call>{json.dumps(good)}</tool_call>").correct


@pytest.mark.parametrize(
    "record, field",
    [
        ("{not json", "line is not valid JSON"),
        ([1, 2], "expected a JSON object"),
        ({**OPENAI_RECORD, "tools": "[{"}, "'tools' is a string that is not valid JSON"),
        ({**OPENAI_RECORD, "tools": [{"description": "no name"}]}, "'tools'"),
        ({k: v for k, v in OPENAI_RECORD.items() if k != "tools"}, "'tools' is missing"),
        ({k: v for k, v in OPENAI_RECORD.items() if k != "messages"}, "'messages' is missing"),
        ({**OPENAI_RECORD, "messages": [{"content": "hi"}]}, "'messages'"),
        ({k: v for k, v in OPENAI_RECORD.items() if k != "ground_truth"}, "'ground_truth' is missing"),
        ({**OPENAI_RECORD, "ground_truth": [{"get_weather": {"city": "Paris"}}]}, "'ground_truth' should be"),
        ({**OPENAI_RECORD, "ground_truth": [{"nope": {}}]}, "not among the tools"),
        ({**XLAM_RECORD, "answers": '[{"name": "is_prime"}, 3]'}, "'answers' should be"),
        ({**XLAM_RECORD, "answers": '[{"name": "is_prime", "arguments": "{broken"}]'}, "'answers' should be"),
        # the task schema, checked when a spec is validated rather than met as a jinja2 or scoring error in eval
        ({**OPENAI_RECORD, "messages": [{"role": "user", "content": None}]}, "'messages[0].content' is None"),
        ({**OPENAI_RECORD, "messages": [{"role": "robot", "content": "hi"}]}, "'messages[0].role' is 'robot'"),
        (with_parameters({"type": "object", "properties": {"city": {}}, "required": "city"}),
         "'tools[get_weather].parameters.required' is 'city'; expected a list"),
        (with_parameters({"type": "object", "properties": {"city": {}}, "required": ["town"]}),
         "names 'town', which is not among the properties"),
        (with_parameters({"type": "object", "properties": {"city": "string"}}),
         "'tools[get_weather].parameters.properties.city' should be a JSON Schema object"),
        (with_parameters({"type": "object", "properties": {"cities": {"type": "array", "items": "string"}}}),
         "parameters.properties.cities.items' should be a JSON Schema object"),
        (with_parameters({"type": 7, "properties": {}}), "'tools[get_weather].parameters.type' is 7"),
    ],
)
def test_jsonl_bad_records_name_file_line_and_field(tmp_path, record, field):
    path = write(tmp_path, OPENAI_RECORD, record)
    with pytest.raises(ValueError) as err:
        load_tasks(str(path))
    message = str(err.value)
    assert message.startswith(f"{path}:2: ") and field in message and "\n" not in message, message


def test_docs_examples_load(tmp_path):
    """The JSONL examples in docs/tooluse.md are valid records."""
    docs = (Path(__file__).parents[1] / "docs" / "tooluse.md").read_text()
    examples = [" ".join(block.split("\n")) for block in docs.split("```json\n")[1:]]
    records = [json.loads(block.split("```")[0]) for block in examples]
    tasks = load_tasks(str(write(tmp_path, *records)))
    assert [len(t.ground_truth) for t in tasks] == [1, 2]


# ---- the seed study's format: numbered tool list in the system text, raw prompt


def test_toolrl_sample_lists_the_tools_and_keeps_the_ground_truth():
    tasks = load_tasks("toolrl:sample")
    assert len(tasks) == 20 and len({t.id for t in tasks}) == 20
    assert sum(not t.ground_truth for t in tasks) == 2 and sum(len(t.ground_truth) > 1 for t in tasks) == 2
    for task in tasks:
        system, user = task.messages
        assert system["role"] == "system" and user["role"] == "user" and task.meta["prompt_format"] == "toolrl"
        for number, tool in enumerate(task.tools, 1):
            function = tool["function"]
            assert f"{number}. Name: {function['name']}\n   Description: {function['description']}\n" in system["content"]
        assert f"{len(task.tools) + 1}. Name:" not in system["content"]
        reference = render_calls(reference_calls(task))
        assert score(task, reference).correct and seed_lenient(task, reference) == bool(task.ground_truth), task.id


def test_toolrl_source_renders_any_jsonl_file(tmp_path):
    path = write(tmp_path, {**XLAM_RECORD, "system": "Answer briefly."})
    (plain,) = load_tasks(str(path))
    (task,) = load_tasks(f"toolrl:{path}")
    assert task.tools == plain.tools and task.ground_truth == plain.ground_truth and task.id == plain.id
    system = task.messages[0]["content"]
    assert system.startswith("You help the user") and system.endswith("\n\nAnswer briefly.")
    assert "1. Name: is_prime" in system and "2. Name: get_jokes" in system and task.messages[1:] == plain.messages[1:]
    assert as_toolrl(plain) == task
    with pytest.raises(FileNotFoundError, match="no-such.jsonl does not exist"):
        load_tasks("toolrl:no-such.jsonl")


def test_raw_prompt_is_system_and_user_text_without_a_template(tokenizer):
    task = load_tasks("toolrl:sample")[0]
    prompt = render_raw_prompt(tokenizer, task)
    assert prompt == task.messages[0]["content"] + "\n\n" + task.messages[1]["content"]
    assert "<|im_start|>" not in prompt and prompt.endswith("right now?")
    ids = tokenizer(prompt)["input_ids"]
    assert tokenizer.convert_tokens_to_ids("<|im_start|>") not in ids
    bfcl = load_tasks("bfcl:simple_python")[0]
    assert render_raw_prompt(tokenizer, bfcl) == bfcl.messages[0]["content"]  # no tools: none listed
    chat = as_toolrl(bfcl)
    chat.messages.append({"role": "assistant", "content": "ok"})
    with pytest.raises(ValueError, match="a 'assistant' message; the raw prompt format takes only system and user"):
        render_raw_prompt(tokenizer, chat)
