"""One driver per run folder (dfc_ray/sweep/lease.py `RunLease`), on a local folder and on S3 (moto): a second
driver is refused naming the holder, a SIGKILLed holder's lease is taken over once its stated timeout has
passed (and the takeover recorded), and through the CLI a concurrent `--resume` is refused while the running
sweep finishes unharmed; Ctrl-C stops a sweep with a non-zero exit naming the trials that did not finish.

The SIGKILL → `--resume` takeover of a whole sweep is tests/test_sweep.py's and tests/test_sweep_s3.py's
killed-sweep tests (their drivers state a short DFC_RAY_LEASE_TIMEOUT)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_sweep import REPO, read_results, write_spec

from dfc_ray.fs import RunFolder
from dfc_ray.sweep.lease import LEASE, TAKEOVERS, RunLease

HOLDER = """
import sys, time
from dfc_ray.fs import RunFolder
from dfc_ray.sweep.lease import RunLease
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
    # Python's own SIGINT handler, as a driver's main thread has it outside Tune (whatever an earlier test left)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    first = RunLease(RunFolder(str(tmp_path / "run")), timeout=12)  # beats every 3 s, the first 3 s from now
    first.acquire()
    second = RunLease(RunFolder(str(tmp_path / "run")), timeout=30)  # acquires within ~1 s
    assert second.acquire(lambda held: "declared gone by the test") == "declared gone by the test"
    try:
        with pytest.raises(KeyboardInterrupt):
            for _ in range(600):  # the interruption ends the wait; 30 s leave a loaded machine room
                time.sleep(0.05)
        assert first.lost is not None and f"pid {os.getpid()}" in first.lost
    finally:
        signal.signal(signal.SIGINT, previous)
        first.release()  # not its lease any more: left in place
        assert RunLease(RunFolder(str(tmp_path / "run"))).current().token == second.holder.token
        second.release()


# ---------------------------------------------------------------- compare-and-swap, bounds, malformed leases


def stale_lease(run: RunFolder, **fields) -> dict:
    """Write a lease of a driver that is gone (a fresh-looking heartbeat unless `fields` say otherwise)."""
    now = time.time()
    holder = {"token": "0" * 32, "host": "elsewhere", "pid": 1, "started": now - 60, "heartbeat": now,
              "timeout": 60.0} | fields
    run.write_text(LEASE, json.dumps(holder) + "\n")
    return holder


@pytest.mark.parametrize("storage, n_runs", [("local", 20), ("s3", 5)])
def test_drivers_racing_for_a_stale_lease_end_with_exactly_one_holder(storage, n_runs, tmp_path, request):
    """20 local run folders (5 on S3: each S3 driver makes its own client), each with a lease whose holder is
    gone, and 3 drivers per folder acquiring at once. Each has read the old lease before any writes (a barrier
    inside the holder check); one checks for longer than the old write-then-read-back wait. In every folder
    exactly one driver holds the run and the others are refused in one line."""
    import threading

    root = str(tmp_path) if storage == "local" else f"{request.getfixturevalue('s3_bucket')}/runs"
    folders = [RunFolder(f"{root}/race-{i}") for i in range(n_runs)]
    for run in folders:
        stale_lease(run)
    barriers = [threading.Barrier(3) for _ in folders]
    outcomes: dict[tuple[int, int], object] = {}

    def driver(i: int, j: int) -> None:
        lease = RunLease(RunFolder(folders[i].uri), timeout=2)  # settle 0.5 s: the slow check outlasts it

        def gone(held) -> str:
            barriers[i].wait(timeout=60)
            time.sleep(0.6 if j == 2 else 0.0)
            return "declared gone by the test"

        try:
            lease.acquire(gone)
            outcomes[i, j] = lease
        except ValueError as err:
            outcomes[i, j] = str(err)

    threads = [threading.Thread(target=driver, args=(i, j)) for i in range(len(folders)) for j in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    try:
        for i, run in enumerate(folders):
            holders = [outcomes[i, j] for j in range(3) if isinstance(outcomes[i, j], RunLease)]
            refusals = [outcomes[i, j] for j in range(3) if isinstance(outcomes[i, j], str)]
            assert len(holders) == 1 and len(refusals) == 2, (i, outcomes)
            assert all("one driver per run folder" in line and "\n" not in line for line in refusals)
            assert RunLease(RunFolder(run.uri)).current().token == holders[0].holder.token
            takeovers = (run.read_text(TAKEOVERS) or "").splitlines()
            assert len(takeovers) == 1 and json.loads(takeovers[0])["by"]["token"] == holders[0].holder.token
    finally:
        for outcome in outcomes.values():
            if isinstance(outcome, RunLease):
                outcome.release()


def test_a_stalled_holder_that_wakes_after_a_takeover_does_not_overwrite_its_successor(tmp_path):
    """The stalled holder's next heartbeat is a compare-and-swap against the lease it last wrote: it finds the
    successor's lease, sets `lost`, and leaves lease.json as the successor wrote it."""
    run = RunFolder(str(tmp_path / "run"))
    first = RunLease(run, timeout=2)
    first.acquire()
    first._stop.set()  # the heartbeat thread stalls (as under SIGSTOP): no beat until woken below
    first._thread.join()
    time.sleep(2.2)
    second = RunLease(RunFolder(run.uri), timeout=30)
    try:
        assert "more than its timeout of 2 s" in second.acquire()
        woke = replace_heartbeat(first)
        assert woke is False and f"pid {os.getpid()}" in first.lost
        assert RunLease(RunFolder(run.uri)).current().token == second.holder.token
        assert second.check() and not first.check()
    finally:
        first.release()  # not its lease any more: left in place
        assert RunLease(RunFolder(run.uri)).current().token == second.holder.token
        second.release()


def replace_heartbeat(lease: RunLease) -> bool:
    """One heartbeat of `lease`, as its thread would beat when woken."""
    from dataclasses import replace

    return lease._swap(replace(lease.holder, heartbeat=time.time()))


def test_a_lease_with_fields_a_newer_version_adds_is_still_a_lease(tmp_path):
    run = RunFolder(str(tmp_path / "run"))
    stale_lease(run, host="h1", pid=4242, lease_format=2, labels={"team": "x"})
    with pytest.raises(ValueError, match=r"in use by the driver on host h1 \(pid 4242\)"):
        RunLease(run, timeout=30).acquire()


@pytest.mark.parametrize("fields, expected", [
    ({"heartbeat": "yesterday"}, "heartbeat = 'yesterday': expected a finite Unix time"),
    ({"heartbeat": float("nan")}, "heartbeat = nan: expected a finite Unix time"),
    ({"heartbeat": 4e9}, "heartbeat = 4000000000.0: expected a finite Unix time, at most 300 s ahead of this clock"),
    ({"timeout": float("inf")}, "timeout = inf: expected seconds > 0 and at most 86400"),
    ({"timeout": -1}, "timeout = -1: expected seconds > 0"),
    ({"pid": "42"}, "pid = '42': expected an integer"),
    ({"token": None}, "token = None: expected a non-empty string"),
])
def test_a_malformed_lease_is_refused_in_one_line_naming_file_and_field(fields, expected, tmp_path):
    run = RunFolder(str(tmp_path / "run"))
    stale_lease(run, **fields)
    with pytest.raises(ValueError) as refused:
        RunLease(run, timeout=30).acquire()
    line = str(refused.value)
    assert line.startswith(f"{run.uri}/lease.json: {expected}") and "\n" not in line


@pytest.mark.parametrize("text, expected", [
    ("[1, 2]", "expected an object (the lease a driver writes), got list"),
    ("{not json", "not valid JSON"),
    ('{"token": "a"}', "no host"),
    (None, "a directory; expected the lease file a driver writes"),
])
def test_a_lease_that_is_not_a_lease_object_is_refused_in_one_line(text, expected, tmp_path):
    run = RunFolder(str(tmp_path / "run"))
    if text is None:
        (tmp_path / "run" / LEASE).mkdir()
    else:
        run.write_text(LEASE, text)
    with pytest.raises(ValueError) as refused:
        RunLease(run, timeout=30).acquire()
    assert str(refused.value).startswith(f"{run.uri}/lease.json: ") and expected in str(refused.value)
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize("value", ["0.001", "1.9", "nan", "inf", "-5", "1e9", "soon"])
def test_a_lease_timeout_that_is_not_finite_or_below_several_heartbeats_is_refused(value, monkeypatch, tmp_path):
    from dfc_ray.sweep.lease import lease_timeout

    monkeypatch.setenv("DFC_RAY_LEASE_TIMEOUT", value)
    with pytest.raises(ValueError) as refused:
        lease_timeout()
    assert str(refused.value) == (f"DFC_RAY_LEASE_TIMEOUT={value!r}: expected seconds between 2 and 86400 (a "
                                  "timeout spans 4 heartbeats of at least 0.5 s)")
    monkeypatch.setenv("DFC_RAY_LEASE_TIMEOUT", "2")
    assert lease_timeout() == 2.0


def test_a_driver_taken_over_records_no_more_trials(tmp_path):
    """A driver that stalled past its lease and was taken over by another process appends nothing to
    results.jsonl when it wakes: the grid point is its successor's to record, once."""
    from types import SimpleNamespace

    from dfc_ray.spaces import load_spec
    from dfc_ray.sweep.lease import still_held
    from dfc_ray.sweep.results import ResultsWriter

    spec = load_spec("cluster-smoke")
    run = RunFolder(str(tmp_path / "run"))
    writer = ResultsWriter(spec, run.uri)
    points = spec.grid_points()
    lease = RunLease(run, timeout=2)
    lease.acquire()
    successor = None
    try:
        writer.append(SimpleNamespace(trial_id="t1", config=points[0]), "ok", {"fvu": 0.5})
        assert [r["trial_id"] for r in read_results(tmp_path / "run")] == ["t1"]
        lease._stop.set()  # its heartbeat stalls (as under SIGSTOP) ...
        lease._thread.join()
        time.sleep(2.2)
        successor = start_holder(run.uri, timeout=30)  # ... and another driver takes the stale lease over
        assert not still_held(run.uri) and f"pid {successor.pid}" in lease.lost
        writer.append(SimpleNamespace(trial_id="t2", config=points[1]), "ok", {"fvu": 0.5})
        assert [r["trial_id"] for r in read_results(tmp_path / "run")] == ["t1"]
    finally:
        lease.release()
        if successor is not None:
            successor.kill()
            successor.wait()


LOCAL_DRIVER = """
import time
import ray
from dfc_ray.cluster import connect
connect(num_cpus=1)
ray.get(ray.remote(lambda: 1).remote())  # a worker too
time.sleep(600)
"""


def test_a_killed_local_drivers_ray_agents_and_workers_are_reaped():
    """kill -9 of a driver that started a local cluster (`connect`, as every local sweep does): Ray's agents would
    live on for a minute (they try to report the raylet's death to the dead GCS first); dfc_ray/reaper.py kills
    them, and the workers, within seconds."""
    from dfc_ray.reaper import processes, tree

    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([sys.executable, "-c", LOCAL_DRIVER], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def descendants() -> dict[int, str]:
        """pid → command line of every process under the driver."""
        table = processes()
        names = {}
        for pid, _ in tree(table, {proc.pid}):
            with contextlib.suppress(OSError):
                names[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        names.pop(proc.pid, None)
        return names

    def alive(pid: int) -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False

    try:
        wait_for(proc, "Ray's agents and the reaper", lambda: all(
            any(name in command for command in descendants().values())
            for name in ("ray::DashboardAgent", "ray::RuntimeEnvAgent", "dfc_ray/reaper.py")))
        time.sleep(1)  # the reaper's first look at the Ray process tree
        started = descendants()
        os.kill(proc.pid, signal.SIGKILL)  # the driver alone, as `kill -9 PID` does
        proc.wait()
        deadline = time.time() + 20
        while time.time() < deadline and any(alive(pid) for pid in started):
            time.sleep(0.5)
        assert not [pid for pid in started if alive(pid)], {pid: started[pid] for pid in started if alive(pid)}
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.mark.slow
def test_a_stalled_driver_that_wakes_after_a_resume_took_over_leaves_every_trial_ok_once(tiny_pair, tmp_path):
    """A driver stalled (SIGSTOP) past its lease, a `--resume` takes the run over, then the stalled driver wakes
    (SIGCONT): it finds its lease gone, records nothing more and exits in one line; the resume ends with every
    grid point ok, exactly once."""
    path = write_spec(tmp_path, tiny_pair, grid={"dict_size": [64, 128]},
                      train={"steps": 600, "batch_size": 32, "lr": 1e-3, "warmup_steps": 5, "reader": "local",
                             "norm_rows": 256})
    run = tmp_path / "runs" / "stalled"
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled", "DFC_RAY_LEASE_TIMEOUT": "2"}
    env.pop("RAY_ADDRESS", None)
    command = [sys.executable, "-m", "dfc_ray.cli", "sweep", path, "--run-dir", str(run), "--no-eval", "--quiet"]
    first = subprocess.Popen(command, env=env, start_new_session=True, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    second = None
    try:
        wait_for_results(first, run, 1)
        os.kill(first.pid, signal.SIGSTOP)  # the driver alone stalls; its trials' cluster runs on
        time.sleep(3)  # past its 2 s lease
        second = subprocess.Popen([*command, "--resume"], env=env, start_new_session=True, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        wait_for(second, "the takeover", lambda: (run / TAKEOVERS).exists())
        os.kill(first.pid, signal.SIGCONT)
        _, first_err = first.communicate(timeout=300)
        out, err = second.communicate(timeout=600)
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGCONT)
                os.killpg(proc.pid, signal.SIGKILL)
    assert second.returncode == 0, out + err
    assert first.returncode != 0 and "Traceback" not in first_err
    assert "lease" in first_err.strip().splitlines()[-1], first_err
    results = read_results(run)
    assert sorted(r["config"]["dict_size"] for r in results) == [64, 128], results
    assert all(r["status"] == "ok" for r in results), results
