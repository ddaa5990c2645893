"""The prepared GPU benchmark of the training step runs end to end on CPU at toy shapes (so it cannot
rot between the sessions that have a GPU), and its figures are positive and finite."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_training_benchmark_runs_at_toy_shapes(tmp_path):
    out = tmp_path / "train.json"
    cmd = [sys.executable, "benchmarks/train_throughput.py", "--table", "--toy", "--device", "cpu", "--dtype", "fp32",
           "--steps", "1", "--repeats", "1", "--warmup", "1", "--group", "1,2", "--group-steps", "2",
           "--group-batch", "64", "--recovery-steps", "30", "--threads", "1", "--json", str(out)]
    run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                         env=os.environ | {"PYTHONPATH": str(REPO)})
    assert run.returncode == 0, run.stderr[-2000:]
    figures = json.loads(out.read_text())
    assert len(figures["shapes"]) == 4 and [g["members"] for g in figures["group"]] == [1, 2]
    for row in figures["shapes"]:
        for name in ("sparse", "dense", "reference"):
            assert 0 < row[name] < math.inf, (row, name)
    assert all(g["one_process"] > 0 and g["separate_processes"] > 0 for g in figures["group"])
    recovery = figures["recovery"]
    assert [(r["device"], r["formulation"]) for r in recovery][:2] == [("cpu", "sparse"), ("cpu", "sparse")]
    assert all(r["status"] == "ok" and 0 < r["shared"] <= 1 for r in recovery)
    assert "dfc-ray dense" in run.stdout and "seed-style dense loop" in run.stdout and "N=2" in run.stdout
