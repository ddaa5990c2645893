"""The embedded organism: world, tokenizer/template, the shipped pair and its measured targets."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import PreTrainedTokenizerFast, Qwen2ForCausalLM

from dfc_ray.organism import PAIR_DIR, load_pair, read_card
from dfc_ray.organism import world as W
from dfc_ray.organism.build import BuildConfig, build_pair, call_text, evaluate
from dfc_ray.tooluse import load_tasks, render_prompt, score


@pytest.fixture(scope="module")
def pair():
    return load_pair()


def test_shipped_pair_loads_as_real_qwen2(pair):
    a, b, tok = pair
    assert isinstance(a, Qwen2ForCausalLM) and isinstance(b, Qwen2ForCausalLM)
    arch = [{k: v for k, v in m.config.to_dict().items() if k != "_name_or_path"} for m in (a, b)]
    assert a.config.num_hidden_layers >= 4 and arch[0] == arch[1]
    assert a.config.vocab_size >= len(tok)
    assert isinstance(tok, PreTrainedTokenizerFast)
    assert (tok.eos_token, tok.pad_token, tok.padding_side) == ("<|im_end|>", "<|endoftext|>", "left")
    # RL changed A: the two models are not the same weights.
    assert any(not torch.equal(pa, pb) for pa, pb in zip(a.parameters(), b.parameters()))
    size = sum(f.stat().st_size for f in PAIR_DIR.rglob("*") if f.is_file())
    assert size < 12 * 2**20


def test_template_renders_tools_like_qwen25(pair):
    tok = pair[2]
    task = W.load_split("test")[0]
    text = render_prompt(tok, task)
    tools_block = "\n".join(json.dumps(t, ensure_ascii=False) for t in task.tools)
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.\n\n# Tools\n\n")
    assert f"<tools>\n{tools_block}\n</tools>" in text
    assert ('<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
            in text)
    assert text.endswith(f"<|im_start|>user\n{task.messages[0]['content']}<|im_end|>\n<|im_start|>assistant\n")
    # An assistant tool call renders exactly as the replies the models are trained and scored on.
    call = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "paris"}}}
    turn = tok.apply_chat_template(task.messages + [{"role": "assistant", "content": "", "tool_calls": [call]}],
                                   tools=task.tools, tokenize=False)
    assert turn.endswith("<|im_start|>assistant\n" + call_text("get_weather", {"city": "paris"}) + "<|im_end|>\n")


def test_tokenizer_is_compact_and_keeps_tool_tags(pair):
    tok = pair[2]
    for tool in W.TOOLS:
        assert len(tok.tokenize(tool.name)) <= 2, tool.name
        for p in tool.params:
            assert len(tok.tokenize(p.name)) <= 2, p.name
            for v in p.values:
                assert len(tok.tokenize(f" {v}")) <= 2, v
    ids = tok(call_text("get_weather", {"city": "oslo"}) + "<|im_end|>", add_special_tokens=False)["input_ids"]
    assert tok.decode(ids, skip_special_tokens=True) == call_text("get_weather", {"city": "oslo"})
    # Byte-level: any text round-trips.
    odd = "Ünïcødé ✓ 東京 def f(x): return x**2"
    assert tok.decode(tok(odd, add_special_tokens=False)["input_ids"]) == odd


def test_splits_are_deterministic_and_disjoint():
    texts = {}
    for split, size in W.SPLIT_SIZES.items():
        tasks = W.load_split(split)
        assert len(tasks) == size and len({t.id for t in tasks}) == size
        texts[split] = {t.messages[0]["content"] for t in tasks}
        no_tool = sum(not t.ground_truth for t in tasks) / size
        assert 0.08 < no_tool < 0.25, (split, no_tool)
        assert all(3 <= len(t.tools) <= 4 for t in tasks)
    assert not texts["train"] & texts["dev"] and not texts["train"] & texts["test"]
    assert not texts["dev"] & texts["test"]
    first = [(t.messages, t.tools, t.ground_truth) for t in load_tasks("organism:test")]
    W._split.cache_clear()
    assert first == [(t.messages, t.tools, t.ground_truth) for t in W.load_split("test")]
    with pytest.raises(ValueError, match="organism split"):
        W.load_split("validation")


def test_world_has_typed_tools_and_consistent_ground_truth():
    assert len(W.TOOLS) >= 12
    kinds = {p.kind for t in W.TOOLS for p in t.params}
    assert {"string", "integer", "number"} <= kinds
    assert any(p.enum for t in W.TOOLS for p in t.params)
    assert any(p.default is not None for t in W.TOOLS for p in t.params)
    for task in W.load_split("dev"):
        offered = [t["function"]["name"] for t in task.tools]
        if not task.ground_truth:
            assert score(task, "Hello! How can I help you today?").correct
            assert not score(task, call_text(offered[0], {})).correct
            continue
        name, args = task.meta["tool"], task.meta["args"]
        assert name in offered
        assert score(task, call_text(name, args)).correct, task
        wrong = [n for n in offered if n != name][0]
        assert not score(task, call_text(wrong, args)).correct
        assert not score(task, "You could use it.").correct
    assert W.plain_text(5, seed=3) == W.plain_text(5, seed=3) and len(W.plain_text(7, seed=1)) == 7


def test_shipped_pair_meets_its_targets(pair):
    """Measured live, greedy and strict on organism:test: A >= 80%, 0 < B <= 25%, and the card agrees."""
    a, b, tok = pair
    tasks = W.load_split("test")
    cfg = BuildConfig()
    got = {"a": evaluate(a, tok, tasks, cfg), "b": evaluate(b, tok, tasks, cfg)}
    assert got["a"]["correct"] >= 0.80, got
    assert 0 < got["b"]["correct"] <= 0.25, got
    card = read_card()
    for model in ("a", "b"):
        assert abs(card[model]["test"]["correct"] - got[model]["correct"]) <= 0.01, (card[model], got[model])


def test_build_smoke(tmp_path):
    """The whole build runs end to end at toy size and writes a loadable pair with its card."""
    cfg = BuildConfig(hidden=32, intermediate=64, layers=1, heads=2, kv_heads=1, pretrain_steps=2, pretrain_batch=2,
                      warmup=1, rl_steps=1, rl_prompts=2, rl_group=2, max_new_tokens=4, eval_limit=8)
    card = build_pair(tmp_path / "pair", seed=1, cfg=cfg)
    a, b, tok = load_pair(pair_dir=tmp_path / "pair")
    assert card["layers"] == 1 and card["seed"] == 1 and a.config.hidden_size == 32
    assert set(card["a"]) == {"test", "dev"} and 0 <= card["b"]["dev"]["correct"] <= 1
    assert (tmp_path / "pair" / "a" / "model.safetensors").exists()
