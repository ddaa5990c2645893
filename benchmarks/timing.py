"""The benchmarks' one timing helper (import as `from timing import timed`: scripts run from benchmarks/)."""

from __future__ import annotations

import time
from typing import Any, Callable


def timed(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    """(result, wall seconds, CPU seconds of this process): CPU time stays meaningful on a shared machine."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu
