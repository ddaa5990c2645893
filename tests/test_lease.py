"""One driver per run folder (dfc_ray/fs.py `RunLease`), on a local folder and on S3 (moto): a second
driver is refused naming the holder, a SIGKILLed holder's lease is taken over once its stated timeout has
passed (and the takeover recorded), and through the CLI a concurrent `--resume` is refused while the running
sweep finishes unharmed; Ctrl-C stops a sweep with a non-zero exit naming the trials that did not finish.

The SIGKILL → `--resume` takeover of a whole sweep is tests/test_sweep.py's and tests/test_sweep_s3.py's
killed-sweep tests (their drivers state a short DFC_RAY_LEASE_TIMEOUT)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_sweep import REPO, read_results, write_spec

from dfc_ray.fs import LEASE, TAKEOVERS, RunFolder, RunLease

HOLDER = """
import sys, time
from dfc_ray.fs import RunFolder, RunLease
RunLease(RunFolder(sys.argv[1]), timeout=float(sys.argv[2])).acquire()
print("held", flush=True)
time.sleep(600)
"""


def start_holder(uri: str, timeout: float) -> subprocess.Popen:
    """A process that takes the lease of `uri` and heartbeats until killed."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, uri, str(timeout)], env=env, stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


@pytest.fixture(params=["local", "s3"])
def run_uri(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "run")
    return f"{request.getfixturevalue('s3_bucket')}/runs/leased"


def test_a_held_lease_is_refused_and_a_killed_holders_is_taken_over(run_uri):
    holder = start_holder(run_uri, timeout=2)
    try:
        with pytest.raises(ValueError) as refused:
            RunLease(RunFolder(run_uri), timeout=30).acquire()
        line = str(refused.value)
        assert f"pid {holder.pid}" in line and "last heartbeat" in line and "one driver per run folder" in line
        assert "\n" not in line
        time.sleep(3)  # heartbeats (every 0.5 s) keep a live holder's lease fresh past its 2 s timeout
        with pytest.raises(ValueError, match=f"pid {holder.pid}"):
            RunLease(RunFolder(run_uri), timeout=30).acquire()
    finally:
        holder.kill()
        holder.wait()
    time.sleep(2.5)  # now nobody beats: the lease goes stale after the holder's stated 2 s
    lease = RunLease(RunFolder(run_uri), timeout=30)
    why = lease.acquire()
    try:
        assert why is not None and "more than its timeout of 2 s" in why
        run = RunFolder(run_uri)
        assert json.loads(run.read_text(LEASE) or "{}")["pid"] == os.getpid()
        takeovers = [json.loads(line) for line in (run.read_text(TAKEOVERS) or "").splitlines()]
        assert len(takeovers) == 1 and takeovers[0]["from"]["pid"] == holder.pid
        assert takeovers[0]["by"]["pid"] == os.getpid() and takeovers[0]["why"] == why
    finally:
        lease.release()
    assert RunFolder(run_uri).read_text(LEASE) is None  # released: the next driver starts at once
    again = RunLease(RunFolder(run_uri), timeout=30)
    assert again.acquire() is None
    again.release()


def start_sweep(tmp_path: Path, pair, **overrides) -> tuple[subprocess.Popen, Path, list[str]]:
    """A sweep of tiny trials of a few seconds each, one at a time (4 unless `overrides` say otherwise), as its
    own process group."""
    path = write_spec(tmp_path, pair, train={"steps": 1500, "batch_size": 32, "lr": 1e-3, "warmup_steps": 5,
                                             "reader": "local", "norm_rows": 256}, **overrides)
    run = tmp_path / "runs" / "leased"
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    command = [sys.executable, "-m", "dfc_ray.cli", "sweep", path, "--run-dir", str(run), "--no-eval", "--quiet"]
    proc = subprocess.Popen(command, env=env, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    return proc, run, command


def wait_for(proc: subprocess.Popen, what: str, reached) -> None:
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if reached():
            return
        time.sleep(0.2)
    raise AssertionError(f"{what} not reached before the sweep ended: {proc.communicate()}")


def wait_for_results(proc: subprocess.Popen, run: Path, n: int) -> None:
    wait_for(proc, f"{n} finished trials", lambda: (run / "results.jsonl").exists() and len(read_results(run)) >= n)


@pytest.mark.slow
def test_concurrent_resume_is_refused_and_the_running_sweep_finishes(tiny_pair, tmp_path):
    proc, run, command = start_sweep(tmp_path, tiny_pair, grid={"dict_size": [64, 128]})
    try:  # resume as soon as the first driver holds the run: it has Ray, the harvest and two trials ahead
        wait_for(proc, "the first driver's lease", lambda: (run / LEASE).exists() and (run / "run.json").exists())
        run_id = json.loads((run / "run.json").read_text())["run_id"]
        second = subprocess.run([*command, "--resume"], env={**os.environ, "PYTHONPATH": str(REPO)},
                                capture_output=True, text=True, timeout=120)
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    lines = (second.stdout + second.stderr).strip().splitlines()
    assert second.returncode == 2 and len(lines) == 1, lines
    assert f"in use by the driver on host {os.uname().nodename} (pid {proc.pid}" in lines[0]
    assert "last heartbeat" in lines[0]
    assert proc.returncode == 0, out
    results = read_results(run)  # the first driver's sweep, whole: every grid point once, all ok
    assert len(results) == len({r["trial_id"] for r in results}) == 2
    assert all(r["status"] == "ok" for r in results)
    assert json.loads((run / "run.json").read_text())["run_id"] == run_id
    assert not (run / LEASE).exists() and not (run / TAKEOVERS).exists()


@pytest.mark.slow
def test_ctrl_c_exits_non_zero_and_names_the_unfinished_trials(tiny_pair, tmp_path):
    proc, run, _ = start_sweep(tmp_path, tiny_pair)
    try:
        wait_for_results(proc, run, 1)
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal sends: the whole foreground group
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, out + err
    finished = read_results(run)
    owed = 4 - len(finished)
    assert 1 <= len(finished) < 4
    last = err.strip().splitlines()[-1]
    assert f"interrupted; {owed} trials did not finish" in last and "--resume --run-dir" in last
    assert "sweep finished" not in out and "Traceback" not in err
    unfinished = json.loads((run / "report.json").read_text())["run"]["unfinished"]
    assert len(unfinished["running"]) + unfinished["not_started"] == owed
    assert all(set(t["config"]) == {"dict_size", "variant"} for t in unfinished["running"])
    assert f"INTERRUPTED: {owed} trials did not finish" in (run / "report.md").read_text()
    assert not (run / LEASE).exists()  # released: `--resume` can start at once


def test_a_driver_whose_lease_was_taken_stops(tmp_path):
    """A holder that finds another driver's token in lease.json (it had stalled past its timeout and was taken
    over) says so and interrupts its main thread, which then writes nothing more to the run."""
    first = RunLease(RunFolder(str(tmp_path / "run")), timeout=12)  # beats every 3 s, the first 3 s from now
    first.acquire()
    second = RunLease(RunFolder(str(tmp_path / "run")), timeout=30)  # acquires within ~1 s
    assert second.acquire(lambda held: "declared gone by the test") == "declared gone by the test"
    try:
        with pytest.raises(KeyboardInterrupt):
            for _ in range(200):
                time.sleep(0.05)
        assert first.lost is not None and f"pid {os.getpid()}" in first.lost
    finally:
        first.release()  # not its lease any more: left in place
        assert RunLease(RunFolder(str(tmp_path / "run"))).current().token == second.holder.token
        second.release()
