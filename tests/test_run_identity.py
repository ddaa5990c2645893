"""Runs that share a cluster or a spec name stay apart: each run has its own id (run.json, kept across
resumes) and its own judge pools named after it; a judge replica hosting another pair refuses a trial;
an edited spec.yaml is not resumed silently; a lease whose Ray job has ended is taken over at once.

The end-to-end case: two sweeps of one spec name, one on the organism and one on the planted pair, run at
once on one local cluster; both complete and every trial's A-clean rate is its own pair's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml
from test_sweep import REPO, read_results, write_spec

from dfc_ray.config import EvalConfig, PairSpec
from dfc_ray.fs import RunFolder
from dfc_ray.sweep.lease import RunLease
from dfc_ray.pair import pair_fingerprint
from dfc_ray.spaces import load_spec

RAY_CPUS = 6
"""Logical CPUs of this module's cluster (conftest `ray_cluster`): two sweeps, each one trial and two judges."""


def test_a_replica_refuses_a_request_for_another_pair(tiny_pair, tmp_path):
    from actors.evaluator import Evaluator
    from dfc_ray.organism.planted import build_planted_pair

    other, _ = build_planted_pair(tmp_path / "planted")
    judge = Evaluator(tiny_pair)
    own, foreign = pair_fingerprint(tiny_pair), pair_fingerprint(other)
    assert own != foreign
    assert judge.for_pair(own, "stats")["clean_misses"] == 0
    with pytest.raises(ValueError) as refused:
        judge.for_pair(foreign, "stats")
    line = str(refused.value)
    assert own in line and foreign in line and tiny_pair.a in line and "\n" not in line


def open_fresh(tmp_path, tiny_pair, **overrides):
    from dfc_ray.sweep.driver import _open_run, _record_run

    run_dir = str(tmp_path / "run")
    run, spec, record = _open_run(load_spec(write_spec(tmp_path, tiny_pair, **overrides)), run_dir, resume=False)
    _record_run(run, record, fresh=True)
    return run_dir, record


def test_the_run_id_is_kept_across_resumes_and_an_edited_spec_is_refused(tiny_pair, tmp_path):
    from dfc_ray.sweep.driver import _open_run, _record_run

    run_dir, record = open_fresh(tmp_path, tiny_pair)
    assert record["run_id"].startswith("tiny-") and len(record["run_id"]) == len("tiny-") + 8
    _, spec, again = _open_run(None, run_dir, resume=True)
    assert again["run_id"] == record["run_id"] and spec.name == "tiny"
    edited = yaml.safe_load((tmp_path / "run" / "spec.yaml").read_text())
    edited["train"]["steps"] = 5
    (tmp_path / "run" / "spec.yaml").write_text(yaml.safe_dump(edited, sort_keys=False))
    with pytest.raises(ValueError, match=r"spec.yaml: changed since the run started \(train.steps 30 → 5\)"):
        _open_run(None, run_dir, resume=True)
    run, spec, accepted = _open_run(None, run_dir, resume=True, accept_spec_changes=True)
    assert spec.train["steps"] == 5 and accepted["run_id"] == record["run_id"]
    assert accepted["spec_changes"][0]["changes"] == ["train.steps 30 → 5"]
    _record_run(run, accepted, fresh=False)
    assert _open_run(None, run_dir, resume=True)[2]["spec_changes"] == accepted["spec_changes"]  # kept, once


def test_a_run_id_that_could_escape_is_refused(tiny_pair, tmp_path):
    from dfc_ray.sweep.driver import _open_run

    run_dir, record = open_fresh(tmp_path, tiny_pair)
    (tmp_path / "run" / "run.json").write_text(json.dumps(record | {"run_id": "../other-run"}))
    with pytest.raises(ValueError, match=r"run.json: run_id = '../other-run': expected a name"):
        _open_run(None, run_dir, resume=True)


def driver_env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    return env


CRASHED_HOLDER = """
import os, sys, ray
from dfc_ray.cluster import cluster_identity
from dfc_ray.fs import RunFolder
from dfc_ray.sweep.lease import RunLease
lease = RunLease(RunFolder(sys.argv[1]), timeout=600)
lease.acquire()
ray.init(address=sys.argv[2])
lease.set_job(*cluster_identity())
os._exit(0)  # a driver that ends without releasing its lease (ray job stop, a crash)
"""


def test_a_lease_whose_ray_job_ended_is_taken_over_at_once(ray_cluster, tmp_path):
    from dfc_ray.cluster import cluster_identity
    from dfc_ray.sweep.driver import _holder_gone

    gcs = ray_cluster._private.worker.global_worker.node.gcs_address
    run_uri = str(tmp_path / "run")
    subprocess.run([sys.executable, "-c", CRASHED_HOLDER, run_uri, gcs], env=driver_env(), check=True, timeout=120)
    held = RunLease(RunFolder(run_uri)).current()
    assert held is not None and held.cluster_id == cluster_identity()[1] and held.age() < held.timeout
    lease = RunLease(RunFolder(run_uri))
    deadline = time.time() + 60
    while True:  # the GCS marks a job ended once its driver's connection is gone
        try:
            why = lease.acquire(lambda holder: _holder_gone(holder, gcs))
            break
        except ValueError:
            assert time.time() < deadline, "the ended job's lease was never taken over"
            time.sleep(1)
    lease.release()
    assert why == f"its Ray job {held.job_id} has ended"
    assert _holder_gone(held, None) is None  # without a cluster to ask, only the heartbeat decides


