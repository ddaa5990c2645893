"""First-contact self-checks of the fast paths, so a wrong GPU kernel cannot pass for a result.

The fast paths (dense and hybrid training, the Triton kernels, static+graph decoding) are checked in CI only
against their CPU twins. The first time a process uses one on a CUDA device, `first_contact` runs it side
by side with its reference path on a small input (the check lives beside the fast path: crosscoder.py,
kernels.py, generation.py). Outside tolerance the process falls back to the reference path for good, logs
one warning line and records the fallback: trials and judges copy `fallbacks()` into their results
(`fast_path_fallbacks`) and the report header names them. `dfc-ray doctor` runs every check at once.

This module is a leaf (torch and logging only), so every fast path's module can call it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable

import torch

FORCE_CPU = False
"""Check on CPU devices too (tests inject a wrong fast path this way; `dfc-ray doctor` sets it)."""

Check = Callable[[torch.device], tuple[float, float]]
"""A fast path's check: (error, tolerance) of the fast path against its reference on `device`."""


@dataclass(frozen=True)
class CheckResult:
    """One check's outcome in this process."""

    path: str
    """The fast path: train.dense, train.hybrid, kernels.triton, decode.static[:<model class>]."""
    device: str
    error: float
    """Largest relative deviation from the reference path (decode: share of differing token ids)."""
    tolerance: float
    detail: str = ""
    """Why the check itself failed (an exception's one line), else empty."""

    @property
    def ok(self) -> bool:
        return math.isfinite(self.error) and self.error <= self.tolerance

    def line(self) -> str:
        verdict = "ok" if self.ok else "FALLBACK to the reference path"
        return f"{self.path} on {self.device}: error {self.error:.3g} (tolerance {self.tolerance:.3g}) {verdict}" + \
            (f" — {self.detail}" if self.detail else "")


_RESULTS: dict[tuple[str, str], CheckResult | None] = {}
"""(path, device) → its result; None while the check runs (the fast path is what it exercises)."""


def first_contact(path: str, device: torch.device, check: Check) -> bool:
    """Whether `path` may run on `device`. Off CUDA (unless FORCE_CPU) there is nothing to check; otherwise the
    first call runs `check` and every later call returns its cached verdict."""
    if device.type != "cuda" and not FORCE_CPU:
        return True
    key = (path, str(device))
    if key in _RESULTS:
        result = _RESULTS[key]
        return result is None or result.ok
    _RESULTS[key] = None
    try:
        error, tolerance = check(device)
        result = CheckResult(path, str(device), float(error), float(tolerance))
    except Exception as err:  # noqa: BLE001 — a fast path that cannot even run falls back like a wrong one
        first_line = (str(err).splitlines() or [""])[0][:200]
        result = CheckResult(path, str(device), math.inf, 0.0, f"{type(err).__name__}: {first_line}")
    _RESULTS[key] = result
    if not result.ok:
        logging.getLogger("dfc_ray").warning(f"self-check: {result.line()}")
    return result.ok


def verdict(path: str, device: torch.device) -> bool | None:
    """Whether `path` passed its check on `device` in this process; None when it has not been checked."""
    result = _RESULTS.get((path, str(device)))
    return None if result is None else result.ok


def results() -> list[CheckResult]:
    """Every finished check of this process, in the order they ran."""
    return [r for r in _RESULTS.values() if r is not None]


def fallbacks() -> list[str]:
    """One line per fast path this process replaced by its reference (empty when all passed)."""
    return [r.line() for r in results() if not r.ok]


def reset() -> None:
    """Forget every verdict (tests; `dfc-ray doctor` re-checks)."""
    _RESULTS.clear()


def relative_error(fast: torch.Tensor, reference: torch.Tensor) -> float:
    """‖fast − reference‖ / ‖reference‖ in float64 (0 for two zero tensors; inf when shapes differ)."""
    if fast.shape != reference.shape:
        return math.inf
    fast, reference = fast.detach().double().cpu(), reference.detach().double().cpu()
    scale = reference.norm().item()
    diff = (fast - reference).norm().item()
    return diff / scale if scale > 0 else (0.0 if diff == 0 else math.inf)
