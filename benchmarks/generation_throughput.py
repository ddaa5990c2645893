"""Generation throughput: prompts/s batched vs one-at-a-time, and generated tokens/s.

    PYTHONPATH=. python benchmarks/generation_throughput.py [--prompts 64] [--batch-size 32]
    PYTHONPATH=. python benchmarks/generation_throughput.py --decode-loops   # eager vs static loop, batched

Uses the embedded organism's model A on its test prompts when `dfc_ray.organism.load_pair` works,
else a random-weight Qwen2 (hidden 128, 4 layers, vocab 3000) on ~250-token prompts with ~30-token
replies. Also checks that both modes give the same token ids. Target: >= 8x at batch 32 on 2 cores.
"""

from __future__ import annotations

import argparse
import random

import torch
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from timing import timed
from dfc_ray.generation import GenerationConfig, generate


def organism_setup(n_prompts: int):
    """Model A of the embedded pair and rendered organism test prompts."""
    from dfc_ray.organism import load_pair
    from dfc_ray.tooluse import load_tasks, render_prompt

    model, _, tokenizer = load_pair()
    tasks = load_tasks("organism:test")
    prompts = [render_prompt(tokenizer, tasks[i % len(tasks)]) for i in range(n_prompts)]
    return "embedded organism, model A, organism:test prompts", model, tokenizer, prompts


def random_setup(n_prompts: int, seed: int = 0):
    """A random-weight Qwen2 of the organism's size and random ~250-word prompts."""
    words = [f"w{i}" for i in range(2990)]
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"]
    tags = ["<tool_call>", "</tool_call>"]
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(specials + tags + words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([AddedToken(t, special=True) for t in specials])
    tok.add_tokens([AddedToken(t, special=False) for t in tags])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token="<unk>"
    )
    torch.manual_seed(seed)
    config = Qwen2Config(
        hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=512, vocab_size=len(tokenizer), tie_word_embeddings=False,
    )
    rng = random.Random(seed)
    prompts = [" ".join(rng.choice(words) for _ in range(rng.randint(200, 300))) for _ in range(n_prompts)]
    return "random-weight Qwen2 (hidden 128, 4 layers, vocab 3000)", Qwen2ForCausalLM(config).eval(), tokenizer, prompts



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=64, help="number of prompts")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=30)
    parser.add_argument("--model", choices=["auto", "organism", "random"], default="auto")
    parser.add_argument("--decode-loops", action="store_true",
                        help="time the eager and the static decode loop (both batched) instead")
    args = parser.parse_args()

    if args.model == "random":
        label, model, tokenizer, prompts = random_setup(args.prompts)
    else:
        try:
            label, model, tokenizer, prompts = organism_setup(args.prompts)
        except (ImportError, FileNotFoundError, ValueError) as err:
            if args.model == "organism":
                raise
            print(f"organism unavailable ({err}); falling back to a random-weight model")
            label, model, tokenizer, prompts = random_setup(args.prompts)

    cfg = GenerationConfig(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    generate(model, tokenizer, prompts[:2], cfg)  # warm-up
    if args.decode_loops:
        compare_decode_loops(label, model, tokenizer, prompts, cfg)
        return
    batched, wall_b, cpu_b = timed(lambda: generate(model, tokenizer, prompts, cfg))
    single, wall_s, cpu_s = timed(lambda: [generate(model, tokenizer, [p], cfg)[0] for p in prompts])

    n, n_tokens = len(prompts), sum(len(o.token_ids) for o in batched)
    same = sum(b.token_ids == s.token_ids for b, s in zip(batched, single))
    print(f"model: {label}; torch threads: {torch.get_num_threads()}")
    print(f"{n} prompts, mean prompt {sum(o.prompt_tokens for o in batched) / n:.0f} tokens, "
          f"mean reply {n_tokens / n:.1f} tokens; identical replies batched vs one-at-a-time: {same}/{n}")
    for name, wall, cpu in ((f"batched (batch {args.batch_size})", wall_b, cpu_b), ("one-at-a-time", wall_s, cpu_s)):
        print(f"{name:>20}: {n / wall:7.2f} prompts/s {n_tokens / wall:8.1f} tokens/s "
              f"(wall {wall:6.1f} s, CPU {cpu:6.1f} s)")
    print(f"speed-up: {wall_s / wall_b:.1f}x wall, {cpu_s / cpu_b:.1f}x CPU time")


def compare_decode_loops(label: str, model, tokenizer, prompts: list[str], cfg: GenerationConfig) -> None:
    """Eager vs static decoding (docs/generation.md), batched, same prompts: time and identical replies."""
    runs = {}
    for mode in ("eager", "static"):
        mode_cfg = GenerationConfig(**{**vars(cfg), "decode": mode})
        runs[mode] = timed(lambda: generate(model, tokenizer, prompts, mode_cfg))
    (eager, wall_e, cpu_e), (static, wall_s, cpu_s) = runs["eager"], runs["static"]
    n, n_tokens = len(prompts), sum(len(o.token_ids) for o in eager)
    same = sum(e.token_ids == s.token_ids and e.text == s.text for e, s in zip(eager, static))
    print(f"model: {label}; torch threads: {torch.get_num_threads()}; batch {cfg.batch_size}")
    print(f"{n} prompts, mean reply {n_tokens / n:.1f} tokens; identical replies eager vs static: {same}/{n}")
    for name, wall, cpu in (("eager", wall_e, cpu_e), ("static", wall_s, cpu_s)):
        print(f"{name:>8}: {n_tokens / wall:8.1f} tokens/s (wall {wall:6.1f} s, CPU {cpu:6.1f} s)")


if __name__ == "__main__":
    main()
