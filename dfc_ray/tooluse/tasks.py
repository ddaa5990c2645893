"""Tool-calling tasks: one record type for every source (organism, BFCL, JSONL)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from dfc_ray.tooluse.bfcl import load_bfcl
from dfc_ray.tooluse.dialects import get_dialect, resolve_dialect
from dfc_ray.tooluse.jsonl import load_jsonl
from dfc_ray.tooluse.task import Task
from dfc_ray.tooluse.toolrl import PROMPT_FORMAT, as_toolrl, load_toolrl

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


SOURCES = '"organism:train|dev|test", "bfcl:<category>", "toolrl:sample|<file.jsonl>" or a path to a .jsonl file'


def load_tasks(source: str) -> list[Task]:
    """Tasks from the embedded organism's split, a BFCL category, the seed study's numbered-tool-list
    format (ToolRL-style, `toolrl:`), or a JSONL file (docs/tooluse.md)."""
    if source.startswith("organism:"):
        # deferred: importing the dfc_ray.organism package loads torch and transformers
        from dfc_ray.organism.world import load_split

        return load_split(source.split(":", 1)[1])
    if source.startswith("bfcl:"):
        return load_bfcl(source.split(":", 1)[1])
    if source.startswith("toolrl:"):
        return load_toolrl(source.split(":", 1)[1])
    if source.endswith(".jsonl"):
        return load_jsonl(source)
    raise ValueError(f"task source {source!r} not understood; expected {SOURCES}")


def dev_test_tasks(dev_source: str, test_source: str, n_dev: int = 0, n_test: int = 0) -> tuple[list[Task], list[Task]]:
    """The first `n_dev` / `n_test` tasks (0 = all) of two sources, checked to be non-empty and to share no
    prompt: selection on dev must not see a test prompt (the steering protocol; spec validation runs it too)."""
    dev, test = load_tasks(dev_source), load_tasks(test_source)
    dev, test = dev[:n_dev] if n_dev else dev, test[:n_test] if n_test else test
    prompts = {json.dumps(t.messages, sort_keys=True) for t in dev}
    shared = sum(json.dumps(t.messages, sort_keys=True) in prompts for t in test)
    if not dev or not test or shared:
        raise ValueError(f"dev_tasks={dev_source!r} ({len(dev)} tasks) and test_tasks={test_source!r} "
                         f"({len(test)} tasks, {shared} with a dev prompt) must be non-empty and share no prompt")
    return dev, test


def _template_name(tokenizer: PreTrainedTokenizerBase) -> str:
    return getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__


def _merged_system(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``messages`` with the system text moved to the front of the first user turn (blank line between)."""
    system = "\n\n".join(str(m["content"]) for m in messages if m["role"] == "system")
    rest = [dict(m) for m in messages if m["role"] != "system"]
    first_user = next((m for m in rest if m["role"] == "user"), None)
    if first_user is None:
        return [{"role": "user", "content": system}] + rest
    first_user["content"] = f"{system}\n\n{first_user['content']}"
    return rest


def _apply_template(tokenizer: PreTrainedTokenizerBase, task: Task, messages: list[dict[str, Any]],
                    tools: list[dict[str, Any]] | None) -> str:
    """The chat template applied; a template that rejects the system role (Gemma's "System role not
    supported") gets the system text merged into the first user turn instead of raising."""
    # deferred: jinja2 comes with transformers, which the caller's tokenizer has loaded already
    from jinja2.exceptions import TemplateError

    try:
        return tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False)
    except TemplateError as err:
        if not any(m["role"] == "system" for m in messages):
            raise ValueError(f"chat template of {_template_name(tokenizer)!r} rejects task {task.id}: {err}") from None
    try:
        return tokenizer.apply_chat_template(_merged_system(messages), tools=tools, add_generation_prompt=True,
                                             tokenize=False)
    except TemplateError as err:
        raise ValueError(f"chat template of {_template_name(tokenizer)!r} rejects task {task.id} even with its "
                         f"system text merged into the first user turn: {err}") from None


