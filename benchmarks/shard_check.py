"""What checking a reused store's shards costs, against one read pass of the same store.

Writes `--rows` rows of 2×`--d-model` fp16 as parquet shards (16384 rows each, the real default) to a
temp folder, then times, best of `--repeats` on a warm page cache (what a trial sees after the
harvest wrote or another trial read the store):

- structure only: manifest, sizes, each shard's footer and row count (`validate_store(checksum=False)`);
- full crc32 of every shard (what `validate_store` does once per process and manifest);
- footer + sampled pages: crc of the last 64 KiB and of `--samples` random 64 KiB ranges per shard
  (the cheaper alternative; it would need new manifest fields and misses most local damage);
- one read pass: `iter_layer_batches` over every row → float32 torch (the least a trial reads: one epoch).

Also prints how often the sampled check would catch 400 zeroed bytes in one shard.

    PYTHONPATH=. nice -n 15 python benchmarks/shard_check.py --rows 100000 --d-model 1024
"""

from __future__ import annotations

import argparse
import tempfile
import time
import zlib
from typing import Callable

import numpy as np
from rich.console import Console
from rich.table import Table

from dfc_ray import store

SAMPLE = 64 << 10


def best_seconds(run: Callable[[], object], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def sampled_check(uri: str, layer: int, samples: int, seed: int = 0) -> None:
    """crc32 of each shard's footer and of `samples` random ranges (read, not compared: cost only)."""
    where = store._Layer.at(uri, layer)
    rng = np.random.default_rng(seed)
    for rec in store.read_manifest(uri, layer).shards:
        with where.fs.open_input_file(f"{where.path}/{rec['file']}") as f:
            offsets = [max(0, rec["bytes"] - SAMPLE)] + list(rng.integers(0, rec["bytes"] - SAMPLE, samples))
            for offset in offsets:
                zlib.crc32(f.read_at(SAMPLE, int(offset)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--d-model", type=int, default=1024)
    parser.add_argument("--samples", type=int, default=16, help="random 64 KiB ranges per shard (sampled check)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        spec = store.StoreSpec(layer=0, d_model=args.d_model, models=("a", "b"), positions="last_prompt_token",
                               harvest_hash="bench")
        rng = np.random.default_rng(0)
        with store.ShardWriter(root, spec) as writer:
            for start in range(0, args.rows, 8192):
                writer.append(rng.standard_normal((min(8192, args.rows - start), 2, args.d_model), np.float32))
        manifest = store.read_manifest(root, 0)
        size = sum(s["bytes"] for s in manifest.shards)

        def full_crc() -> None:
            store._VERIFIED.clear()
            store.validate_store(root, 0)

        def read_pass() -> None:
            for _ in store.iter_layer_batches(root, 0, 4096):
                pass

        read_pass()  # warm the page cache
        rows = [("structure only (sizes, footers, rows)",
                 best_seconds(lambda: store.validate_store(root, 0, checksum=False), args.repeats)),
                ("full crc32 of every shard", best_seconds(full_crc, args.repeats)),
                (f"footer + {args.samples} sampled 64 KiB ranges per shard",
                 best_seconds(lambda: sampled_check(root, 0, args.samples), args.repeats)),
                ("one read pass (iter_layer_batches → float32)", best_seconds(read_pass, args.repeats))]
        table = Table(title=f"{args.rows} rows × 2 × {args.d_model} fp16: {len(manifest.shards)} shards, "
                            f"{size / 2**20:.0f} MiB")
        for column in ("check", "seconds", "MiB/s", "× one read pass"):
            table.add_column(column, justify="right")
        for name, seconds in rows:
            table.add_row(name, f"{seconds:.3f}", f"{size / 2**20 / seconds:.0f}", f"{seconds / rows[-1][1]:.2f}")
        Console().print(table)
        shard_bytes = manifest.shards[0]["bytes"]
        caught = 1 - (1 - (SAMPLE + 400) / shard_bytes) ** args.samples
        print(f"sampled check: catches 400 zeroed bytes in a {shard_bytes / 2**20:.0f} MiB shard with "
              f"probability {caught:.1%}; the full crc32 always does")


if __name__ == "__main__":
    main()
