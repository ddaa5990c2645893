"""S3 unavailable for ~20 s (the server frozen with SIGSTOP, as in a network outage): what a sweep's
S3 reads and writes do. They wait and then complete; nothing written before is lost or changed."""

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


def test_run_folder_rides_through_a_frozen_s3_server(s3):
    from dfc_ray.fs import RunFolder

    run = RunFolder(f"{s3.create_bucket('outage')}/runs/x")
    run.write_text("results.jsonl", '{"trial_id": "a"}\n')
    outcome: dict = {}

    def append() -> None:  # what ResultsWriter does when a trial finishes: read, then write the whole file
        started = time.perf_counter()
        try:
            text = run.read_text("results.jsonl")
            run.write_text("results.jsonl", text + '{"trial_id": "b"}\n')
            outcome["ok"] = True
        except Exception as err:  # recorded: the test reports what a sweep would see
            outcome["error"] = f"{type(err).__name__}: {err}"
        outcome["seconds"] = time.perf_counter() - started

    s3.pause_s3()
    writer = threading.Thread(target=append, daemon=True)
    writer.start()
    writer.join(OUTAGE_S)
    assert writer.is_alive(), f"expected the request to wait for the frozen server, got {outcome}"
    s3.resume_s3()
    writer.join(120)
    assert not writer.is_alive(), "the request did not finish within 120 s after S3 came back"
    print(f"append during a {OUTAGE_S} s outage: {outcome}")
    assert outcome.get("ok"), outcome
    assert outcome["seconds"] >= OUTAGE_S
    assert run.read_text("results.jsonl") == '{"trial_id": "a"}\n{"trial_id": "b"}\n'
