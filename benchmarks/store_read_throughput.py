"""Read throughput of the activation store: raw pyarrow vs the Ray Data path vs the plain iterator.

Writes `--rows` rows of 2×`--d-model` fp16 into parquet shards in a temp folder, then reads them back
every way the trainer can and prints rows/s of wall time and rows per CPU-second of all our processes
(best of `--repeats`: the machine may be shared).
Targets (docs/store.md): Ray Data within 1.5× of raw pyarrow, ≥ 300k rows/s of 2×256 fp16 on 2 CPUs.

    PYTHONPATH=. nice -n 15 python benchmarks/store_read_throughput.py
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from typing import Callable, Iterable

import numpy as np
import pyarrow.parquet as pq
from rich.console import Console
from rich.table import Table

from dfc_ray.store import (
    ShardWriter, StoreSpec, to_tensor, acts_to_numpy, iter_layer_batches, iter_ray_batches, layer_dataset,
    layer_dir, read_manifest,
)


def cpu_seconds() -> float:
    """CPU seconds used so far by this process and its live descendants (Ray's raylet, workers, ...);
    read from Linux /proc."""
    parent, used = {}, {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parent[int(entry)], used[int(entry)] = int(fields[1]), int(fields[11]) + int(fields[12])
    ours, frontier = set(), [os.getpid()]
    while frontier:
        pid = frontier.pop()
        ours.add(pid)
        frontier += [child for child, ppid in parent.items() if ppid == pid and child not in ours]
    return sum(used.get(pid, 0) for pid in ours) / os.sysconf("SC_CLK_TCK")


def best_rate(read: Callable[[], Iterable], rows: int, repeats: int) -> tuple[float, float]:
    """Best rows/s of wall time and of CPU time (all our processes) over `repeats` full passes.

    On a shared machine wall time also measures the neighbours; rows per CPU-second measures what a
    path itself costs. Every pass must yield every row."""
    best_wall = best_cpu = 0.0
    for _ in range(repeats):
        start, cpu, seen = time.perf_counter(), cpu_seconds(), 0
        for batch in read():
            seen += len(batch)
        if seen != rows:
            raise RuntimeError(f"read {seen} rows, expected {rows}")
        best_wall = max(best_wall, rows / (time.perf_counter() - start))
        best_cpu = max(best_cpu, rows / max(cpu_seconds() - cpu, 1e-9))
    return best_wall, best_cpu


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=400_000)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--shard-rows", type=int, default=16384)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--shuffle-buffer", type=int, default=16384, help="rows in Ray's local shuffle buffer")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--num-cpus", type=int, default=2)
    p.add_argument("--prefetch", type=int, default=2, help="prefetch_batches for Ray iteration")
    p.add_argument("--blocks", type=int, default=None, help="override_num_blocks for the Ray read")
    p.add_argument("--compression", default="none")
    p.add_argument("--dir", default=None, help="store folder to write or re-use (default: a new temp folder)")
    args = p.parse_args()
    console = Console()
    root = args.dir or tempfile.mkdtemp(prefix="dfc-store-bench-")
    spec = StoreSpec(layer=0, d_model=args.d_model, models=("A", "B"), positions="bench", harvest_hash="bench",
                     shard_rows=args.shard_rows, compression=args.compression)
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    with ShardWriter(root, spec) as writer:  # resumes (or re-uses) a store already in --dir
        done = writer.rows_done
        writer.skip(done)
        for i in range(done, args.rows, 10_000):
            writer.append(rng.standard_normal((min(10_000, args.rows - i), 2, args.d_model), dtype=np.float32))
    if done < args.rows:
        console.print(f"write incl. statistics: {(args.rows - done) / (time.perf_counter() - start):,.0f} rows/s")
    manifest = read_manifest(root, 0)
    paths = [f"{root}/{layer_dir(0)}/{s['file']}" for s in manifest.shards]
    mib = sum(s["bytes"] for s in manifest.shards) / 2**20
    console.print(f"{args.rows} rows × 2 × {args.d_model} fp16 in {len(paths)} parquet shards ({mib:.0f} MiB, "
                  f"compression={args.compression}) in {root}")

    def raw_numpy():
        for path in paths:
            yield acts_to_numpy(pq.read_table(path).column("acts"), args.d_model, "float16")

    def raw_torch():
        for rows in raw_numpy():
            yield to_tensor(rows, "float16")

    def measure(cases: dict) -> None:
        for name, read in cases.items():
            rates[name] = best_rate(read, args.rows, args.repeats)
            console.print(f"{name}: {rates[name][0]:,.0f} rows/s, {rates[name][1]:,.0f} rows/CPU-s")

    rates: dict[str, tuple[float, float]] = {}
    measure({  # before Ray starts: its processes would share the CPUs
        "raw pyarrow read_table → fp16 numpy": raw_numpy,
        "raw pyarrow → float32 torch": raw_torch,
        "plain iter_layer_batches → float32 torch": lambda: iter_layer_batches(root, 0, args.batch),
    })

    import ray

    ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    common = {"epochs": 1, "prefetch_batches": args.prefetch, "override_num_blocks": args.blocks}

    def ray_arrow():
        ds = layer_dataset(root, 0, shuffle=True, override_num_blocks=args.blocks)
        for batch in ds.iter_batches(batch_size=args.batch, batch_format="pyarrow", prefetch_batches=args.prefetch):
            yield acts_to_numpy(batch.column("acts"), args.d_model, "float16")

    measure({
        "Ray iter_batches (pyarrow) → fp16 numpy": ray_arrow,
        "Ray iter_torch_batches → float32 torch": lambda: iter_ray_batches(root, 0, args.batch, **common),
        f"  + local shuffle buffer {args.shuffle_buffer}": lambda: iter_ray_batches(
            root, 0, args.batch, local_shuffle_buffer_size=args.shuffle_buffer, **common),
    })
    ray.shutdown()

    raw = rates["raw pyarrow read_table → fp16 numpy"]
    table = Table(title=f"store read throughput, best of {args.repeats}, batch {args.batch}, {args.num_cpus} CPUs")
    for column in ("path", "rows/s (wall)", "MiB/s", "raw / this", "rows per CPU-s", "raw / this"):
        table.add_column(column, justify="left" if column == "path" else "right")
    for name, (wall, cpu) in rates.items():
        table.add_row(name, f"{wall:,.0f}", f"{wall * 4 * args.d_model / 2**20:,.0f}", f"{raw[0] / wall:.2f}×",
                      f"{cpu:,.0f}", f"{raw[1] / cpu:.2f}×")
    console.print(table)

if __name__ == "__main__":
    main()
