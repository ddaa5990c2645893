"""Evaluation throughput per replica, and the cost of a full eval + steer per trial.

    PYTHONPATH=. python benchmarks/eval_throughput.py [--tasks 64] [--n-dev 32] [--model auto|organism|random]
    PYTHONPATH=. python benchmarks/eval_throughput.py --spec organism48 [--threads 1]   # a sweep's judge settings

Runs in-process (one replica = one process hosting A and B). Uses the embedded organism pair when
`dfc_ray.organism` has one, else a random-weight Qwen2 pair (hidden 64, 4 layers) with a small
organism-style tokenizer; the crosscoder is trained for a few hundred steps on the pair's own
activations. Prints wall and CPU seconds (CPU time stays meaningful on a shared machine):
- clean generation prompts/s (paid once per replica and task set: the cache);
- one trial's `evaluate` (splice into A and B + splice loss) with the clean cache warm;
- one trial's `steer` (ranking, α grid on dev, test + controls, minimal set), first with the
  steerer's caches cold, then again warm — what every later trial of a sweep pays.
With `--spec`, the pair, layer and eval/steering settings are the spec's.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from actors.evaluator import Evaluator
from actors.steering import SteerConfig, Steerer
from dfc_ray.crosscoder import DedicatedFeatureCrosscoder, DFCConfig
from dfc_ray.evaluate import EvalConfig
from dfc_ray.interventions import prompt_activations
from dfc_ray.pair import PairSpec, load_pair
from timing import timed


def random_pair(root: Path) -> PairSpec:
    """A random-weight Qwen2 pair (A ≠ B) and a tokenizer trained on the organism's texts."""
    from dfc_ray.organism import world
    from dfc_ray.organism.tokenizer import template_only, train_tokenizer
    from dfc_ray.tooluse import render_prompt

    texts = world.plain_text(400, 1) + [render_prompt(template_only(), t) for t in world.load_split("dev")]
    tokenizer = train_tokenizer(texts, vocab_size=1000)
    tokenizer.save_pretrained(root / "tokenizer")
    for seed, name in ((1, "a"), (2, "b")):
        torch.manual_seed(seed)
        config = Qwen2Config(hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=len(tokenizer), tie_word_embeddings=True,
                             initializer_range=0.2)
        Qwen2ForCausalLM(config).save_pretrained(root / name)
    return PairSpec(a=str(root / "a"), b=str(root / "b"), tokenizer=str(root / "tokenizer"))


