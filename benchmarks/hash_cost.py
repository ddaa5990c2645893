"""What the harvest cache key costs on a large weights file: `pair.file_sha256`, first call and cached.

Writes a safetensors file of `--gb` GB (bf16 tensors of 2 GB of random bits each) at `PATH` unless it exists,
points `DFC_RAY_CACHE` at an empty folder beside it, and times two calls (wall and CPU). For a cold first
call, drop the page cache between writing and hashing (as root: `sync; echo 3 > /proc/sys/vm/drop_caches`)
and run the script again on the same PATH.

    PYTHONPATH=. python benchmarks/hash_cost.py /tmp/h6/model.safetensors --gb 6
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import time
from pathlib import Path

TENSOR_ELEMENTS = 1_000_000_000
"""bf16 elements per tensor: 2 GB each."""


def write_weights(path: Path, gb: int) -> None:
    import torch
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(0)
    tensors = {f"model.layers.{i}.weight": torch.randint(-2**15, 2**15, (TENSOR_ELEMENTS,), dtype=torch.int16,
                                                         generator=generator).view(torch.bfloat16)
               for i in range(max(1, gb // 2))}
    started = time.time()
    save_file(tensors, str(path))
    print(f"wrote {path.stat().st_size / 1e9:.2f} GB in {time.time() - started:.1f} s")


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", type=Path)
    parser.add_argument("--gb", type=int, default=6, help="size of the file to write (GB, even)")
    args = parser.parse_args()
    if not args.path.exists():
        args.path.parent.mkdir(parents=True, exist_ok=True)
        write_weights(args.path, args.gb)
    cache = args.path.parent / "hash-cache"
    shutil.rmtree(cache, ignore_errors=True)
    os.environ["DFC_RAY_CACHE"] = str(cache)
    from dfc_ray.pair import file_sha256

    for label in ("first", "again"):
        wall, cpu = time.time(), cpu_seconds()
        digest = file_sha256(args.path)
        print(f"{label}: {time.time() - wall:.2f} s wall, {cpu_seconds() - cpu:.2f} s CPU, sha256 {digest[:16]}…")


if __name__ == "__main__":
    main()
