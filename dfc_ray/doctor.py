"""`dfc-ray doctor`: the machine, which path each stage takes on it, and every fast path's self-check.

Runs without Ray (`python -m dfc_ray.doctor` on a device image that has none). On CUDA the checks are the
first-contact checks a sweep would run (dfc_ray/selfcheck.py); on a CPU they run against the same references
(forced), so a laptop sees the table a GPU node would print. The Triton kernels are checked on CPU only through
Triton's interpreter (TRITON_INTERPRET=1), else they are reported as not used there.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
from dataclasses import dataclass

import torch

from dfc_ray import kernels, selfcheck
from dfc_ray.config import GenerationConfig
from dfc_ray.crosscoder import resolve_formulation
from dfc_ray.generation import decode_mode, generate
from dfc_ray.preflight import resolve_device


@dataclass(frozen=True)
class Row:
    """One line of the doctor's table."""

    what: str
    value: str
    ok: bool = True


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine(device: torch.device) -> list[Row]:
    """Python, the libraries a sweep uses, and the device."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        where = f"{props.name}, {props.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}"
    else:
        where = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} " \
                "torch threads"
    rows = [Row("python", sys.version.split()[0]), Row("device", f"{device} ({where})")]
    return rows + [Row(package, _version(package)) for package in ("torch", "triton", "transformers", "ray")]


def checks(device: torch.device) -> list[Row]:
    """Which path each stage takes on `device`, after running every fast path's self-check there (the decode
    check on the embedded organism's A)."""
    # deferred: the organism package loads transformers
    from dfc_ray.organism import load_pair

    selfcheck.reset()
    forced, selfcheck.FORCE_CPU = selfcheck.FORCE_CPU, True
    try:
        dense, _ = resolve_formulation("auto", device)
        for name in ("dense", "hybrid"):
            resolve_formulation(name, device)
        kernels_checked = device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
        if kernels_checked:
            kernels.active(torch.empty(0, device=device))
        model, _, tokenizer = load_pair(device=str(device))
        generate(model, tokenizer, ["hello"], GenerationConfig(max_new_tokens=4, decode="static"))
        mode = decode_mode(model, GenerationConfig())
        if selfcheck.verdict(f"decode.static:{type(model).__name__}", device) is False:
            mode = "eager (static decoding failed its self-check)"
    finally:
        selfcheck.FORCE_CPU = forced
    rows = [Row("training formulation (auto)", "dense" if dense else "sparse"),
            Row("decoding (auto)", mode), Row("harvest threads per worker", "harvest.cpu_threads (default 1)")]
    rows += [Row(f"check {r.path}", r.line().split(": ", 1)[1], r.ok) for r in selfcheck.results()]
    if not kernels_checked:
        rows.append(Row("check kernels.triton", "not used on CPU (set TRITON_INTERPRET=1 to check them here)"))
    return rows


def report(device: torch.device) -> list[Row]:
    """The whole table: machine, then stages and checks."""
    return machine(device) + checks(device)


def device_named(name: str) -> torch.device:
    """`--device`'s value as a device this machine has (preflight's one-line error otherwise)."""
    return torch.device(resolve_device(name, "--device"))


def main() -> int:
    """Print the table as plain lines (the device image has no Ray; rich is not needed either)."""
    rows = report(device_named("auto"))
    width = max(len(r.what) for r in rows)
    for row in rows:
        print(f"{row.what:<{width}}  {row.value}")
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
