"""Harvest throughput: paired tokens/s through both models into the store.

    PYTHONPATH=. python benchmarks/harvest_throughput.py [--tasks 200] [--plain 500] [--ray]

On the embedded organism by default (CPU). `--model-a/--model-b` take folders or hub ids (e.g. a
random-weight Qwen2.5-3B-shaped pair on a GPU machine).
"""

from __future__ import annotations

import argparse
import tempfile
import time

from dfc_ray.harvest import CorpusSpec, HarvestConfig, harvest
from dfc_ray.pair import PairSpec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=200, help="tool prompts (organism:train)")
    parser.add_argument("--plain", type=int, default=500, help="plain texts")
    parser.add_argument("--layers", type=int, nargs="+", default=[1])
    parser.add_argument("--positions", default="all_tokens")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--model-a", default="organism")
    parser.add_argument("--model-b", default="organism")
    parser.add_argument("--ray", action="store_true", help="through the Ray Data actor pool (else in-process)")
    args = parser.parse_args()

    if args.ray:
        from dfc_ray.cluster import connect

        connect()
    cfg = HarvestConfig(store=tempfile.mkdtemp(prefix="dfc-harvest-bench-"), layers=tuple(args.layers),
                        positions=args.positions, batch_size=args.batch_size,
                        pair=PairSpec(a=args.model_a, b=args.model_b),
                        corpus=CorpusSpec(n_tasks=args.tasks, n_plain=args.plain))
    start = time.perf_counter()
    result = harvest(cfg, use_ray=args.ray, progress=False)
    seconds = time.perf_counter() - start
    print(f"harvest ({'ray actor pool' if args.ray else 'in-process'}): {result.rows} paired rows "
          f"({args.positions}, layers {list(result.layers)}, d_model {result.d_model}) in {seconds:.1f} s "
          f"= {result.rows / seconds:,.0f} paired tokens/s (corpus building and store writes included)")


if __name__ == "__main__":
    main()
