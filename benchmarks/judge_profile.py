"""Where one organism48 trial's judging goes: CPU seconds of `steer`, `localize` and `evaluate` of a finished
run's checkpoint, in-process at 1 thread with warm caches (a first checkpoint fills them, as a replica's
first request does), and the functions that take them.

    PYTHONPATH=. python benchmarks/judge_profile.py runs/<organism48 run> [--top 12]
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import time
from pathlib import Path

import torch

from actors.evaluator import Evaluator
from actors.steering import Steerer
from dfc_ray.spaces import load_spec

SHOWN = r"steering.py|evaluator.py|generation.py:\d+\((generate|_run_eager|_prefill)|interventions.py"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a finished organism48 run folder (local)")
    parser.add_argument("--top", type=int, default=12, help="functions shown per request")
    args = parser.parse_args()
    torch.set_num_threads(1)
    run = Path(args.run)
    spec = load_spec(str(run / "spec.yaml"))
    records = [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()]
    steered = [r["metrics"]["checkpoint"] for r in records
               if r["config"].get("a_exclusive", 0) > 0 and r["metrics"].get("checkpoint")][:2]
    if len(steered) < 2:
        raise SystemExit(f"{run}: {len(steered)} finished DFC trial(s) with a checkpoint; expected two (one fills "
                         "the caches, the other is profiled)")
    layer = spec.layers[0]
    steerer = Steerer(spec.pair, spec.steering)
    evaluator = Evaluator(spec.pair, spec.eval, shared=steerer)
    started = time.process_time()
    steerer.steer(steered[0], layer)
    evaluator.evaluate(steered[0], layer)
    print(f"first checkpoint (fills the caches): {time.process_time() - started:.1f} CPU-s")
    for name, request in (("steer", lambda: steerer.steer(steered[1], layer)),
                          ("localize", lambda: steerer.localize(steered[1], layer)),
                          ("evaluate", lambda: evaluator.evaluate(steered[1], layer))):
        profile, started = cProfile.Profile(), time.process_time()
        profile.enable()
        request()
        profile.disable()
        print(f"== {name}: {time.process_time() - started:.2f} CPU-s")
        pstats.Stats(profile).sort_stats("cumulative").print_stats(SHOWN, args.top)


if __name__ == "__main__":
    main()
