"""CPU seconds of whole process trees, told apart by an environment label: for comparing two sweeps'
work on a shared machine, where wall clock says more about the neighbours than about the sweep.

Every process whose environment holds DFC_AB=<label> (Ray's raylet, workers and actors inherit the
driver's environment) is sampled once a second; the sum of each process's last seen user + system time
is written per label to OUT as JSON, until OUT.stop exists.

    python benchmarks/cpu_by_label.py runs/ab_cpu.json &
    DFC_AB=before PYTHONPATH=<old checkout> dfc-ray sweep organism48 --run-dir runs/before &
    DFC_AB=after  PYTHONPATH=. dfc-ray sweep organism48 --run-dir runs/after
    touch runs/ab_cpu.json.stop

A process that lives less than a second is missed, and the last second of each process is not counted.
"""

from __future__ import annotations

import json
import os
import sys
import time

LABEL = b"DFC_AB="


def sample(seen: dict[int, tuple[str, float]], ticks: int) -> None:
    """Update `seen` (pid → (label, CPU seconds so far)) from /proc."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                label = next((e[len(LABEL):].decode() for e in f.read().split(b"\0") if e.startswith(LABEL)), None)
            if label is None:
                continue
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
            seen[int(pid)] = (label, (int(fields[11]) + int(fields[12])) / ticks)  # utime + stime
        except (OSError, IndexError, ValueError):  # gone meanwhile, or not ours to read
            continue


def main() -> None:
    out = sys.argv[1]
    ticks = os.sysconf("SC_CLK_TCK")
    seen: dict[int, tuple[str, float]] = {}
    while not os.path.exists(out + ".stop"):
        sample(seen, ticks)
        totals: dict[str, float] = {}
        for label, cpu in seen.values():
            totals[label] = totals.get(label, 0.0) + cpu
        with open(out, "w") as f:
            json.dump({"time": time.strftime("%T"), "cpu_seconds": totals, "processes": len(seen)}, f)
        time.sleep(1)


if __name__ == "__main__":
    main()
