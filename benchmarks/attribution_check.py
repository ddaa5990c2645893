"""An independent check of a sweep's difference attribution (diff_n50, diff_share_a_exclusive).

Recomputes, for every trial of a run that reported them, the number of features carrying 50% of the
feature terms and the A-exclusive share, from the trial's checkpoint and the pair alone, with separate
and deliberately plain code: one prompt at a time through `transformers` (hidden_states, no hooks, no
padding, no caches), the checkpoint's dense decoder and normalization tensors, float64 numpy. Only the
crosscoder's own `encode` is shared with the sweep (the codes are the crosscoder's definition).

    PYTHONPATH=. python benchmarks/attribution_check.py runs/<organism48 run>

Prints one row per trial and exits 1 when any trial disagrees beyond the tolerance (n50 ± 1, share ± 0.05).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from dfc_ray.crosscoder import DedicatedFeatureCrosscoder
from dfc_ray.pair import load_pair
from dfc_ray.spaces import load_spec
from dfc_ray.tooluse import load_tasks, render_prompt


def last_token_residuals(model, tokenizer, prompts: list[str], layer: int) -> np.ndarray:
    """Residual after block `layer` (hidden_states[layer + 1]) at each prompt's last token, one prompt at a time."""
    rows = []
    with torch.inference_mode():
        for prompt in prompts:
            ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
            hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[layer + 1]
            rows.append(hidden[0, -1].double().numpy())
    return np.stack(rows)


def n50_and_share(checkpoint: str, x_a: np.ndarray, x_b: np.ndarray) -> tuple[int, float]:
    """(fewest features whose terms reach half their sum, the A-exclusive features' share of the sum)."""
    cc = DedicatedFeatureCrosscoder.load(checkpoint).eval()
    with torch.inference_mode():
        codes = cc.encode(torch.tensor(np.stack([x_a, x_b], axis=1), dtype=torch.float32)).double().numpy()
    scale = cc.norm_scale.detach().double().numpy()  # raw decoder row = normalized row / the model's scale
    dec = cc.W_dec.detach().double().numpy()  # (dict_size, 2, d_model)
    direction = dec[:, 0] / scale[0] - dec[:, 1] / scale[1]
    v = (x_a - x_b).mean(0)
    terms = codes.mean(0) * (direction @ (v / np.linalg.norm(v)))
    total = terms.sum()
    if total <= 0:
        return -1, 0.0
    running = np.cumsum(np.sort(terms)[::-1])
    n50 = int(np.argmax(running >= 0.5 * total)) + 1
    n_a = cc.cfg.n_a_exclusive  # the A-exclusive features are the first n_A
    return n50, float(terms[:n_a].sum() / total)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a sweep's run folder (results.jsonl, spec.yaml, checkpoints)")
    parser.add_argument("--n50-tolerance", type=int, default=1)
    parser.add_argument("--share-tolerance", type=float, default=0.05)
    args = parser.parse_args()
    run = Path(args.run)
    spec = load_spec(str(run / "spec.yaml"))
    cfg = spec.steering
    model_a, model_b, tokenizer = load_pair(spec.pair)
    dev = load_tasks(cfg.dev_tasks)
    dev = dev[:cfg.n_dev] if cfg.n_dev else dev
    prompts = [render_prompt(tokenizer, t) for t in dev if t.ground_truth]
    records = [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines() if line.strip()]
    trials = [r for r in records if r["status"] == "ok" and "diff_n50" in r["metrics"]]
    residuals: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    failures = 0
    print(f"{len(trials)} trials, {len(prompts)} dev tool prompts")
    print(f"{'trial':>10} {'layer':>5}  {'n50 sweep':>9} {'n50 here':>8}  {'A-excl sweep':>12} {'A-excl here':>11}  ok")
    for r in trials:
        layer = int(r["config"]["layer"])
        if layer not in residuals:
            residuals[layer] = tuple(last_token_residuals(m, tokenizer, prompts, layer) for m in (model_a, model_b))
        n50, share = n50_and_share(r["metrics"]["checkpoint"], *residuals[layer])
        m = r["metrics"]
        ok = abs(n50 - m["diff_n50"]) <= args.n50_tolerance and \
            abs(share - m["diff_share_a_exclusive"]) <= args.share_tolerance
        failures += not ok
        print(f"{r['trial_id']:>10} {layer:>5}  {m['diff_n50']:>9} {n50:>8}  {m['diff_share_a_exclusive']:>+12.3f} "
              f"{share:>+11.3f}  {'yes' if ok else 'NO'}")
    print(f"{len(trials) - failures} of {len(trials)} agree (n50 within ±{args.n50_tolerance}, "
          f"A-exclusive share within {args.share_tolerance})")
    return 1 if failures or not trials else 0


if __name__ == "__main__":
    sys.exit(main())
