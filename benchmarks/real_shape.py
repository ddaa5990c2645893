"""The whole pipeline at Qwen2.5-3B's shape, on random weights: write the pair and a 4-trial spec.

    python benchmarks/real_shape.py --out runs/realshape [--width 2048] [--dtype bfloat16] [--steps 3000]
    dfc-ray sweep runs/realshape/realshape.yaml --storage runs/realshape
    dfc-ray sweep --plan paper48 --costs runs/realshape/realshape-<time>

The pair keeps every shape parameter of Qwen2.5-3B (36 blocks, GQA 16/2 heads, vocabulary 151,936,
tied embeddings, rope θ 1e6) except, with `--width` < 2048, d_model and the MLP width (scaled
together, heads keep their count). B is a random init, A = B + 5% noise on every weight: shapes and
costs are real, the science is not. The organism's tokenizer (its Qwen2.5-style chat template with
tools) renders the organism tasks, so nothing needs a hub. The spec extends paper48 (layer 13,
its crosscoder settings) with dictionary sizes scaled by width/2048 and small eval sets.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import yaml

QWEN25_3B = dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, rope_theta=1e6,
                 max_position_embeddings=32768, rms_norm_eps=1e-6, hidden_act="silu")


def write_pair(out: Path, width: int, dtype: str, seed: int = 0) -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from dfc_ray.organism import PAIR_DIR

    scale = width / QWEN25_3B["hidden_size"]
    config = Qwen2Config(**QWEN25_3B | {"hidden_size": width,
                                        "intermediate_size": int(QWEN25_3B["intermediate_size"] * scale),
                                        "head_dim": width // QWEN25_3B["num_attention_heads"]})
    torch.manual_seed(seed)
    model_b = Qwen2ForCausalLM(config).to(getattr(torch, dtype))
    model_b.save_pretrained(out / "b")
    with torch.no_grad():
        for p in model_b.parameters():
            p.add_(0.05 * p.float().std().nan_to_num(0.0) * torch.randn_like(p.float()).to(p.dtype))
    model_b.save_pretrained(out / "a")
    tokenizer_dir = PAIR_DIR / "tokenizer"
    print(f"pair: {out} (d_model {width}, {sum(p.numel() for p in model_b.parameters()) / 1e6:.1f} M params each); "
          f"tokenizer: {tokenizer_dir}")


def write_spec(out: Path, width: int, dtype: str, steps: int) -> Path:
    scale = width / QWEN25_3B["hidden_size"]
    spec = {
        "name": "realshape",
        "description": f"paper48's pipeline on a random Qwen2.5-3B-shaped pair, d_model {width}: 4 trials",
        "extends": "paper48",
        "pair": {"a": str((out / "pair/a").resolve()), "b": str((out / "pair/b").resolve()), "tokenizer": "organism",
                 "dtype": dtype},
        "harvest": {"tasks": "organism:train", "n_tasks": 256, "plain_text": "organism", "n_plain": 512,
                    "batch_size": 32, "num_actors": 1, "dtype": "float16" if dtype == "float32" else dtype},
        "train": {"steps": steps, "batch_size": 1024, "reader": "ray" if torch.cuda.is_available() else "local"},
        "grid": {"dict_size": [int(8192 * scale)], "k": [45, 90],
                 "variant": [{"name": "dfc-5pct", "a_exclusive": 0.05, "b_exclusive": 0.05, "l1_excl": 0.0},
                             {"name": "crosscoder", "a_exclusive": 0.0, "b_exclusive": 0.0, "l1_shared": 0.0}]},
        "eval": {"tasks": "organism:test", "n_tasks": 32, "max_new_tokens": 48, "batch_size": 32, "n_texts": 8},
        "steering": {"dev_tasks": "organism:dev", "test_tasks": "organism:test", "n_dev": 16, "n_test": 32,
                     "n_plain": 16,
                     "top_n": 2, "alphas": [4], "targets": ["a", "b"], "min_set_pool": 2, "min_set_max": 1,
                     "max_new_tokens": 48, "batch_size": 32},
        "resources": {"cpu": 1, "gpu": 0, "evaluators": 1, "evaluator_cpu": 0.5, "evaluator_gpu": 0, "data_cpus": 0,
                      "max_concurrent": 1}
        if not torch.cuda.is_available() else
        {"cpu": 2, "gpu": 0.5, "evaluators": 1, "evaluator_gpu": 0.25, "data_cpus": 4},
    }
    path = out / "realshape.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    print(f"spec: {path}")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/realshape"))
    parser.add_argument("--width", type=int, default=2048, help="d_model (2048 = Qwen2.5-3B; less on a CPU)")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--steps", type=int, default=3000, help="training steps per trial")
    args = parser.parse_args()
    write_pair(args.out / "pair", args.width, args.dtype)
    write_spec(args.out, args.width, args.dtype, args.steps)


if __name__ == "__main__":
    main()
