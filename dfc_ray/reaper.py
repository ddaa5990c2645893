"""Reap a local Ray cluster's processes when the driver that started it dies without shutting it down (kill -9).

Ray's GCS and raylet die with the driver that started them, but its agents (`ray::DashboardAgent`,
`ray::RuntimeEnvAgent`) and idle workers, which see the raylet gone at once, first spend 60 s trying to report
that to the dead GCS (Ray 2.60's `publish_error_to_driver` timeout) before they exit. `dfc_ray.cluster.connect`
starts this script beside every local cluster it starts: `python reaper.py ROOT_PID...` (the Ray processes the
driver started). Each second it notes the process tree under them; once its parent (the driver) is gone, it kills
what is left of that tree and exits; once the tree is gone (the driver shut the cluster down), it just exits.
Linux only (it reads /proc); elsewhere it exits at once. Standard library only: it runs as a plain script.
"""

from __future__ import annotations

import os
import signal
import sys
import time

POLL_S = 0.5
"""Seconds between looks at the driver and the Ray process tree."""


def processes() -> dict[int, tuple[int, str]]:
    """pid → (parent pid, start time in clock ticks) of every process in /proc."""
    table = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as handle:
                    fields = handle.read().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            table[int(name)] = (int(fields[1]), fields[19])  # stat fields 4 (ppid) and 22 (starttime)
    return table


def tree(table: dict[int, tuple[int, str]], roots: set[int]) -> set[tuple[int, str]]:
    """(pid, start time) of `roots` and all their descendants in `table`."""
    found, frontier = set(), {pid for pid in roots if pid in table}
    while frontier:
        found |= frontier
        frontier = {pid for pid, (parent, _) in table.items() if parent in frontier} - found
    return {(pid, table[pid][1]) for pid in found}


def watch(roots: set[int]) -> None:
    """Until the parent dies or the tree is gone: note the tree under `roots` (a process once seen stays noted while
    it lives: the agents outlive the raylet, their parent). Then kill every noted process still alive (the start
    time tells it from a process that reused its pid)."""
    driver, me = os.getppid(), os.getpid()
    noted: set[tuple[int, str]] = set()
    while os.getppid() == driver:
        table = processes()
        noted = {entry for entry in noted if table.get(entry[0], (0, ""))[1] == entry[1]}
        noted |= {entry for entry in tree(table, roots | {pid for pid, _ in noted}) if entry[0] != me}
        if not noted:  # the cluster ended (ray.shutdown): nothing left to guard
            return
        time.sleep(POLL_S)
    table = processes()
    for pid, started in noted:
        if table.get(pid, (0, ""))[1] == started:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


if __name__ == "__main__":
    if os.path.isdir("/proc"):
        watch({int(pid) for pid in sys.argv[1:]})
