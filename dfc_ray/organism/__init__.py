"""The embedded model organism: a tiny real Qwen2 pair (A = RL-tuned for tool use, B = base).

The shipped pair lives in ``pair/`` next to this file (``a/``, ``b/``, ``tokenizer/``, ``card.json``);
``dfc-ray organism build`` rebuilds it (docs/organism.md).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerFast, Qwen2ForCausalLM

PAIR_DIR = Path(__file__).parent / "pair"
"""The shipped pair's folder."""


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
        model = Qwen2ForCausalLM.from_pretrained(_require(pair_dir / name), dtype=dtype)
        models.append(model.to(device).eval())
    tokenizer = AutoTokenizer.from_pretrained(_require(pair_dir / "tokenizer"))
    return models[0], models[1], tokenizer


def read_card(pair_dir: str | Path = PAIR_DIR) -> dict[str, Any]:
    """The pair's measured card (architecture, build time, A/B tool-use scores on test and dev)."""
    return json.loads(_require(Path(pair_dir) / "card.json").read_text())
