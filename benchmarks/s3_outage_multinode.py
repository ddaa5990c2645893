"""S3 unavailable for ~20 s in the middle of a multi-node sweep job: does the job ride through, or fail
with one line and finish on `--resume`, and is everything written before the outage kept?

On the loopback cluster of tests/multinode.py (head + two workers, moto S3), it submits the
`cluster-smoke` sweep as a Ray job with `--storage s3://…`, freezes the S3 server (SIGSTOP) for
--outage seconds once the first trial has finished, lets it go (SIGCONT), waits for the job and, if
the job did not succeed, resubmits it with `--resume`. Then it checks that every grid point is in
results.jsonl exactly once with status ok and that the records written before the outage are
unchanged, and prints the timings and which path happened. Exit status 0 when every check held.

    PYTHONPATH=. timeout 900 python benchmarks/s3_outage_multinode.py [--outage 20]

Takes a few minutes (docs/BENCHMARKS.md has a measured run); not part of the test suite, whose
multi-node test already takes most of CI's budget.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from dfc_ray.fs import RunFolder  # noqa: E402
from multinode import LocalCluster, wait_for  # noqa: E402  (the harness lives with the tests)
from test_multinode import GRID, job_logs, job_status, results, submit  # noqa: E402  (its job helpers)

DONE = ("SUCCEEDED", "FAILED", "STOPPED")


def wait_job(cluster: LocalCluster, job_id: str, timeout: float = 600) -> tuple[str, float]:
    """The job's final status and the seconds waited for it."""
    clock = time.perf_counter()
    wait_for(f"job {job_id} finished", lambda: job_status(cluster, job_id) in DONE, timeout=timeout, every=3)
    return job_status(cluster, job_id), time.perf_counter() - clock


def what_the_user_saw(logs: str) -> str:
    """The job's error line(s) (`dfc-ray sweep: error: …`), and the exception each traceback in the
    job's log ends with (its first line naming an error after `Traceback`)."""
    lines = logs.splitlines()
    errors = [line for line in lines if line.startswith("dfc-ray ")]
    ends = []
    for start, line in enumerate(lines):
        if "Traceback (most recent call last)" in line:
            ends.append(next((later.strip()[:200] for later in lines[start + 1:]
                              if re.search(r"\w(Error|Exception|Timeout)\w*:", later) and 'File "' not in later),
                             "(no exception line)"))
    return f"error lines {errors or 'none'}; {len(ends)} traceback(s) in the job log{': ' if ends else ''}" + \
        " | ".join(ends)


def save_logs(cluster: LocalCluster, job_id: str, out: Path) -> str:
    """The job's whole log, written to `out` (for reading what the summary line names)."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{job_id}.log"
    logs = job_logs(cluster, job_id)
    path.write_text(logs)
    print(f"job log: {path}", flush=True)
    return logs


def check(run: str, before: dict[str, dict]) -> list[str]:
    """What is wrong with the run's results.jsonl now (empty: every grid point once and ok, and the
    records written before the outage unchanged)."""
    final = results(run)
    problems = []
    points = [(r["config"]["k"], r["config"]["variant"]) for r in final]
    if sorted(points) != sorted(GRID):
        problems.append(f"grid points {sorted(points)}; expected each of {sorted(GRID)} once")
    problems += [f"trial {r['trial_id']} {r['config']['k']}/{r['config']['variant']} is {r['status']}: "
                 f"{r.get('error', '')}" for r in final if r["status"] != "ok"]
    by_id = {r["trial_id"]: r for r in final}
    problems += [f"trial {trial_id} written before the outage is {'changed' if trial_id in by_id else 'gone'}"
                 for trial_id, record in before.items() if by_id.get(trial_id) != record]
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--outage", type=float, default=20, help="seconds the S3 server is frozen (default 20)")
    parser.add_argument("--logs", type=Path, default=REPO / "runs" / f"s3-outage-{time.strftime('%Y%m%d-%H%M%S')}",
                        help="folder for the jobs' logs (default runs/s3-outage-<time>)")
    args = parser.parse_args()
    clock = time.perf_counter()
    cluster = LocalCluster(workers=2, worker_cpus=3)  # what tests/test_multinode.py runs cluster-smoke on
    try:
        cluster.up()
        os.environ.update(cluster.client_env())  # this process reads S3 and the Jobs API as a client
        print(f"cluster up: {time.perf_counter() - clock:.0f} s", flush=True)
        run = f"{cluster.create_bucket(f'dfc-outage-{uuid.uuid4().hex[:8]}')}/runs/smoke"

        submitted = time.perf_counter()
        first = submit(cluster, run)
        wait_for("first finished trial", lambda: results(run) or job_status(cluster, first) in DONE,
                 timeout=600, every=2)
        before = {r["trial_id"]: r for r in results(run)}
        if not before:
            print(f"the job ended before any trial finished:\n{job_logs(cluster, first)[-3000:]}")
            return 1
        print(f"first trial finished {time.perf_counter() - submitted:.0f} s after submission "
              f"({len(before)} recorded)", flush=True)

        cluster.pause_s3()
        paused = time.perf_counter()
        time.sleep(args.outage)
        cluster.resume_s3()
        print(f"S3 frozen for {time.perf_counter() - paused:.1f} s", flush=True)

        status, waited = wait_job(cluster, first)
        saw = what_the_user_saw(save_logs(cluster, first, args.logs))
        print(f"job {status} {waited:.0f} s after S3 came back; {saw}", flush=True)
        path = "rode through"
        if status != "SUCCEEDED":
            path = "failed, then --resume"
            problems_after_failure = check(run, before)
            print(f"after the failed job: {problems_after_failure or 'results complete'}", flush=True)
            resumed = time.perf_counter()
            second = submit(cluster, run, "--resume")
            status, _ = wait_job(cluster, second)
            print(f"resumed job {status} {time.perf_counter() - resumed:.0f} s after resubmission; "
                  f"{what_the_user_saw(save_logs(cluster, second, args.logs))}", flush=True)
        problems = check(run, before)
        retried = [json.loads(line) for line in (RunFolder(run).read_text("retried.jsonl") or "").splitlines() if line]
        lost = [(r["config"]["k"], r["config"]["variant"], r.get("error_type")) for r in retried]
        print(f"path: {path}; trials set aside as lost to the cluster and re-run: {lost or 'none'}")
        print(f"checks: {problems or 'every grid point once and ok, records from before the outage unchanged'}")
        print(f"total {time.perf_counter() - clock:.0f} s")
        return 1 if problems or status != "SUCCEEDED" else 0
    finally:
        cluster.resume_s3()
        cluster.down()


if __name__ == "__main__":
    sys.exit(main())
