"""The judges with and without drafts (docs/generation.md, "Drafts"): CPU seconds of `steer`, `localize` and
`evaluate` over the first checkpoints of a finished organism48 run, in-process at one thread, once with the clean
replies as drafts (what the replicas do) and once with the drafts dropped, and whether every result is the same.

    PYTHONPATH=. python benchmarks/judge_drafts.py runs/<organism48 run> [--checkpoints 5]

The first checkpoint fills the caches (clean replies, prefix caches, the reference) and is not counted, as a
replica's first request. Each setting runs in a fresh process, so neither warms the other's caches.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import torch

from timing import timed


def judge(run: Path, n: int, drafts: bool) -> tuple[dict[str, float], list[str]]:
    """(CPU-s per request kind over checkpoints 2..n, each result as JSON without its timings)."""
    from actors.evaluator import Evaluator
    from actors.steering import Steerer
    from dfc_ray import interventions
    from dfc_ray.spaces import load_spec

    if not drafts:  # the replicas' calls, with the drafts dropped on their way to generate
        plain = interventions.generate

        def without_drafts(model, tokenizer, prompts, cfg=None, hooks=None, prefix_cache=None, drafts=None):
            return plain(model, tokenizer, prompts, cfg, hooks, prefix_cache)

        interventions.generate = without_drafts
    torch.set_num_threads(1)
    spec = load_spec(str(run / "spec.yaml"))
    records = [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()]
    checkpoints = [r["metrics"]["checkpoint"] for r in records if r["metrics"].get("checkpoint")][:n]
    if len(checkpoints) < 2:
        raise SystemExit(f"{run}: {len(checkpoints)} checkpoint(s); expected at least two (one fills the caches)")
    layer = spec.layers[0]
    steerer, evaluator = Steerer(spec.pair, spec.steering), Evaluator(spec.pair, spec.eval)
    cpu = {"steer": 0.0, "localize": 0.0, "evaluate": 0.0}
    results = []
    for i, checkpoint in enumerate(checkpoints):
        for name, request in (("steer", steerer.steer), ("localize", steerer.localize),
                              ("evaluate", evaluator.evaluate)):
            result, _, seconds = timed(lambda: request(checkpoint, layer))
            cpu[name] += seconds if i else 0.0
            fields = dataclasses.asdict(result)
            fields.pop("seconds", None)
            results.append(json.dumps(fields, sort_keys=True, default=str))
    return cpu, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a finished organism48 run folder (local)")
    parser.add_argument("--checkpoints", type=int, default=5, help="checkpoints judged (the first warms the caches)")
    parser.add_argument("--setting", choices=["drafts", "none"], help=argparse.SUPPRESS)  # one child process
    args = parser.parse_args()
    if args.setting:
        cpu, results = judge(Path(args.run), args.checkpoints, args.setting == "drafts")
        print(json.dumps({"cpu": cpu, "results": results}))
        return
    out = {}
    for setting in ("none", "drafts"):
        child = subprocess.run([sys.executable, __file__, args.run, "--checkpoints", str(args.checkpoints),
                                "--setting", setting], capture_output=True, text=True, check=True)
        out[setting] = json.loads(child.stdout.splitlines()[-1])
        print(f"{setting:>6}: " + ", ".join(f"{k} {v:.2f}" for k, v in out[setting]["cpu"].items())
              + f" CPU-s over {args.checkpoints - 1} checkpoints")
    print(f"same results: {out['none']['results'] == out['drafts']['results']}")


if __name__ == "__main__":
    main()
