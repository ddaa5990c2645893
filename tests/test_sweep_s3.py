"""`dfc-ray sweep --storage s3://…` on the moto S3 server: the whole run folder (Tune's experiment
state included) lives in S3, `dfc-ray report s3://…` rebuilds the report, and a killed S3 run
resumes from S3 alone (results.jsonl, spec.yaml and the Optuna journal)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from test_sweep import REPO, write_spec


def s3_keys(uri: str) -> list[str]:
    """Every object key under an s3:// prefix, relative to it."""
    from dfc_ray.fs import s3fs_client

    root = uri.removeprefix("s3://").rstrip("/")
    return sorted(path.removeprefix(root + "/") for path in s3fs_client().find(root))


def s3_results(uri: str) -> list[dict]:
    from dfc_ray.fs import RunFolder

    return [json.loads(line) for line in (RunFolder(uri).read_text("results.jsonl") or "").splitlines() if line]


def test_sweep_into_s3_keeps_every_run_file_there(tiny_pair, s3_bucket, ray_cluster, tmp_path, monkeypatch):
    from dfc_ray.spaces import load_spec
    from dfc_ray.sweep import run_sweep

    monkeypatch.chdir(tmp_path)  # nothing may land in the working directory
    run = f"{s3_bucket}/runs/tiny"
    judges = {"eval": {"tasks": "organism:test", "n_tasks": 4, "n_texts": 2, "max_new_tokens": 6, "batch_size": 4},
              "steering": {"n_dev": 4, "n_test": 4, "n_plain": 4, "top_n": 1, "alphas": [4], "targets": ["a"],
                           "min_set_pool": 2, "min_set_max": 1, "max_new_tokens": 6, "batch_size": 4},
              "resources": {"cpu": 1, "max_concurrent": 1, "evaluator_cpu": 0.5},
              "grid": {"dict_size": [64, 128], "variant": [{"name": "dfc", "a_exclusive": 0.1, "b_exclusive": 0.1},
                                                           {"name": "crosscoder"}]}}
    run_sweep(load_spec(write_spec(tmp_path, tiny_pair, **judges)), run, live=False)  # judges read checkpoints from S3
    keys = s3_keys(run)
    results = s3_results(run)
    assert len(results) == 4 and all(r["status"] == "ok" for r in results)
    for r in results:
        assert f"checkpoints/{r['trial_id']}/model.safetensors" in keys
        assert r["metrics"]["checkpoint"] == f"{run}/checkpoints/{r['trial_id']}"
        assert r["metrics"]["delta_a_pp"] == pytest.approx(100 * (r["metrics"]["a_splice"] - r["metrics"]["a_clean"]))
    assert {"spec.yaml", "results.jsonl", "report.json", "report.md", "costs.json", "optuna.journal"} <= set(keys)
    assert any(k.startswith("tensorboard/") and "events.out.tfevents" in k for k in keys), keys
    assert any(k.endswith(".validate_storage_marker") for k in keys)  # Tune's own check passed, in S3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.yaml"]
    assert any(k.startswith("harvests/") for k in s3_keys(f"{s3_bucket}/runs"))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-m", "dfc_ray.cli", "report", run], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "(n=4)" in out.stdout  # the per-trial timings of all four trials, read from S3
    assert "dfc-ray-test-secret" not in out.stdout + out.stderr


def test_killed_s3_sweep_resumes_from_s3(tiny_pair, s3_bucket, s3_server, tmp_path):
    """SIGKILL a sweep whose run folder is on S3, resume it from another working directory and HOME:
    no finished trial redone or lost, and the Optuna study (journal in S3) holds every trial."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    path = write_spec(tmp_path, tiny_pair, train={"steps": 60, "batch_size": 32, "lr": 1e-3, "warmup_steps": 5,
                                                  "reader": "local", "norm_rows": 256})
    run = f"{s3_bucket}/runs/killed"
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled", "DFC_RAY_LEASE_TIMEOUT": "2"}
    env.pop("RAY_ADDRESS", None)
    command = [sys.executable, "-m", "dfc_ray.cli", "sweep", path, "--run-dir", run, "--no-eval", "--quiet"]
    (tmp_path / "first").mkdir()
    proc = subprocess.Popen(command, env=env, cwd=tmp_path / "first", start_new_session=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and len(s3_results(run)) < 2:
            time.sleep(0.5)
        assert proc.poll() is None, "the sweep ended before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    before = {r["trial_id"]: r for r in s3_results(run)}
    assert 2 <= len(before) < 4
    elsewhere = tmp_path / "second"
    elsewhere.mkdir()
    time.sleep(2)  # the killed driver's lease (it stated 2 s) goes stale; the resume takes it over
    resumed = subprocess.run(command + ["--resume"], env=env | {"HOME": str(elsewhere)}, cwd=elsewhere, timeout=600)
    assert resumed.returncode == 0
    from dfc_ray.fs import RunFolder

    assert "more than its timeout of 2 s" in (RunFolder(run).read_text("lease-takeovers.jsonl") or "")
    after = s3_results(run)
    ids = [r["trial_id"] for r in after]
    assert len(ids) == len(set(ids)) == 4, ids
    for trial_id, record in before.items():
        assert next(r for r in after if r["trial_id"] == trial_id) == record
    assert {(r["config"]["dict_size"], r["config"]["variant"]) for r in after} == \
        {(d, v) for d in (64, 128) for v in ("dfc", "crosscoder")}
    journal = tmp_path / "optuna.journal"
    journal.write_text(RunFolder(run).read_text("optuna.journal"))
    study = optuna.load_study(study_name="tiny", storage=JournalStorage(JournalFileBackend(str(journal))))
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 4  # the trials of both drivers, one study
    assert list(elsewhere.iterdir()) == [] or all(p.name.startswith(".") for p in elsewhere.iterdir())
