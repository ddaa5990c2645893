"""The judges, the harvest and a training step on one device, and the costs file `--plan --costs` reads.

    PYTHONPATH=. python benchmarks/gpu_judges.py --out runs/gpu-check     # an H200: under 4 minutes
    PYTHONPATH=. python benchmarks/gpu_judges.py --toy --out /tmp/toy     # any CPU, toy shapes
    dfc-ray sweep --plan paper48 --costs runs/gpu-check/costs.json        # paper48 in device-hours

Models are random-weight Qwen2 models of Qwen2.5-3B's shape (36 blocks, d_model 2048, 16/2 heads, MLP
11008, vocabulary 151936, bf16; `--toy`: 4 blocks, d_model 64, fp32) fed organism tool prompts (about 370
tokens with the organism's tokenizer). Measured, each stage on its own (a failing stage is reported and
the others still run):

1. generation: greedy, 128 new tokens (toy: 16), batch 64 and 256 (toy: 8 and 16), a steering vector at
   every generated position (so the hook runs inside the captured decode step; every call a new vector),
   full prefill each call. tok/s = generated tokens / seconds of a call, median of 2 calls after a first
   one that also captures the CUDA graph ("capture" = first call minus that median). The eager loop once
   at the first batch size for comparison, and the judges' own path: a prefix cache and a vector at the
   last prompt token at the second batch size (one prompt token + the reply per prompt), which gives the
   judge rate of the costs file.
2. identical replies: the organism pair in the device dtype, static vs eager decoding, organism:test, 48
   new tokens, default stop strings: the share of replies (text and token ids) that are identical.
3. harvest in-process: A and B random, layer 13 (toy: 1), all_tokens, bf16 store, 512 organism tool
   prompts + 512 plain texts (toy: 32 + 32), batch 64, through `PairActivations.run_part` (forward, position
   selection, device-side encoding and the shard writes; corpus building and model loading excluded).
4. training: `dfc_ray.train.train_group` on random (1024, 2, 2048) batches, dict 16384, k 90 (toy: d_model
   64, dict 512, k 8, batch 256): seconds per step from a 40-step and a 10-step run (toy: 15 and 3), after a
   warm-up run.

Rates for the costs file are FLOP/s with the plan's FLOP model (dfc_ray/plan.py) of ONE whole device
(`per_device`). Writes OUT/gpu_judges.json (every figure) and OUT/costs.json; prints a table last. Needs
torch, transformers and pyarrow only (no ray, optuna or s3fs).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from dfc_ray.config import CorpusSpec, DFCConfig, GenerationConfig, HarvestConfig, TrainConfig
from dfc_ray.generation import (PrefixCache, add_at_last_prompt_token, decode_mode, generate, static_decode_stats)
from dfc_ray.harvest import PairActivations, build_corpus
from dfc_ray.interventions import add_hook
from dfc_ray.organism import load_pair
from dfc_ray.plan import ModelShape, Rates, train_flops
from dfc_ray.tooluse import load_tasks, render_prompt
from dfc_ray.train import Member, train_group

SHAPES = {
    "paper": dict(hidden_size=2048, num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2,
                  intermediate_size=11008, vocab_size=151936, tie_word_embeddings=True, rope_theta=1e6,
                  max_position_embeddings=32768),
    "toy": dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=128, vocab_size=2048, tie_word_embeddings=True),
}
SETTINGS = {  # batches, new tokens, harvest layer and corpus, training shape (batch, dict, k, steps)
    "paper": dict(batches=(64, 256), new=128, layer=13, n_tasks=512, n_plain=512, train=(1024, 16384, 90, 40)),
    "toy": dict(batches=(8, 16), new=16, layer=1, n_tasks=32, n_plain=32, train=(256, 512, 8, 15)),
}
TARGETS = {"gen_small": 10_000, "gen_large": 25_000, "identical": 0.99, "harvest": 60_000}
"""Issue 20's H200 targets (random 3B shape): tok/s at batch 64 and 256, share of identical replies, rows/s."""


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_model(shape: dict, dtype: torch.dtype, device: torch.device, seed: int) -> Qwen2ForCausalLM:
    """A random-weight Qwen2 made directly on the device in `dtype`."""
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            return Qwen2ForCausalLM(Qwen2Config(**shape)).eval()
    finally:
        torch.set_default_dtype(default)


