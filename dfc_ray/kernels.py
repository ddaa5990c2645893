"""The sparse formulation's two primitives on CUDA, as Triton kernels.

Every sparse pass of a crosscoder step on the GPU is one of two shapes (docs/crosscoder.md, "Two
formulations"):

- `segment_sum`: out[s] = Σ_{t in segment s} w[t]·Y[idx[t]] — the decoder forward (segments = rows,
  Y = the decoder block) and every weight gradient (segments = features, Y = x or the reconstruction's
  gradient, which at a real batch fits in L2 in bf16);
- `gathered_dots`: out[t] = ⟨A[a_idx[t]], B[b_idx[t]]⟩ — the gradient of the active codes.

An index < 0 marks an entry that is absent (a feature of another partition): it is neither loaded nor
counted. The kernels gather BLOCK_T rows at a time in BLOCK_D-wide tiles, accumulate in fp32 and write the
output in its own dtype, so an fp32 weight gradient needs no extra cast. On CPU the crosscoder uses
`embedding_bag` instead (fast there); `TRITON_INTERPRET=1` runs these same kernels on CPU tensors, which is
how CI checks them against that path (tests/test_kernels.py). Triton is imported when a kernel first runs.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor

from dfc_ray import selfcheck


FORCE = False
"""Run the kernels on CPU tensors too (tests set it, with TRITON_INTERPRET=1)."""


def active(t: Tensor) -> bool:
    """Whether the crosscoder's sparse passes over `t` use these kernels: on CUDA, or when forced, unless their
    first-contact check on `t`'s device failed (selfcheck: then the torch path of the CPU runs there too)."""
    return (t.is_cuda or FORCE) and selfcheck.first_contact("kernels.triton", t.device, kernel_error)


def kernel_error(device: torch.device) -> tuple[float, float]:
    """(error, tolerance) of both kernels against torch on `device`, with absent (< 0) entries (selfcheck's check)."""
    gen = torch.Generator().manual_seed(0)
    n_seg, n_rows, width, n = 37, 50, 200, 300
    keys = torch.randint(0, n_seg, (n,), generator=gen).sort().values
    idx = torch.randint(-1, n_rows, (n,), generator=gen)
    w, y = torch.randn(n, generator=gen), torch.randn(n_rows, width, generator=gen)
    keep = (idx >= 0).float()
    reference = torch.zeros(n_seg, width).index_add_(0, keys, (w * keep)[:, None] * y[idx.clamp(min=0)])
    on = [t.to(device) for t in (keys, idx, w, y)]
    summed = segment_sum(segment_offsets(on[0], n_seg), on[1], on[2], on[3], torch.float32)
    a_idx, b_idx = torch.randint(0, n_rows, (n,), generator=gen), idx
    dots_reference = (y[a_idx] * y[b_idx.clamp(min=0)]).sum(1) * keep
    dots = gathered_dots(a_idx.to(device), b_idx.to(device), on[3], on[3])
    return max(selfcheck.relative_error(summed, reference), selfcheck.relative_error(dots, dots_reference)), 1e-4


def segment_offsets(sorted_keys: Tensor, n_segments: int) -> Tensor:
    """Start of each segment of `sorted_keys` (ascending; keys ≥ n_segments fall after the last segment)
    plus the end, shape (n_segments + 1,), computed on the device (bincount reads its size back)."""
    bounds = torch.arange(n_segments + 1, device=sorted_keys.device, dtype=sorted_keys.dtype)
    return torch.searchsorted(sorted_keys, bounds)


def segment_sum(offsets: Tensor, idx: Tensor, w: Tensor, y: Tensor, out_dtype: torch.dtype) -> Tensor:
    """(len(offsets) - 1, y.shape[1]): row s is Σ_{t in [offsets[s], offsets[s+1]), idx[t] ≥ 0} w[t]·y[idx[t]]."""
    n_seg, width = len(offsets) - 1, y.shape[1]
    out = torch.empty(n_seg, width, device=y.device, dtype=out_dtype)
    if n_seg and width:
        k = _kernels()
        grid = (n_seg, -(-width // k["BLOCK_D"]))
        k["segment_sum"][grid](offsets, idx, w.float().contiguous(), y, out, width, y.stride(0), out.stride(0),
                               BLOCK_T=k["BLOCK_T"], BLOCK_D=k["BLOCK_D"])
    return out


def gathered_dots(a_idx: Tensor, b_idx: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """(len(a_idx),) fp32: ⟨a[a_idx[t]], b[b_idx[t]]⟩, 0 where b_idx[t] < 0."""
    n, width = len(a_idx), a.shape[1]
    out = torch.empty(n, device=a.device, dtype=torch.float32)
    if n:
        k = _kernels()
        grid = (-(-n // k["BLOCK_T"]),)
        k["gathered_dots"][grid](a_idx, b_idx, a, b, out, n, width, a.stride(0), b.stride(0),
                                 BLOCK_T=k["BLOCK_T"], BLOCK_D=k["BLOCK_D"])
    return out


@functools.cache
def _kernels() -> dict[str, Any]:
    from dfc_ray import triton_kernels  # deferred: imports triton, which only the CUDA path (or a test) needs

    return {"segment_sum": triton_kernels.segment_sum_kernel, "gathered_dots": triton_kernels.gathered_dots_kernel,
            "BLOCK_T": triton_kernels.BLOCK_T, "BLOCK_D": triton_kernels.BLOCK_D}
