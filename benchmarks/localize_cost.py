"""CPU seconds per trial of `steer` and of each part of `localize` (attribution, curve, ablation in B, patch in
A), one warm in-process steerer with the spec's steering settings, on a run's checkpoints.

    PYTHONPATH=. python benchmarks/localize_cost.py runs/<organism48 run> [--spec organism48] [--trials 3]

Process CPU time on one thread, so the figures hold on a busy machine too (wall clock would not). The
first checkpoint warms the replica's caches (clean replies, the reference's runs, prefixes) and is not shown.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from actors.steering import Steerer
from dfc_ray.spaces import load_spec


def cpu_seconds(call) -> float:
    started = time.process_time()
    call()
    return time.process_time() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a sweep's run folder with DFC checkpoints")
    parser.add_argument("--spec", default="organism48")
    parser.add_argument("--trials", type=int, default=3, help="checkpoints measured after the warm-up one")
    args = parser.parse_args()
    torch.set_num_threads(1)
    spec = load_spec(args.spec)
    cfg = replace(spec.steering, localize_when={})
    records = [json.loads(line) for line in (Path(args.run) / "results.jsonl").read_text().splitlines() if line]
    dfcs = [r for r in records if r["status"] == "ok" and r["config"].get("a_exclusive", 0) > 0]
    steerer = Steerer(spec.pair, cfg)
    warm = dfcs[0]["metrics"]["checkpoint"]
    steerer.steer(warm, 1)
    steerer.localize(warm, 1, cfg)
    parts = {"attribution": (), "curve": ("curve",), "ablate_b": ("ablate_b",), "patch_a": ("patch_a",)}
    print(f"{'trial':>10} {'dict':>5} {'k':>3} {'steer':>6} " + " ".join(f"{p:>11}" for p in parts))
    for r in dfcs[1:1 + args.trials]:
        checkpoint, layer = r["metrics"]["checkpoint"], int(r["config"]["layer"])
        seconds = [cpu_seconds(lambda: steerer.steer(checkpoint, layer))]
        seconds += [cpu_seconds(lambda tests=tests: steerer.localize(checkpoint, layer, replace(cfg, localize=tests)))
                    for tests in parts.values()]
        print(f"{r['trial_id']:>10} {r['config']['dict_size']:>5} {r['config']['k']:>3} "
              + " ".join(f"{s:>{6 if i == 0 else 11}.1f}" for i, s in enumerate(seconds)))


if __name__ == "__main__":
    main()