def timed(device: torch.device, fn: Callable[[], object]) -> tuple[float, object]:
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def generation(model, tokenizer, prompts: list[str], batch: int, new: int, device: torch.device, seed: int,
               mode: str = "static", repeats: int = 2) -> dict:
    """tok/s of greedy generation with a new steering vector at generated positions on every call."""
    d_model = model.config.hidden_size
    gen = torch.Generator().manual_seed(seed)
    cfg = GenerationConfig(max_new_tokens=new, batch_size=batch, stop_strings=(), decode=mode)
    times, tokens = [], 0
    for _ in range(1 + (repeats if mode != "eager" else 0)):
        delta = torch.randn(d_model, generator=gen).to(device)
        hooks = {model.config.num_hidden_layers // 3: add_hook(delta, "generated")}
        seconds, outs = timed(device, lambda: generate(model, tokenizer, prompts[:batch], cfg, hooks))
        times.append(seconds)
        tokens = sum(len(o.token_ids) for o in outs)
    steady = statistics.median(times[1:]) if len(times) > 1 else times[0]
    return {"batch": batch, "mode": decode_mode(model, cfg), "tokens": tokens, "seconds": steady,
            "tok_s": tokens / steady, "first_call_s": times[0], "capture_s": times[0] - steady if len(times) > 1 else 0}


def judges_path(model, tokenizer, prompts: list[str], batch: int, new: int, device: torch.device,
                shape: ModelShape) -> dict:
    """The judges' per-trial generation: prompts' prefill from a prefix cache, a vector at the last prompt
    token (a new one per call), the reply decoded; its FLOP/s with the plan's model is the judge rate."""
    d_model = model.config.hidden_size
    cfg = GenerationConfig(max_new_tokens=new, batch_size=batch, stop_strings=())
    cache = PrefixCache(model)
    fill, _ = timed(device, lambda: generate(model, tokenizer, prompts[:batch], cfg, prefix_cache=cache))
    gen = torch.Generator().manual_seed(1)
    times, tokens = [], 0
    for _ in range(2):
        hooks = {model.config.num_hidden_layers // 3: add_at_last_prompt_token(torch.randn(d_model, generator=gen)
                                                                               .to(device))}
        seconds, outs = timed(device, lambda: generate(model, tokenizer, prompts[:batch], cfg, hooks, cache))
        times.append(seconds)
        tokens = sum(len(o.token_ids) for o in outs)
    steady = statistics.median(times)
    prompt = statistics.mean(o.prompt_tokens for o in outs)
    reply = tokens / len(outs)
    flops = len(outs) * (shape.forward_flops(shape.n_layers, prompt / 2)
                         + reply * shape.forward_flops(shape.n_layers, prompt + reply / 2, lm_head=True))
    return {"batch": batch, "tokens": tokens, "seconds": steady, "tok_s": tokens / steady, "fill_s": fill,
            "flops": flops, "flop_s": flops / steady, "prefix_hits": cache.hits}


def identical_replies(device: torch.device, dtype: torch.dtype, n_prompts: int) -> dict:
    """Share of identical replies, static vs eager decoding, on the organism pair in the device dtype."""
    model_a, model_b, tokenizer = load_pair()
    prompts = [render_prompt(tokenizer, task) for task in load_tasks("organism:test")[:n_prompts]]
    same = total = 0
    for model in (model_a, model_b):
        model.to(device, dtype)
        outs = {mode: generate(model, tokenizer, prompts, GenerationConfig(max_new_tokens=48, batch_size=64,
                                                                           decode=mode))
                for mode in ("eager", "static")}
        same += sum(a.token_ids == b.token_ids and a.text == b.text for a, b in zip(outs["eager"], outs["static"]))
        total += len(prompts)
    return {"identical": same / total, "replies": total, "dtype": str(dtype).removeprefix("torch.")}


