"""Harvest throughput: paired rows/s through both models into the store.

    PYTHONPATH=. python benchmarks/harvest_throughput.py [--tasks 200] [--plain 500] [--actors 2] [--ray]
    PYTHONPATH=. python benchmarks/harvest_throughput.py --writer-d-model 2048 --dtype bfloat16   # the writer alone

On the embedded organism by default (CPU). `--model-a/--model-b` take folders or hub ids (e.g. a
random-weight Qwen2.5-3B-shaped pair on a GPU machine). With `--ray` the harvest runs on a local Ray
cluster (`--cpus` CPUs) with `--actors` harvest actors, each writing its own parts' shards; without, the
process computes groups in `--actors` threads (harvest.executor: local).
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
    parser.add_argument("--actors", type=int, default=1, help="harvest actors (--ray), else threads")
    parser.add_argument("--cpus", type=int, default=None, help="CPUs of the local Ray cluster (default: all)")
    parser.add_argument("--writer-d-model", type=int, default=0,
                        help="time only the store writer: 65,536 random float32 rows of this width")
    args = parser.parse_args()

    if args.writer_d_model:
        time_writer(args.writer_d_model, args.dtype)
        return
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
    where = f"ray, {args.actors} actor(s)" if args.ray else f"in-process, {args.actors} thread(s)"
    print(f"harvest ({where}): {result.rows} paired rows ({args.positions}, layers {list(result.layers)}, "
          f"d_model {result.d_model}, {args.dtype} store) in {seconds:.1f} s = {result.rows / seconds:,.0f} rows/s "
          f"(corpus building, model loading and store writes included)"
          + ("" if args.ray else f"; {cpu:.1f} CPU-s = {result.rows / cpu:,.0f} rows per CPU-second"))


def time_writer(d_model: int, dtype: str, rows: int = 65536, block: int = 8192) -> None:
    """The store's share of a harvest: cast, statistics, parquet encoding, crc32 and atomic writes."""
    import torch

    from dfc_ray.store import ShardWriter, StoreSpec

    x = torch.randn(block, 2, d_model, generator=torch.Generator().manual_seed(0))
    spec = StoreSpec(layer=13, d_model=d_model, models=("a", "b"), positions="all_tokens", harvest_hash="bench",
                     dtype=dtype)
    with tempfile.TemporaryDirectory(prefix="dfc-writer-bench-") as root:
        start, cpu = time.perf_counter(), _cpu_seconds()
        with ShardWriter(root, spec) as writer:
            for _ in range(rows // block):
                writer.append(x)
        seconds, cpu = time.perf_counter() - start, _cpu_seconds() - cpu
    print(f"store writer: {rows} rows of 2 x {d_model} float32 → {dtype} parquet in {seconds:.1f} s "
          f"({rows / seconds:,.0f} rows/s); {cpu:.1f} CPU-s = {rows / cpu:,.0f} rows per CPU-second")


def _cpu_seconds() -> float:
    """User + system CPU time of this process (all its threads): less sensitive to a shared machine than wall time."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


if __name__ == "__main__":
    main()
