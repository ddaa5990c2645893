"""The Triton kernels behind `dfc_ray.kernels` (imported only when one first runs: this module needs triton).

BLOCK_T gathered rows (or entries) per step, BLOCK_D columns per tile: 16 × 128 elements, 4 KB of bf16
per tile, every row read in 256-byte runs. First guesses, not tuned on a GPU yet (docs/BENCHMARKS.md)."""

from __future__ import annotations

import triton
import triton.language as tl

BLOCK_T = 16
BLOCK_D = 128

@triton.jit
def segment_sum_kernel(offsets_ptr, idx_ptr, w_ptr, y_ptr, out_ptr, width, y_stride, out_stride,
                       BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    seg = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < width
    start = tl.load(offsets_ptr + seg)
    end = tl.load(offsets_ptr + seg + 1)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for t0 in range(start, end, BLOCK_T):  # BLOCK_T gathered rows in flight at once
        ts = t0 + tl.arange(0, BLOCK_T)
        rows = tl.load(idx_ptr + ts, mask=ts < end, other=-1)
        ok = rows >= 0
        w = tl.load(w_ptr + ts, mask=ok, other=0.0)
        tile = tl.load(y_ptr + rows[:, None] * y_stride + cols[None, :], mask=ok[:, None] & col_ok[None, :],
                       other=0.0)
        acc += tl.sum(tile.to(tl.float32) * w[:, None], axis=0)
    row = seg.to(tl.int64) * out_stride  # int64: no overflow past 2³¹ output elements
    tl.store(out_ptr + row + cols, acc.to(out_ptr.dtype.element_ty), mask=col_ok)

@triton.jit
def gathered_dots_kernel(a_idx_ptr, b_idx_ptr, a_ptr, b_ptr, out_ptr, n, width, a_stride, b_stride,
                         BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    ts = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    in_range = ts < n
    bi = tl.load(b_idx_ptr + ts, mask=in_range, other=-1)
    ok = bi >= 0
    ai = tl.load(a_idx_ptr + ts, mask=ok, other=0)
    acc = tl.zeros([BLOCK_T], dtype=tl.float32)
    for c0 in range(0, width, BLOCK_D):
        cols = c0 + tl.arange(0, BLOCK_D)
        both = ok[:, None] & (cols < width)[None, :]
        x = tl.load(a_ptr + ai[:, None] * a_stride + cols[None, :], mask=both, other=0.0)
        y = tl.load(b_ptr + bi[:, None] * b_stride + cols[None, :], mask=both, other=0.0)
        acc += tl.sum(x.to(tl.float32) * y.to(tl.float32), axis=1)
    tl.store(out_ptr + ts, acc, mask=in_range)  # 0 for absent entries