def quick_checkpoint(pair: PairSpec, layer: int, out: Path, steps: int = 300) -> Path:
    """A DFC (dict 8·d_model, 10% A-exclusive) fitted briefly on every token of some organism texts."""
    from dfc_ray.organism import world
    from dfc_ray.tooluse import render_prompt

    model_a, model_b, tok = load_pair(pair)
    texts = world.plain_text(64, 7) + [render_prompt(tok, t) for t in world.load_split("train")[:64]]
    x = torch.stack([torch.cat(prompt_activations(m, tok, texts, layer)) for m in (model_a, model_b)], 1).float()
    d = x.shape[-1]
    cc = DedicatedFeatureCrosscoder(DFCConfig(d_model=d, dict_size=8 * d, k=16, a_exclusive=0.1, b_exclusive=0.1))
    cc.fit_normalization(x)
    opt = torch.optim.Adam(cc.parameters(), lr=2e-3)
    for _ in range(steps):
        loss = cc.loss(x[torch.randint(len(x), (512,))])["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    cc.save(out)
    return out



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["auto", "organism", "random"], default="auto")
    parser.add_argument("--tasks", type=int, default=64, help="test tasks scored per evaluation")
    parser.add_argument("--n-dev", type=int, default=32, help="dev tasks for ranking and the α grid")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--layer", type=int, default=1)
    parser.add_argument("--spec", default=None,
                        help="take pair, layer, eval and steering settings from this sweep spec")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (a judge replica of 0.5 CPU has 1)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    tmp = Path(tempfile.mkdtemp(prefix="dfc-eval-bench-"))
    pair, label = PairSpec(), "embedded organism pair"
    if args.model != "random":
        try:
            load_pair(pair)
        except (FileNotFoundError, OSError, ValueError) as err:
            if args.model == "organism":
                raise
            print(f"organism unavailable ({type(err).__name__}); using a random-weight pair")
            pair = None
    if args.model == "random" or pair is None:
        pair, label = random_pair(tmp / "pair"), "random-weight Qwen2 pair (hidden 64, 4 layers, vocab 1000)"
    eval_cfg = EvalConfig(n_tasks=args.tasks, n_texts=32, max_new_tokens=args.max_new_tokens)
    steer_cfg = SteerConfig(n_dev=args.n_dev, n_test=args.tasks, n_plain=args.n_dev, top_n=3,
                            alphas=(1.0, 2.0, 4.0, 8.0), max_new_tokens=args.max_new_tokens)
    if args.spec:
        from dfc_ray.spaces import load_spec

        spec = load_spec(args.spec)
        pair, label, args.layer = spec.pair, f"{spec.name}'s pair", spec.layers[0]
        eval_cfg, steer_cfg = spec.eval, spec.steering
    checkpoint = str(quick_checkpoint(pair, args.layer, tmp / "dfc"))

    evaluator = Evaluator(pair, eval_cfg)
    _, wall_c, cpu_c = timed(lambda: evaluator.clean_scores(eval_cfg))
    _, wall_e0, cpu_e0 = timed(lambda: evaluator.evaluate(checkpoint, args.layer))  # fills the residual cache
    result, wall_e, cpu_e = timed(lambda: evaluator.evaluate(checkpoint, args.layer))
    steerer = Steerer(pair, steer_cfg)
    _, wall_s0, cpu_s0 = timed(lambda: steerer.steer(checkpoint, args.layer))
    steered, wall_s, cpu_s = timed(lambda: steerer.steer(checkpoint, args.layer))
    n_eval = len(evaluator.clean_scores(eval_cfg)[0]["a"])

    print(f"pair: {label}; torch threads: {torch.get_num_threads()}; layer {args.layer}; {n_eval} test tasks, "
          f"{steer_cfg.n_dev} dev tasks, max_new_tokens {eval_cfg.max_new_tokens}")
    print(f"clean generation (A and B, {2 * n_eval} prompts, prefill cached): {2 * n_eval / wall_c:6.1f} prompts/s "
          f"(wall {wall_c:6.1f} s, CPU {cpu_c:6.1f} s)")
    print(f"evaluate one checkpoint (A and B spliced, {2 * n_eval} prompts + splice loss): "
          f"first wall {wall_e0:6.1f} s, CPU {cpu_e0:6.1f} s; warm wall {wall_e:6.1f} s, CPU {cpu_e:6.1f} s; "
          f"{2 * n_eval / wall_e:5.1f} spliced prompts/s")
    print(f"steer one checkpoint ({len(steer_cfg.targets)} target(s)): caches cold wall {wall_s0:6.1f} s, "
          f"CPU {cpu_s0:6.1f} s; warm wall {wall_s:6.1f} s, CPU {cpu_s:6.1f} s")
    print(f"per trial, caches warm (eval + steer): wall {wall_e + wall_s:6.1f} s, CPU {cpu_e + cpu_s:6.1f} s")
    m = {**result.metrics(), **steered.metrics()}
    print("metrics:", {k: (round(v, 3) if isinstance(v, float) else v) for k, v in m.items()
                       if k in ("a_clean", "a_splice", "delta_a_pp", "b_clean", "b_splice", "delta_b_pp",
                                "steer_feature", "steer_alpha", "steer_delta_pp", "steer_min_set")})


if __name__ == "__main__":
    main()
