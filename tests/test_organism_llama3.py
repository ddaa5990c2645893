"""The llama3-dialect organism: an A that calls tools as bare JSON, on the shipped B (docs/organism.md)."""

from __future__ import annotations

import pytest
import torch

from dfc_ray.config import PairSpec
from dfc_ray.organism import DIALECT_PAIR_DIRS, PAIR_DIR, load_pair, read_card
from dfc_ray.organism import world as W
from dfc_ray.organism.build import BuildConfig, build_pair, dialect_config, evaluate
from dfc_ray.pair import load_pair as load_spec_pair
from dfc_ray.tooluse import ToolCall, render_prompt
from dfc_ray.tooluse.dialects import detect_dialect, get_dialect

LLAMA3_DIR = DIALECT_PAIR_DIRS["llama3"]


@pytest.fixture(scope="module")
def pair():
    return load_pair(pair_dir=LLAMA3_DIR)


def test_shipped_llama3_pair_shares_the_shipped_b_and_speaks_llama3(pair):
    a, b, tok = pair
    assert not (LLAMA3_DIR / "b").exists() and read_card(LLAMA3_DIR)["base"] == "../pair"
    _, shipped_b, _ = load_pair()
    assert all(torch.equal(p, q) for p, q in zip(b.parameters(), shipped_b.parameters()))
    assert any(not torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert detect_dialect(tok) == "llama3"
    task = W.load_split("test")[0]
    prompt = render_prompt(tok, task)
    assert '"parameters": dictionary of argument name and its value' in prompt and "<tool_call>" not in prompt
    # An assistant tool call renders exactly as the llama3 dialect writes calls (what RL rewarded).
    call = ToolCall("get_weather", {"city": "paris"})
    turn = tok.apply_chat_template(
        task.messages + [{"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": call.name, "arguments": call.arguments}}]}],
        tools=task.tools, tokenize=False)
    assert turn.endswith("<|im_start|>assistant\n" + get_dialect("llama3").format_calls([call]) + "<|im_end|>\n")


def test_a_calls_in_llama3_and_the_card_holds_its_numbers(pair):
    """Measured live, greedy and strict on organism:test under the llama3 template: A >= 80% with its replies
    well-formed llama3 (a hermes `<tool_call>` fails that), 0 < B <= 25%, and the card agrees."""
    a, b, tok = pair
    tasks, cfg = W.load_split("test"), dialect_config("llama3")
    card = read_card(LLAMA3_DIR)
    assert card["config"]["dialect"] == "llama3"
    got = {"a": evaluate(a, tok, tasks, cfg), "b": evaluate(b, tok, tasks, cfg)}
    assert got["a"]["correct"] >= 0.80 and got["a"]["format_ok"] >= 0.95 and 0 < got["b"]["correct"] <= 0.25, got
    for model in ("a", "b"):
        assert abs(card[model]["test"]["correct"] - got[model]["correct"]) <= 0.01, (card[model], got[model])


def test_spec_reference_resolves_to_the_llama3_pair():
    a, b, tok = load_spec_pair(PairSpec(a="organism-llama3", b="organism-llama3", device="cpu"))
    assert detect_dialect(tok) == "llama3"
    shipped_a = load_pair()[0]
    assert any(not torch.equal(p, q) for p, q in zip(a.parameters(), shipped_a.parameters()))
    assert b.config.hidden_size == a.config.hidden_size


def test_dialect_build_on_a_base_smoke(tmp_path):
    """A toy base pair, then a llama3 A on its B: the second folder has no b/ and reads it through "base"."""
    toy = dict(hidden=32, intermediate=64, layers=1, heads=2, kv_heads=1, pretrain_steps=2, pretrain_batch=2,
               warmup=1, rl_steps=1, rl_prompts=2, rl_group=2, max_new_tokens=4, eval_limit=4)
    build_pair(tmp_path / "pair", seed=1, cfg=BuildConfig(**toy))  # type: ignore[arg-type]
    cfg = dialect_config("llama3", seed=1)
    for key, value in toy.items():
        setattr(cfg, key, value)
    cfg.hint_share, cfg.hint_steps, cfg.distill_tasks, cfg.distill_steps = 0.5, 1, 6, 2
    card = build_pair(tmp_path / "llama3", seed=1, cfg=cfg, base_dir=tmp_path / "pair")
    assert card["base"] == "../pair" and not (tmp_path / "llama3" / "b").exists()
    assert 0 <= card["warm_start"]["kept"] <= 1 and "warm_start" in card["stage_seconds"]
    a, b, tok = load_pair(pair_dir=tmp_path / "llama3")
    base_b = load_pair(pair_dir=tmp_path / "pair")[1]
    assert all(torch.equal(p, q) for p, q in zip(b.parameters(), base_b.parameters()))
    assert detect_dialect(tok) == "llama3" and card["config"]["dialect"] == "llama3"
    assert 0 <= evaluate(a, tok, W.load_split("test")[:2], cfg)["correct"] <= 1
    with pytest.raises(ValueError, match="has no recipe"):
        dialect_config("mistral")
    assert PAIR_DIR != LLAMA3_DIR
