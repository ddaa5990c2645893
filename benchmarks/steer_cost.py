"""Per-trial cost of the steering protocol on the organism, before and after issue 11, same replica.

Each configuration first steers one checkpoint to fill the replica's caches (clean replies, prefill,
residuals, the reference run), then a second checkpoint, whose wall and CPU seconds are what a sweep
trial pays. "before": organism48's old settings (target A, activation α {2, 8}, 2 candidates by
Cohen's d); "after": its new settings (target B, residual-norm α {0.4, 0.8, 1.2}, top 1 of each of
three rankings, the reference direction).

    PYTHONPATH=. python benchmarks/steer_cost.py WARM_CKPT MEASURED_CKPT
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

from actors.steering import SteerConfig, Steerer
from dfc_ray.pair import PairSpec

COMMON = SteerConfig(n_dev=50, n_test=100, n_plain=50, min_set_pool=2, min_set_max=2, max_new_tokens=48, batch_size=50)
CONFIGS = {
    "before": replace(COMMON, top_n=2, scale="activation", alphas=(2.0, 8.0), targets=("a",), primary="a",
                      rankings=("cohens_d",)),
    "after": replace(COMMON, top_n=1, scale="residual_norm", alphas=(0.4, 0.8, 1.2), targets=("b",), primary="b"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("warm", help="checkpoint steered first (fills the caches)")
    parser.add_argument("measured", help="checkpoint whose steering is timed")
    parser.add_argument("--layer", type=int, default=1)
    args = parser.parse_args()
    steerer = Steerer(PairSpec(a="organism", b="organism"))
    for name, cfg in CONFIGS.items():
        steerer.steer(args.warm, args.layer, cfg)
        wall, cpu = time.perf_counter(), time.process_time()
        result = steerer.steer(args.measured, args.layer, cfg)
        print(f"{name}: {time.perf_counter() - wall:.1f} s wall, {time.process_time() - cpu:.1f} s CPU per trial; "
              f"steer_delta_pp {result.metrics()['steer_delta_pp']:+.1f}", flush=True)


if __name__ == "__main__":
    main()