def harvest_rate(model_a, model_b, tokenizer, settings: dict, device: torch.device, shape: ModelShape) -> dict:
    """Paired rows/s of the in-process harvest (forward to the layer, positions, encoding, shard writes)."""
    cfg = HarvestConfig(store="unused", layers=(settings["layer"],), positions="all_tokens", dtype="bfloat16",
                        batch_size=64, corpus=CorpusSpec(tasks="organism:train", n_tasks=settings["n_tasks"],
                                                         plain_text="organism", n_plain=settings["n_plain"]))
    records = build_corpus(cfg.corpus, tokenizer)
    groups = [records[i:i + cfg.batch_size] for i in range(0, len(records), cfg.batch_size)]
    extractor = PairActivations.of_models(cfg, model_a, model_b, tokenizer)
    with tempfile.TemporaryDirectory(prefix="gpu-judges-harvest-") as root:
        extractor.run_part(f"{root}/warm-up", 0, groups[:1])  # kernels, allocator, cuBLAS handles
        seconds, progress = timed(device, lambda: extractor.run_part(f"{root}/bench", 0, groups))
    rows = sum(progress["group_rows"])
    tokens = sum(len(r.prompt_ids) for r in records)
    flops = 2 * tokens * shape.forward_flops(settings["layer"] + 1, tokens / len(records) / 2)
    return {"rows": rows, "records": len(records), "tokens": tokens, "seconds": seconds, "rows_s": rows / seconds,
            "flops": flops, "flop_s": flops / seconds}