def _with_tools_block(messages: list[dict[str, Any]], block: str) -> list[dict[str, Any]]:
    """``messages`` with ``block`` at the start of the system message (a new one if there is none)."""
    if messages and messages[0]["role"] == "system":
        return [{**messages[0], "content": f"{block}\n\n{messages[0]['content']}"}] + messages[1:]
    return [{"role": "system", "content": block}] + messages


def render_prompt(tokenizer: PreTrainedTokenizerBase, task: Task, dialect: str = "auto") -> str:
    """The model's prompt for ``task``: its chat template with the tools, ready for the reply.

    Tools go to the template as OpenAI-style ``{"type": "function", "function": {...}}`` dicts: the
    Qwen2.5 template writes each one with ``tojson`` into ``<tools>`` in the system turn, and that
    wrapped form is what Qwen2.5's own function-calling examples put there. A template that drops them
    (the rendered prompt lacks an offered tool's name, e.g. Gemma's) gets them instead as ``dialect``'s
    fallback block (`Dialect.tool_instructions`) at the start of the system text, merged into the first
    user turn where the template has no system role; ``dialect`` is a ``pair.dialect`` setting ("auto":
    the template's own). docs/tooluse.md has the rules."""
    tools = task.tools or None
    prompt = _apply_template(tokenizer, task, task.messages, tools)
    names = [t["function"]["name"] for t in task.tools]
    if all(name in prompt for name in names):
        return prompt
    block = get_dialect(resolve_dialect(dialect, tokenizer)).tool_instructions(task.tools)
    prompt = _apply_template(tokenizer, task, _with_tools_block(task.messages, block), None)
    if missing := [name for name in names if name not in prompt]:
        raise ValueError(f"chat template of {_template_name(tokenizer)!r} drops the offered tools of task {task.id} "
                         f"(no {missing[0]!r} in the prompt) and the system text that lists them; expected a template "
                         "that renders tools= or system text")
    return prompt


def render_raw_prompt(tokenizer: PreTrainedTokenizerBase, task: Task) -> str:
    """The seed study's prompt: the system and user texts joined by a blank line, no chat template (the
    caller runs `tokenizer(prompt)` one prompt at a time, as the study did). The tools reach the model only
    if a system message lists them (`toolrl.as_toolrl`). `tokenizer` is unused: the signature is
    `render_prompt`'s, so a protocol switch can swap the two."""
    for message in task.messages:
        if message["role"] not in ("system", "user"):
            raise ValueError(f"task {task.id}: a {message['role']!r} message; the raw prompt format takes "
                             f"only system and user text")
    return "\n\n".join(str(m["content"]) for m in task.messages)


def render_for(tokenizer: PreTrainedTokenizerBase, task: Task, prompt_format: str = "chat",
               dialect: str = "auto") -> str:
    """The prompt under a judging protocol's `prompt_format` (config.JudgeProtocol): "chat" is
    `render_prompt` (in `dialect`, a ``pair.dialect`` setting); "raw" is the seed study's, the numbered tool
    list in the system text (`as_toolrl`, unless the task already has it) and no chat template
    (`render_raw_prompt`)."""
    if prompt_format == "chat":
        return render_prompt(tokenizer, task, dialect)
    return render_raw_prompt(tokenizer, task if task.meta.get("prompt_format") == PROMPT_FORMAT else as_toolrl(task))


def prompt_lengths(tokenizer: PreTrainedTokenizerBase, tasks: list[Task], prompt_format: str = "chat",
                   dialect: str = "auto") -> list[int]:
    """Tokens of each task's prompt under `prompt_format` (`render_for`), as generation sees it."""
    prompts = [render_for(tokenizer, task, prompt_format, dialect) for task in tasks]
    # verbose=False: no "longer than the maximum" warning, the caller says what is wrong in its own words
    encoded = tokenizer(prompts, add_special_tokens=False, verbose=False)["input_ids"] if prompts else []
    return [len(ids) for ids in encoded]
