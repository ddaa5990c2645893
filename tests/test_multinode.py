"""A sweep as a Ray job on a three-node cluster (head + two workers on loopback, tests/multinode.py)
whose only shared storage is S3: the harvest and the trials spread over both workers, the judges run
on workers, a stopped job resumes without redoing or losing a trial (the stopped driver released the run's
lease, or the resumed one took it over), a lost worker node costs no grid point, and `dfc-ray report s3://…` works from
outside the cluster.

One test, because each step needs the state the previous one left (docs/cluster.md has the
measured times: 583 s on a 2-core machine at load 12–16 before cluster-smoke was cut to 4 trials).
RAY_AUTH_MODE=disabled is set for this throwaway loopback cluster only (tests/multinode.py), never
for a real one.
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from multinode import LocalCluster, wait_for

from dfc_ray.failures import lost_to_infrastructure
from dfc_ray.fs import RunFolder

REPO = Path(__file__).resolve().parents[1]
SPEC = "cluster-smoke"  # search_spaces/cluster-smoke.yaml: organism48 cut to 4 short trials
GRID = {(k, v) for k in (8, 16) for v in ("dfc-10pct", "crosscoder")}
RUN_FILES = {"spec.yaml", "run.json", "results.jsonl", "report.json", "report.md", "costs.json", "optuna.journal"}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster():
    cluster = LocalCluster(workers=2, worker_cpus=3)  # see cluster-smoke's max_concurrent
    try:
        yield cluster.up()
    finally:
        cluster.down()


def ray_cli(cluster: LocalCluster, *args: str, timeout: float = 120, check: bool = True) -> str:
    """Run `ray …` (the Jobs CLI) from outside the cluster, in the repository (the job's working dir)."""
    done = subprocess.run(["ray", *args], cwd=REPO, env=cluster.client_env(), capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0 or not check, done.stdout + done.stderr
    return done.stdout + done.stderr if done.returncode == 0 else f"FAILED: {done.stdout + done.stderr}"


NO_AGENT = "No available agent to submit job"
"""The Jobs API's answer while no node's job agent has registered with the head yet (right after the
cluster came up on a loaded machine); Ray's advice is to try again."""


def submit(cluster: LocalCluster, run: str, *extra: str) -> str:
    """`ray job submit --working-dir .` of a cluster-smoke sweep into `run`; returns the job id."""
    job_id = f"dfc-{uuid.uuid4().hex[:8]}"
    args = ("job", "submit", "--no-wait", "--submission-id", job_id, "--working-dir", ".", "--",
            "dfc-ray", "sweep", SPEC, "--storage", run.rsplit("/", 1)[0], "--run-dir", run, "--quiet", *extra)

    def accepted() -> bool:
        output = ray_cli(cluster, *args, check=False)
        assert not output.startswith("FAILED") or NO_AGENT in output, output
        return not output.startswith("FAILED")

    wait_for("a job agent accepting the job", accepted, timeout=120, every=5)
    return job_id


def job_status(cluster: LocalCluster, job_id: str) -> str:
    from ray.job_submission import JobSubmissionClient

    return str(JobSubmissionClient(cluster.address).get_job_status(job_id).value)


def ray_job_id(cluster: LocalCluster, job_id: str) -> str | None:
    """The Ray job id (what actors record) of a submitted job; None until its driver started."""
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(cluster.address).get_job_info(job_id).job_id


def job_logs(cluster: LocalCluster, job_id: str) -> str:
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(cluster.address).get_job_logs(job_id)


def results(run: str) -> list[dict]:
    return [json.loads(line) for line in (RunFolder(run).read_text("results.jsonl") or "").splitlines() if line]


def s3_keys(uri: str) -> set[str]:
    from dfc_ray.fs import s3fs_client

    root = uri.removeprefix("s3://")
    return {path.removeprefix(root + "/") for path in s3fs_client().find(root)}


def actors(cluster: LocalCluster, class_name: str) -> list[dict]:
    from ray.util.state import list_actors

    return list_actors(address=cluster.address, filters=[("class_name", "=", class_name)], limit=1000,
                       detail=True, raise_on_missing_output=False)


def trials_and_judges_running(cluster: LocalCluster, job_id: str) -> bool:
    """The job's driver started Tune trial actors and an evaluator replica is alive (the stopped job's
    actors died with its driver)."""
    ray_job = ray_job_id(cluster, job_id)
    return ray_job is not None and any(a.state == "ALIVE" and a.job_id == ray_job
                                       for a in actors(cluster, "ImplicitFunc")) \
        and any(a.state == "ALIVE" for a in actors(cluster, "Evaluator"))


def test_sweep_job_on_three_nodes_survives_stop_and_node_loss(cluster, monkeypatch):
    for key, value in cluster.client_env().items():  # this process reads S3 and the state API as a client
        monkeypatch.setenv(key, value)
    bucket = cluster.create_bucket(f"dfc-mn-{uuid.uuid4().hex[:8]}")
    run = f"{bucket}/runs/smoke"
    started = time.time()

    def mark(what: str) -> None:  # the phases' times, shown with -s or on a failure
        print(f"{time.time() - started:5.0f} s  {what}")

    workers = cluster.alive_workers()
    assert len(workers) == 2

    # 1. The job: stop it once a trial has finished, while others run.
    first = submit(cluster, run)
    wait_for("first finished trial", lambda: results(run) or job_status(cluster, first) in ("FAILED", "STOPPED"),
             timeout=420, every=2)
    assert results(run), job_logs(cluster, first)[-3000:]
    mark("first job: a trial finished")
    assert f"Connecting to existing Ray cluster at address: {cluster.gcs_address}" in job_logs(cluster, first)
    ray_cli(cluster, "job", "stop", first)
    wait_for("job stopped", lambda: job_status(cluster, first) in ("STOPPED", "FAILED", "SUCCEEDED"), timeout=120)
    stopped = {r["trial_id"]: r for r in results(run)}
    assert 1 <= len(stopped) < len(GRID), "the job was not stopped mid-trials"
    stopped_job = ray_job_id(cluster, first)
    mark("first job stopped")

    # 2. Resume it as a new job; lose a worker node (the one hosting the evaluator) while its trials run.
    second = submit(cluster, run, "--resume")
    wait_for("resumed job running trials and judges", lambda: trials_and_judges_running(cluster, second)
             or job_status(cluster, second) in ("FAILED", "STOPPED", "SUCCEEDED"), timeout=300, every=2)
    assert job_status(cluster, second) == "RUNNING", job_logs(cluster, second)[-3000:]
    evaluator = next(a for a in actors(cluster, "Evaluator") if a.state == "ALIVE")  # the resumed job's replica
    victim = next(name for name, node_id in workers.items() if node_id == evaluator.node_id)
    cluster.kill_raylet(cluster.node(victim))
    killed_at = time.time()
    mark("resumed job running trials and judges: worker killed")
    wait_for("resumed job finished", lambda: job_status(cluster, second) in ("SUCCEEDED", "FAILED", "STOPPED"),
             timeout=600, every=3)
    logs = job_logs(cluster, second)
    mark("resumed job finished")
    assert job_status(cluster, second) == "SUCCEEDED", logs[-3000:]
    assert f"Connecting to existing Ray cluster at address: {cluster.gcs_address}" in logs

    # Every grid point exactly once, status ok; trials finished before the stop kept as they were.
    final = results(run)
    assert len(final) == len({r["trial_id"] for r in final}) == len(GRID)
    assert {(r["config"]["k"], r["config"]["variant"]) for r in final} == GRID
    assert all(r["status"] == "ok" for r in final), [(r["status"], r.get("error")) for r in final]
    for trial_id, record in stopped.items():
        assert next(r for r in final if r["trial_id"] == trial_id) == record
    # Trials the node loss took down were set aside (retried.jsonl) and their grid points re-run ok.
    retried = [json.loads(line) for line in (RunFolder(run).read_text("retried.jsonl") or "").splitlines()]
    assert all(lost_to_infrastructure(r) for r in retried), retried
    lost = [(r["config"]["k"], r["config"]["variant"], r["error_type"]) for r in retried]
    print(f"trials lost with the node and re-run: {lost}")

    # Placement: harvest and trials on both workers, judges on workers only (never the head), and the
    # evaluator replica restarted on the surviving node after the loss.
    info = json.loads(RunFolder(run).read_text("report.json"))["run"]  # the resumed job reused the harvest:
    harvest = json.loads(RunFolder(info["harvest"]).read_text("harvest.json"))  # its progress file has the nodes
    assert set(harvest["group_nodes"]) == set(workers.values())
    assert {r["metrics"]["node_id"] for r in final} <= set(workers.values())
    trial_nodes = {a.node_id for a in actors(cluster, "ImplicitFunc")}  # Tune's trial actors
    # Workers only; with 4 trials Ray may pack them all on one worker, so both is reported, not required.
    assert trial_nodes and trial_nodes <= set(workers.values())
    print(f"trial actors on {len(trial_nodes)} of 2 workers")
    judges = actors(cluster, "Evaluator") + actors(cluster, "Steerer")
    assert judges and {a.node_id for a in judges} <= set(workers.values())
    survivor = workers[next(name for name in workers if name != victim)]
    assert next(a for a in actors(cluster, "Evaluator") if a.actor_id == evaluator.actor_id).node_id == survivor

    # Storage: every run file in S3; nothing written into the job's working copy or the nodes' folders.
    keys = s3_keys(run)
    assert RUN_FILES <= keys and "lease.json" not in keys  # the finished driver released its lease
    # `ray job stop` sends SIGTERM, which Ray's driver turns into an exit that releases the lease; a driver
    # killed before it could (SIGKILL after Ray's 3 s) leaves it, and the resume takes it over at once
    takeovers = [json.loads(line) for line in (RunFolder(run).read_text("lease-takeovers.jsonl") or "").splitlines()]
    assert all(t["from"]["job_id"] == stopped_job != t["by"]["job_id"] for t in takeovers), takeovers
    print(f"lease: {'taken over, ' + takeovers[0]['why'] if takeovers else 'released by the stopped job'}")
    assert all(f"checkpoints/{r['trial_id']}/model.safetensors" in keys for r in final)
    assert any(k.startswith("tensorboard/") and "events.out.tfevents" in k for k in keys)
    for scratch in [REPO, *(Path(node.scratch) for node in cluster.nodes)]:  # older local runs are not this one's
        assert not [p for p in scratch.rglob("results.jsonl") if p.stat().st_mtime >= started], scratch
    assert "dfc-ray-test-secret" not in logs

    # The report, rebuilt from S3 by a process outside the cluster.
    report = subprocess.run(["dfc-ray", "report", run], cwd=REPO, env=cluster.client_env(), capture_output=True,
                            text=True, timeout=300)
    assert report.returncode == 0, report.stderr
    mark("report rebuilt from S3")
    assert f"(n={len(GRID)})" in report.stdout
    print(f"node lost {time.time() - killed_at:.0f} s before the resumed job finished")
