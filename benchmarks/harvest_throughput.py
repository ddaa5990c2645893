"""Harvest throughput: paired rows/s through both models into the store.

    PYTHONPATH=. python benchmarks/harvest_throughput.py [--tasks 200] [--plain 500] [--ray --actors 2]

On the embedded organism by default (CPU). `--model-a/--model-b` take folders or hub ids (e.g. a
random-weight Qwen2.5-3B-shaped pair on a GPU machine). With `--ray` the harvest runs on a local Ray
cluster (`--cpus` CPUs) with `--actors` harvest actors, each writing its own parts' shards.
"""

from __future__ import annotations

import argparse
import resource
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
    parser.add_argument("--dtype", default="float16", help="stored dtype")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--shard-rows", type=int, default=16384,
                        help="rows per shard (a part holds 8 shards' worth of tokens: smaller shards, more parts)")
    parser.add_argument("--model-a", default="organism")
    parser.add_argument("--model-b", default="organism")
    parser.add_argument("--ray", action="store_true", help="through the Ray Data actor pool (else in-process)")
    parser.add_argument("--actors", type=int, default=1, help="harvest actors with --ray")
    parser.add_argument("--cpus", type=int, default=None, help="CPUs of the local Ray cluster (default: all)")
    args = parser.parse_args()

    if args.ray:
        import ray

        ray.init(num_cpus=args.cpus, include_dashboard=False)
    cfg = HarvestConfig(store=tempfile.mkdtemp(prefix="dfc-harvest-bench-"), layers=tuple(args.layers),
                        positions=args.positions, batch_size=args.batch_size, dtype=args.dtype,
                        shard_rows=args.shard_rows,
                        num_actors=args.actors, pair=PairSpec(a=args.model_a, b=args.model_b),
                        corpus=CorpusSpec(n_tasks=args.tasks, n_plain=args.plain))
    start, cpu = time.perf_counter(), _cpu_seconds()
    result = harvest(cfg, use_ray=args.ray, progress=False)
    seconds, cpu = time.perf_counter() - start, _cpu_seconds() - cpu
    where = f"ray, {args.actors} actor(s)" if args.ray else "in-process"
    print(f"harvest ({where}): {result.rows} paired rows ({args.positions}, layers {list(result.layers)}, "
          f"d_model {result.d_model}, {args.dtype} store) in {seconds:.1f} s = {result.rows / seconds:,.0f} rows/s "
          f"(corpus building, model loading and store writes included)"
          + ("" if args.ray else f"; {cpu:.1f} CPU-s = {result.rows / cpu:,.0f} rows per CPU-second"))


def _cpu_seconds() -> float:
    """User + system CPU time of this process (all its threads): less sensitive to a shared machine than wall time."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


if __name__ == "__main__":
    main()