def train_rate(settings: dict, d_model: int, device: torch.device) -> dict:
    """Seconds per step of `train_group` with one member on random batches: (time of a long run − time of a
    short run) / the steps between, so set-up (crosscoder, normalization) cancels; a first short run warms
    the kernels up. No reliance on when the trainer reports its metrics."""
    batch, dict_size, k, steps = settings["train"]

    def batches():
        while True:
            yield torch.randn(batch, 2, d_model, device=device)

    def run(n: int) -> tuple[float, str]:
        member = Member("bench", DFCConfig(d_model=d_model, dict_size=dict_size, k=k, a_exclusive=0.05,
                                           b_exclusive=0.05),
                        TrainConfig(steps=n, device=device.type, norm_rows=batch, warmup_steps=0))
        seconds, (result,) = timed(device, lambda: train_group([member], batches()))
        return seconds, result.status

    short = max(2, steps // 4)
    run(short)
    (t_short, _), (t_long, status) = run(short), run(steps)
    seconds = (t_long - t_short) / (steps - short)
    return {"status": status, "batch": batch, "dict_size": dict_size, "k": k, "step_s": seconds,
            "tok_s": batch / seconds, "flop_s": train_flops(d_model, dict_size, batch, 1) / seconds}


def run_stage(results: dict, name: str, fn: Callable[..., dict], *args, **kwargs) -> None:
    start = time.perf_counter()
    try:
        results[name] = fn(*args, **kwargs)
    except Exception as err:  # a stage that fails is reported; the others still run
        traceback.print_exc()
        results[name] = {"error": f"{type(err).__name__}: {err}".splitlines()[0]}
    results[name]["stage_s"] = time.perf_counter() - start
    print(f"[{name}] {json.dumps(results[name], default=str)}", flush=True)


def table(results: dict, toy: bool) -> list[tuple[str, str, str]]:
    def get(stage: str, key: str, fmt: str) -> str:
        found = results.get(stage, {})
        if "error" in found:
            return "failed"
        return "-" if found.get(key) is None else format(found[key], fmt)

    def target(key: str, text: str) -> str:
        return "(toy)" if toy else text

    small, large = (f"gen_{b}" for b in SETTINGS["toy" if toy else "paper"]["batches"])
    return [
        (f"generation, batch {results.get(small, {}).get('batch', '?')}, hook in decode", get(small, "tok_s", ",.0f")
         + " tok/s", target("gen_small", f">= {TARGETS['gen_small']:,}")),
        (f"generation, batch {results.get(large, {}).get('batch', '?')}, hook in decode", get(large, "tok_s", ",.0f")
         + " tok/s", target("gen_large", f">= {TARGETS['gen_large']:,}")),
        ("graph capture (first call - steady call)", get(small, "capture_s", ".1f") + " s / "
         + get(large, "capture_s", ".1f") + " s", "once per replica and shape"),
        ("eager loop, same batch as the first row", get("eager", "tok_s", ",.0f") + " tok/s", "(reference)"),
        ("judges' path: prefix cache + last-token vector", get("judges", "tok_s", ",.0f") + " tok/s", "(costs: judge)"),
        ("identical replies, organism, static vs eager", get("identical", "identical", ".1%"),
         target("identical", ">= 99%")),
        ("harvest in-process, all_tokens, bf16 store", get("harvest", "rows_s", ",.0f") + " rows/s",
         target("harvest", f">= {TARGETS['harvest']:,}")),
        ("train step, train_group", get("train", "tok_s", ",.0f") + " rows/s ("
         + get("train", "step_s", ".4f") + " s/step)", "(costs: train)"),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--toy", action="store_true", help="toy shapes (a CPU run in a minute or two)")
    parser.add_argument("--out", default="runs/gpu-judges", help="folder for gpu_judges.json and costs.json")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    kind = "toy" if args.toy else "paper"
    settings, shape_cfg = SETTINGS[kind], SHAPES[kind]
    device = torch.device(args.device)
    dtype = torch.float32 if args.toy or device.type == "cpu" else torch.bfloat16
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"
    results: dict = {"device": name, "shape": kind, "dtype": str(dtype), "torch": torch.__version__}
    shape = ModelShape.from_config(Qwen2Config(**shape_cfg))
    _, _, tokenizer = load_pair()
    tasks = load_tasks("organism:train")[:max(settings["batches"])]
    prompts = [render_prompt(tokenizer, task) for task in tasks]

    models = [random_model(shape_cfg, dtype, device, seed=0)]
    small, large = settings["batches"]
    for batch in (small, large):
        run_stage(results, f"gen_{batch}", generation, models[0], tokenizer, prompts, batch, settings["new"], device,
                  seed=batch)
    run_stage(results, "eager", generation, models[0], tokenizer, prompts, small, settings["new"], device, seed=7,
              mode="eager")
    run_stage(results, "judges", judges_path, models[0], tokenizer, prompts, large, settings["new"], device, shape)
    results["static_decode"] = static_decode_stats(models[0])
    run_stage(results, "identical", identical_replies, device, dtype, 32 if args.toy else 200)
    models.append(random_model(shape_cfg, dtype, device, seed=1))
    run_stage(results, "harvest", harvest_rate, *models, tokenizer, settings, device, shape)
    models.clear()  # the pair's memory, before the crosscoder's
    if device.type == "cuda":
        torch.cuda.empty_cache()
    run_stage(results, "train", train_rate, settings, shape.d_model, device)

    rate = {stage: results.get(key, {}).get("flop_s") for stage, key in
            (("harvest", "harvest"), ("train", "train"), ("judge", "judges"))}
    costs = Rates(name, f"benchmarks/gpu_judges.py ({kind}: d_model {shape.d_model}, {shape.n_layers} blocks, random "
                  f"weights, {str(dtype).removeprefix('torch.')})", shape.d_model, rate["harvest"], rate["train"],
                  rate["judge"], per_device=True)
    (out / "costs.json").write_text(json.dumps(asdict(costs), indent=1) + "\n")
    results["total_s"] = time.perf_counter() - started
    (out / "gpu_judges.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    rows = table(results, args.toy)
    width = max(len(r[0]) for r in rows)
    print(f"\n{name}, {kind} shapes, {results['total_s']:.0f} s; {out / 'costs.json'} for --plan --costs")
    for what, value, target in rows:
        print(f"  {what:<{width}}  {value:<32} {target}")
    return 1 if any("error" in v for v in results.values() if isinstance(v, dict)) else 0


if __name__ == "__main__":
    sys.exit(main())
