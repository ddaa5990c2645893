"""The embedded model organism: a tiny real Qwen2 pair (A = RL-tuned for tool use, B = base).

The shipped pair lives in ``pair/`` next to this file (``a/``, ``b/``, ``tokenizer/``, ``card.json``);
``dfc-ray organism build`` rebuilds it (docs/organism.md). ``pair-llama3/`` holds the llama3-dialect pair:
its own ``a/``, ``tokenizer/`` (llama3 template) and ``card.json``, whose ``"base"`` names the folder whose
``b/`` it shares.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerFast, Qwen2ForCausalLM

from dfc_ray.config import ORGANISM, ORGANISM_PAIRS

PAIR_DIR = Path(__file__).parent / ORGANISM_PAIRS[ORGANISM]
"""The shipped (hermes-dialect) pair's folder."""
DIALECT_PAIR_DIRS = {"hermes": PAIR_DIR, "llama3": Path(__file__).parent / ORGANISM_PAIRS["organism-llama3"]}
"""The shipped pair's folder per tool-call dialect (``dfc-ray organism build --dialect``'s default ``--out``)."""


def _require(path: Path) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"organism pair: {path} is missing; expected a pair built by `dfc-ray organism build`")
    return path


def load_pair(
    device: str = "cpu", dtype: torch.dtype = torch.float32, pair_dir: str | Path = PAIR_DIR
) -> tuple[Qwen2ForCausalLM, Qwen2ForCausalLM, PreTrainedTokenizerFast]:
    """(model_a, model_b, tokenizer) of the pair in ``pair_dir`` (default: the shipped one), in eval mode."""
    pair_dir = Path(pair_dir)
    models = []
    for name in ("a", "b"):
        model = Qwen2ForCausalLM.from_pretrained(part_dir(pair_dir, name), dtype=dtype)
        models.append(model.to(device).eval())
    tokenizer = AutoTokenizer.from_pretrained(part_dir(pair_dir, "tokenizer"))
    return models[0], models[1], tokenizer


def part_dir(pair_dir: str | Path, part: str) -> Path:
    """The folder of ``part`` (a, b or tokenizer) of the pair in ``pair_dir``. A pair built on another pair's B
    has no ``b/``: its card's ``"base"`` (relative to ``pair_dir``) names the folder that holds it."""
    pair_dir = Path(pair_dir)
    if part == "b" and not (pair_dir / "b").exists() and (pair_dir / "card.json").exists():
        base = read_card(pair_dir).get("base")
        if base:
            return _require((pair_dir / base / "b").resolve())
    return _require(pair_dir / part)


def reference_dir(reference: str, part: str) -> Path:
    """The folder of ``part`` of the shipped pair a spec names (``organism``, ``organism-llama3``)."""
    return part_dir(Path(__file__).parent / ORGANISM_PAIRS[reference], part)


def read_card(pair_dir: str | Path = PAIR_DIR) -> dict[str, Any]:
    """The pair's measured card (architecture, build time, A/B tool-use scores on test and dev)."""
    return json.loads(_require(Path(pair_dir) / "card.json").read_text())
