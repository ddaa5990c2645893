"""A pair with a planted difference: A equals B except for a change to one block's MLP down-projection.

B is a tiny random-weight Qwen2 model (the organism's tokenizer, so organism tasks render). A is B
with block L's MLP down-projection W replaced by W + u·wᵀ, where u (d_model) is the planted
direction and w = c·e_j reads one intermediate neuron j. Every block before L is identical and
block L's attention too, so after block L, x_A − x_B = u · c · a_j(h) at every position exactly
(a_j: neuron j's activation, silu(gate) · up): the difference of means recovers u, and a DFC trained
on the pair's activations there has one thing to dedicate an A-exclusive feature to. j is the most
heavy-tailed neuron of the random model (large on few positions), so a rarely firing dedicated
feature is the economical code for the difference. Tests (tests/test_planted_steering.py)
and docs use it as ground truth for the reference direction and the steering protocol's ranking.

The second change (`PlantedPairConfig.change = "scale"`) plants a direction both models write: B's
column j becomes u (same size as above) and A's is `scale` × that, so x_A − x_B = (scale − 1)·u·c·a_j.
The economical code is now ONE shared feature whose A row is `scale` × its B row: the ground truth
for an attribution whose top contributor is shared and whose A-exclusive share is ≈ 0.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from dfc_ray.config import PlantedPairConfig
from dfc_ray.organism import PAIR_DIR, world
from dfc_ray.pair import PairSpec


def build_planted_pair(root: str | Path, cfg: PlantedPairConfig | None = None) -> tuple[PairSpec, Tensor]:
    """Write B, A and the organism tokenizer under `root`; return (the pair's spec, the unit planted direction u).

    With `cfg.plant = False`, A is a copy of B and u is still returned (the direction that is NOT there
    as a difference)."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM  # deferred: transformers is heavy

    cfg = cfg or PlantedPairConfig()


    if not 0 <= cfg.layer < cfg.n_layers:
        raise ValueError(f"PlantedPairConfig.layer={cfg.layer}: expected a block in [0, {cfg.n_layers})")
    root = Path(root)
    tokenizer = AutoTokenizer.from_pretrained(PAIR_DIR / "tokenizer")
    tokenizer.save_pretrained(root / "tokenizer")
    torch.manual_seed(cfg.seed)
    config = Qwen2Config(hidden_size=cfg.d_model, intermediate_size=cfg.d_ff, num_hidden_layers=cfg.n_layers,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tokenizer),
                         max_position_embeddings=1024, tie_word_embeddings=True, initializer_range=0.2)
    model = Qwen2ForCausalLM(config).eval()
    u = torch.randn(cfg.d_model, generator=torch.Generator().manual_seed(cfg.seed + 1))
    u = u / u.norm()
    neuron, size = _sparse_neuron(model, tokenizer, cfg) if cfg.plant or cfg.change == "scale" else (0, 0.0)
    column = model.model.layers[cfg.layer].mlp.down_proj.weight[:, neuron]  # a view: editing it edits the model
    with torch.no_grad():
        if cfg.change == "scale":  # B too writes u, through neuron j
            column.copy_(cfg.strength * size * u)
        model.save_pretrained(root / "b")
        if cfg.plant and cfg.change == "scale":  # A writes B's u `scale` times as strongly
            column.mul_(cfg.scale)
        elif cfg.plant:  # A adds u·wᵀ, a direction B does not write
            column.add_(cfg.strength * size * u)
    model.save_pretrained(root / "a")
    return PairSpec(a=str(root / "a"), b=str(root / "b"), tokenizer=str(root / "tokenizer")), u


def _sparse_neuron(model, tokenizer, cfg: PlantedPairConfig) -> tuple[int, float]:
    """(j, c): the intermediate neuron of block `cfg.layer` whose activation is the most heavy-tailed on
    organism text (kurtosis), and 1 / its 99th-percentile |activation| × the block output's RMS norm,
    so that u·c·a_j is about `strength` × the residual's size where neuron j fires."""
    captured: dict[str, Tensor] = {}
    mlp = model.model.layers[cfg.layer].mlp
    handle = mlp.down_proj.register_forward_hook(lambda _m, args, out: captured.update(a=args[0], out=out))
    try:
        with torch.inference_mode():
            ids = tokenizer(world.plain_text(16, cfg.seed + 7), add_special_tokens=False)["input_ids"]
            for row in ids:
                model(input_ids=torch.tensor([row]))
                captured.setdefault("acts", []).append(captured["a"][0])
                captured.setdefault("outs", []).append(captured["out"][0])
    finally:
        handle.remove()
    acts, outs = torch.cat(captured["acts"]), torch.cat(captured["outs"])
    centered = acts - acts.mean(0)
    kurtosis = (centered ** 4).mean(0) / (centered ** 2).mean(0).clamp_min(1e-12) ** 2
    neuron = int(kurtosis.argmax())
    tail = float(acts[:, neuron].abs().quantile(0.99))
    return neuron, float(outs.norm(dim=-1).mean()) / max(tail, 1e-6)