@pytest.mark.slow
def test_two_sweeps_of_one_spec_name_judge_with_their_own_pairs(ray_cluster, tmp_path):
    from actors.evaluator import Evaluator
    from dfc_ray.organism.planted import build_planted_pair

    gcs = ray_cluster._private.worker.global_worker.node.gcs_address
    judges = {"eval": {"tasks": "organism:test", "n_tasks": 8, "n_texts": 0, "max_new_tokens": 24, "batch_size": 8},
              "steering": {"n_dev": 4, "n_test": 4, "n_plain": 4, "top_n": 1, "alphas": [4], "targets": ["a"],
                           "min_set_pool": 2, "min_set_max": 1, "max_new_tokens": 8, "batch_size": 4},
              "crosscoder": {"k": 4, "aux_k": 8, "dead_tokens": 2000, "a_exclusive": 0.1, "b_exclusive": 0.1},
              "grid": {"dict_size": [64]}, "resources": {"cpu": 1, "max_concurrent": 1, "evaluator_cpu": 0.5}}
    pairs = {"organism": PairSpec(), "planted": build_planted_pair(tmp_path / "planted-pair")[0]}
    drivers = {}
    for name, pair in pairs.items():
        (tmp_path / name).mkdir()
        spec = write_spec(tmp_path / name, pair, **judges)  # both named "tiny"
        drivers[name] = subprocess.Popen(
            [sys.executable, "-m", "dfc_ray.cli", "sweep", spec, "--run-dir", str(tmp_path / name / "run"),
             "--store", str(tmp_path / "harvests"), "--address", gcs, "--quiet"],
            env=driver_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    outputs = {name: proc.communicate(timeout=900)[0] for name, proc in drivers.items()}
    for name, proc in drivers.items():
        assert proc.returncode == 0, outputs[name][-3000:]
    clean = {}
    for name, pair in pairs.items():  # each pair's own clean A rate, judged here in-process
        scores, _ = Evaluator(pair).clean_scores(EvalConfig(**judges["eval"]))
        clean[name] = float(np.mean([s.correct for s in scores["a"]]))
    assert clean["organism"] != clean["planted"], clean  # else a mix-up could not show
    pools = set()
    for name in pairs:
        run = tmp_path / name / "run"
        results = read_results(run)
        assert len(results) == 1 and results[0]["status"] == "ok", results
        assert results[0]["metrics"]["a_clean"] == pytest.approx(clean[name])
        report = json.loads((run / "report.json").read_text())
        run_id = json.loads((run / "run.json").read_text())["run_id"]
        assert report["run"]["spec"] == "tiny" and report["run"]["run_id"] == run_id
        assert set(report["run"]["judge_restarts"]) == {f"{run_id}-evaluator", f"{run_id}-steering"}
        pools |= set(report["run"]["judge_restarts"])
    assert len(pools) == 4  # four pools, none shared


# ---------------------------------------------------------------- copies and per-driver judges (#31.2)


def test_a_copied_run_folder_resumes_under_a_new_run_id(tiny_pair, tmp_path):
    """`cp -a` of a running run, then `--resume` of the copy: run.json names the folder it was made for, so
    the copy gets its own id (its judges and records apart from the original's); the original keeps its id."""
    import shutil

    from dfc_ray.sweep.driver import _open_run, _record_run

    run_dir, record = open_fresh(tmp_path, tiny_pair)
    assert record["run_dir"] == run_dir
    copy = shutil.copytree(run_dir, tmp_path / "copy")
    run, _, copied = _open_run(None, str(copy), resume=True)
    assert copied["run_id"] != record["run_id"] and copied["run_id"].startswith("tiny-")
    assert copied["run_dir"] == str(copy)
    assert copied["copied_from"] == [{"run_id": record["run_id"], "run_dir": run_dir}]
    _record_run(run, copied, fresh=False)
    assert _open_run(None, str(copy), resume=True)[2]["run_id"] == copied["run_id"]  # kept from then on
    assert _open_run(None, run_dir, resume=True)[2]["run_id"] == record["run_id"]


def test_a_pool_missing_from_its_drivers_namespace_is_a_pool_missing_error(ray_cluster):
    """A trial looks its judges up in its driver's namespace (it carries the lease token, `start_pools`); a pool
    that is not there raises PoolMissingError, which makes the trial lost to the cluster, not failed."""
    from actors.pool import PoolMissingError, ReplicaPool
    from dfc_ray.config import PoolConfig

    with pytest.raises(PoolMissingError, match="no actor 'tiny-0000abcd-evaluator-0' in namespace 'dfc-ray-0123'"):
        ReplicaPool.connect(PoolConfig("tiny-0000abcd-evaluator", namespace="dfc-ray-0123"))
