"""S3 unavailable for ~20 s (the server frozen with SIGSTOP, as in a network outage): what a sweep's
S3 reads and writes do. With the default retries they give up with one line inside the outage (a later
`--resume` finishes the sweep); with more attempts they wait and complete. Nothing written before is
lost or changed either way (docs/failure-modes.md)."""

from __future__ import annotations

import threading
import time

import pytest
from multinode import LocalCluster

OUTAGE_S = 20


@pytest.fixture
def s3(monkeypatch):
    cluster = LocalCluster(workers=0)
    try:
        cluster.start_s3()
        for key, value in cluster.s3_env().items():
            monkeypatch.setenv(key, value)
        yield cluster
    finally:
        cluster.resume_s3()
        cluster.down()


def _append_during_outage(s3, run, outcome: dict) -> threading.Thread:
    """What ResultsWriter does when a trial finishes (read, then write the whole file), started while
    the server is frozen."""
    from dfc_ray.fs import storage_failure

    def append() -> None:
        started = time.perf_counter()
        try:
            text = run.read_text("results.jsonl")
            run.write_text("results.jsonl", text + '{"trial_id": "b"}\n')
            outcome["ok"] = True
        except Exception as err:  # recorded: the test reports what a sweep would see
            outcome["error"] = storage_failure(err) or f"{type(err).__name__}: {err}"
        outcome["seconds"] = time.perf_counter() - started

    s3.pause_s3()
    writer = threading.Thread(target=append, daemon=True)
    writer.start()
    return writer


def test_an_outage_longer_than_the_retries_fails_with_one_line_and_loses_nothing(s3):
    """Default settings (5 s timeout, 3 attempts): the request gives up inside the outage with one
    line naming the endpoint; what was written before is intact, and the same write succeeds once S3
    is back (what `--resume` does)."""
    from dfc_ray.fs import RunFolder

    run = RunFolder(f"{s3.create_bucket('outage')}/runs/x")
    run.write_text("results.jsonl", '{"trial_id": "a"}\n')
    outcome: dict = {}
    writer = _append_during_outage(s3, run, outcome)
    writer.join(OUTAGE_S + 15)
    s3.resume_s3()
    writer.join(60)
    print(f"append during a {OUTAGE_S} s outage, default retries: {outcome}")
    assert not outcome.get("ok") and "error" in outcome, outcome
    assert "\n" not in outcome["error"] and "127.0.0.1" in outcome["error"], outcome
    assert run.read_text("results.jsonl") == '{"trial_id": "a"}\n'
    run.write_text("results.jsonl", run.read_text("results.jsonl") + '{"trial_id": "b"}\n')
    assert run.read_text("results.jsonl") == '{"trial_id": "a"}\n{"trial_id": "b"}\n'


def test_with_more_attempts_the_run_folder_rides_through(s3, monkeypatch):
    """DFC_RAY_S3_ATTEMPTS=10 (~50 s of retries): the request waits out a 20 s outage and completes."""
    from dfc_ray.fs import ATTEMPTS_ENV, RunFolder

    monkeypatch.setenv(ATTEMPTS_ENV, "10")
    run = RunFolder(f"{s3.create_bucket('outage2')}/runs/x")
    run.write_text("results.jsonl", '{"trial_id": "a"}\n')
    outcome: dict = {}
    writer = _append_during_outage(s3, run, outcome)
    writer.join(OUTAGE_S)
    assert writer.is_alive(), f"expected the request to wait for the frozen server, got {outcome}"
    s3.resume_s3()
    writer.join(120)
    assert not writer.is_alive(), "the request did not finish within 120 s after S3 came back"
    print(f"append during a {OUTAGE_S} s outage, 10 attempts: {outcome}")
    assert outcome.get("ok"), outcome
    assert outcome["seconds"] >= OUTAGE_S
    assert run.read_text("results.jsonl") == '{"trial_id": "a"}\n{"trial_id": "b"}\n'
