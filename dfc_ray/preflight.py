"""Checks before allocating or computing: is there memory for a crosscoder, does the named device exist,
are a checkpoint's weights finite. Each refuses with one line instead of an allocator traceback minutes in,
or a judged checkpoint whose numbers mean nothing."""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from dfc_ray.config import DEVICE_NAMES, DEVICE_PATTERN, DFCConfig

FLOAT32_BYTES = 4
INT64_BYTES = 8


def crosscoder_bytes(cfg: DFCConfig) -> int:
    """Bytes a `DedicatedFeatureCrosscoder` of `cfg` holds in float32: encoder and decoder blocks (d_model
    wide per exclusive feature, 2·d_model per shared one), biases, normalization and dead-feature counters."""
    d, n_exclusive = cfg.d_model, cfg.n_a_exclusive + cfg.n_b_exclusive
    weights = 2 * (d * n_exclusive + 2 * d * cfg.n_shared)  # encoder + decoder
    floats = weights + cfg.dict_size + 2 * d + 2 * d + 2 + 1  # b_enc, b_dec, norm_mean, norm_scale, threshold
    return floats * FLOAT32_BYTES + cfg.dict_size * INT64_BYTES


TRAINING_COPIES = 4
"""Copies of the crosscoder's weights training holds: the weights, their gradients and Adam's two moments."""


def training_bytes(cfg: DFCConfig, batch_size: int) -> int:
    """Bytes training a crosscoder of `cfg` needs: `TRAINING_COPIES` of it plus one batch's inputs,
    reconstructions and pre-activations (float32); an estimate to refuse what no machine holds."""
    return TRAINING_COPIES * crosscoder_bytes(cfg) + FLOAT32_BYTES * batch_size * (4 * cfg.d_model + 3 * cfg.dict_size)


def _cgroup_free() -> int | None:
    """Bytes left under this process's cgroup memory limit (v2, then v1), None without a limit."""
    for limit_file, usage_file in (("memory.max", "memory.current"),
                                   ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes")):
        try:
            limit = Path("/sys/fs/cgroup", limit_file).read_text().strip()
            usage = Path("/sys/fs/cgroup", usage_file).read_text().strip()
        except OSError:
            continue
        if limit.isdigit() and usage.isdigit() and int(limit) < 1 << 60:  # v1 writes a huge number for "none"
            return max(0, int(limit) - int(usage))
    return None


def free_memory_bytes() -> int | None:
    """Host memory this process can still allocate: the kernel's MemAvailable, lowered by a cgroup limit;
    None where neither can be read (then nothing is refused)."""
    free = None
    try:
        match = re.search(r"^MemAvailable:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.MULTILINE)
        free = int(match.group(1)) * 1024 if match else None
    except OSError:
        pass
    if free is None and hasattr(os, "sysconf") and "SC_AVPHYS_PAGES" in os.sysconf_names:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    known = [value for value in (free, _cgroup_free()) if value is not None]
    return min(known) if known else None


def human_bytes(n: int) -> str:
    """`n` bytes as TB, GB or MB (one decimal), or plain bytes below 1 MB."""
    for unit, factor in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if n >= factor:
            return f"{n / factor:.1f} {unit}"
    return f"{n:,} bytes"


def check_crosscoder_fits(cfg: DFCConfig) -> None:
    """ValueError (one line, both sizes) when a crosscoder of `cfg` would not fit in the free host memory;
    the module is built on the CPU before it moves anywhere, so host memory is the first limit it meets."""
    needed, free = crosscoder_bytes(cfg), free_memory_bytes()
    if free is not None and needed > free:
        raise ValueError(f"crosscoder dict_size={cfg.dict_size}, d_model={cfg.d_model}: needs {human_bytes(needed)} "
                         f"({needed:,} bytes, float32) but {human_bytes(free)} ({free:,} bytes) of memory is free; "
                         "expected a smaller dict_size")


def resolve_device(name: str, what: str = "device") -> str:
    """The torch device `name` means here ("auto": cuda when available, else cpu); ValueError (one line)
    for a name dfc-ray does not know or a device this torch build or machine lacks."""
    if not re.fullmatch(DEVICE_PATTERN, name):
        raise ValueError(f"{what} {name!r}: expected {DEVICE_NAMES}")
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            build = "a CPU-only torch build" if torch.version.cuda is None else "no visible CUDA device"
            raise ValueError(f"{what} {name!r}: this machine has {build} (torch {torch.__version__}); "
                             "expected 'cpu' or 'auto'")
        index = int(name.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise ValueError(f"{what} {name!r}: only {torch.cuda.device_count()} CUDA device(s) visible; "
                             f"expected cuda:0 … cuda:{torch.cuda.device_count() - 1}")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{what} 'mps': not available on this machine; expected 'cpu' or 'auto'")
    return name


def check_finite_weights(tensors: dict[str, torch.Tensor], where: str) -> None:
    """ValueError (one line naming the first tensor) when a floating-point tensor holds NaN or ±inf: a
    checkpoint like that splices garbage into the pair, and judging it would report numbers about nothing."""
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise ValueError(f"{where}: tensor {name!r} holds {bad:,} NaN/inf value(s) of {tensor.numel():,}; "
                             "expected finite weights (a diverged or damaged checkpoint)")
