"""How much of the machine a command leaves idle, and whether two threads here add up to two cores.

    python benchmarks/idle_share.py -- dfc-ray sweep organism48 --run-dir runs/idle --quiet
    python benchmarks/idle_share.py --cores

The first form runs the command and reads /proc/stat once a second: the share of all cores' time that was
idle (idle + iowait) over the whole run, then the run in 30 s windows (one number each), so a phase where a
core waits shows where it is. `--cores` times 40 single-threaded 2048² float32 matmuls alone, then two such
threads at once: the ratio says what a second busy core adds on this machine (2.0 would be a full core).
Linux only.
"""

from __future__ import annotations

import argparse
import subprocess
import threading
import time

WINDOW_S = 30


def _stat() -> tuple[int, int]:
    """(all jiffies, idle + iowait jiffies) of the machine."""
    with open("/proc/stat") as handle:
        values = [int(v) for v in handle.readline().split()[1:]]
    return sum(values), values[3] + values[4]


def idle_share(command: list[str]) -> None:
    proc = subprocess.Popen(command)
    samples, last = [], _stat()
    while proc.poll() is None:
        time.sleep(1)
        now = _stat()
        samples.append((now[0] - last[0], now[1] - last[1]))
        last = now
    total, idle = (sum(s[i] for s in samples) for i in (0, 1))
    windows = [samples[i:i + WINDOW_S] for i in range(0, len(samples), WINDOW_S)]
    shares = [100 * sum(s[1] for s in w) / max(sum(s[0] for s in w), 1) for w in windows]
    print(f"exit {proc.returncode}, {len(samples)} s: {100 * idle / max(total, 1):.1f} % idle; per {WINDOW_S} s: "
          + " ".join(f"{share:.0f}" for share in shares))


def core_scaling(n: int = 40) -> None:
    import torch  # deferred: the first form needs no torch

    torch.set_num_threads(1)

    def products() -> None:
        a = torch.randn(2048, 2048)
        for _ in range(n):
            a @ a

    start = time.perf_counter()
    products()
    alone = time.perf_counter() - start
    threads = [threading.Thread(target=products) for _ in range(2)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    both = time.perf_counter() - start
    print(f"{n} matmuls alone {alone:.2f} s, twice that in two threads {both:.2f} s: two busy cores give "
          f"{2 * alone / both:.2f}× one")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cores", action="store_true", help="time one against two single-threaded workers")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command to run (after --)")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if args.cores:
        core_scaling()
    elif command:
        idle_share(command)
    else:
        parser.error("expected --cores or a command after --")


if __name__ == "__main__":
    main()
