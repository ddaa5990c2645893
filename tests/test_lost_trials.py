"""Trials the cluster lost (a node, an actor or a judge replica died) are told from trials that failed
on their own, and only the former are owed again: no cluster needed, the error texts are Ray's own
exceptions rendered the way Tune writes them into a trial's error file (`str(exc)` per failure)."""

from __future__ import annotations

import json
import traceback

import pytest
import ray.exceptions

from actors.pool import ReplicaUnavailable
from dfc_ray.failures import lost_to_infrastructure, parse_traceback
from dfc_ray.fs import RunFolder
from dfc_ray.spaces import load_spec
from dfc_ray.sweep import read_results, remaining_work
from dfc_ray.sweep.results import set_aside_lost


def tune_error_file(*errors: BaseException) -> str:
    """What Tune's Trial.handle_error appends for each failure."""
    return "".join(f"Failure # {i} (occurred at 2026-11-29_14-00-0{i})\n{error}\n" for i, error in enumerate(errors, 1))


def raised_in_trial(error: Exception) -> ray.exceptions.RayTaskError:
    """`error` raised inside a trial, as the driver receives it (a RayTaskError carrying the traceback)."""
    try:
        raise error
    except Exception as exc:
        return ray.exceptions.RayTaskError("ImplicitFunc.train", traceback.format_exc(), exc, actor_id="01" * 16)


def actor_died_with_its_node() -> ray.exceptions.ActorDiedError:
    context = ray.exceptions.ActorDiedErrorContext(
        class_name="ImplicitFunc", actor_id=b"\x01" * 16, pid=4242, node_ip_address="127.0.0.1",
        error_message="The actor is dead because its node has died. Node Id: 5a7e")
    return ray.exceptions.ActorDiedError(context)


@pytest.mark.parametrize("errors, kind", [
    ((actor_died_with_its_node(),), "ActorDiedError"),
    ((ray.exceptions.WorkerCrashedError(),), "WorkerCrashedError"),
    ((ray.exceptions.RayActorError(),), "RayActorError"),
    ((ray.exceptions.ActorUnavailableError("node 5a7e died", b"\x02" * 16),), "ActorUnavailableError"),
    # a trial whose judge request hit the lost node, and one that gave up on a replica still restarting
    ((raised_in_trial(ray.exceptions.ActorUnavailableError("node 5a7e died", b"\x02" * 16)),), "ActorUnavailableError"),
    ((raised_in_trial(ReplicaUnavailable("judge replica smoke-evaluator[0] not alive for 120 s")),),
     "ReplicaUnavailable"),
    # the last failure decides: a trial that first raised, then lost its node
    ((raised_in_trial(ValueError("lr must be > 0")), actor_died_with_its_node()), "ActorDiedError"),
])
def test_a_trial_lost_with_its_node_actor_or_judge_is_owed_again(errors, kind):
    error = parse_traceback(tune_error_file(*errors))
    assert error.type == kind
    assert lost_to_infrastructure({"status": "failed", "error_type": error.type, "error": error.message})


@pytest.mark.parametrize("errors, kind", [
    ((raised_in_trial(ValueError("lr must be > 0")),), "ValueError"),
    ((raised_in_trial(FloatingPointError("loss is nan")),), "FloatingPointError"),
    # an actor that died of its own constructor's error is the trial's fault, not the cluster's
    ((ray.exceptions.ActorDiedError(raised_in_trial(ImportError("no module x"))),), "ImportError"),
    # lost first, then raised on the retry: the trial's own error stands
    ((actor_died_with_its_node(), raised_in_trial(ValueError("bad"))), "ValueError"),
])
def test_a_trial_that_failed_on_its_own_is_not_retried(errors, kind):
    error = parse_traceback(tune_error_file(*errors))
    assert error.type == kind
    assert not lost_to_infrastructure({"status": "failed", "error_type": error.type, "error": error.message})


S3_AWAY = "AWS Error NETWORK_CONNECTION during GetObject operation: curlCode: 28, Timeout was reached; Details: " \
    "Operation too slow. Less than 1 bytes/sec transferred the last 5 seconds"
"""What a trial reading a shard raised while the S3 server was frozen (benchmarks/s3_outage_multinode.py)."""


def botocore_error(name: str) -> Exception:
    import botocore.exceptions  # deferred: only these cases need botocore

    return getattr(botocore.exceptions, name)(endpoint_url="http://127.0.0.1:9/bucket/key")


@pytest.mark.parametrize("error, lost", [
    (OSError(S3_AWAY), True),
    (OSError("AWS Error NETWORK_CONNECTION during PutObject operation: curlCode: 7, Couldn't connect to server"), True),
    (botocore_error("ReadTimeoutError"), True),
    (botocore_error("ConnectTimeoutError"), True),
    (botocore_error("EndpointConnectionError"), True),
    (OSError("AWS Error ACCESS_DENIED during PutObject operation: Access Denied"), False),  # an answer, a refusal
    (FileNotFoundError("s3://bucket/runs/x/checkpoints/t1/model.safetensors"), False),
])
def test_a_trial_that_found_s3_away_is_owed_again_and_one_that_s3_refused_is_not(error, lost):
    """S3 that timed out or was unreachable is an outage: the trial is run again (by the driver's next
    round or a `--resume`); an S3 answer that refuses is the trial's own failure."""
    found = parse_traceback(tune_error_file(raised_in_trial(error)))
    assert found.type == type(error).__name__
    record = {"status": "failed", "error_type": found.type, "error": f"{found.type}: {found.message} (traceback: …)"}
    assert lost_to_infrastructure(record) is lost


def test_only_failed_records_count_and_old_records_are_read_from_their_error_text():
    assert not lost_to_infrastructure({"status": "ok", "error_type": "ActorDiedError"})
    assert not lost_to_infrastructure({"status": "diverged", "error": "loss diverged at step 12"})
    assert not lost_to_infrastructure({"status": "failed", "error": "no result"})
    assert lost_to_infrastructure({"status": "failed", "error": "ActorUnavailableError: The actor ab is unavailable"})


def record(trial_id: str, k: int, variant: str, status: str = "ok", error_type: str = "") -> dict:
    config = {"dict_size": 768, "k": k, "variant": variant}
    return {"trial_id": trial_id, "config": config, "metrics": {}, "status": status} | (
        {"error": f"{error_type}: …", "error_type": error_type} if error_type else {})


SMOKE_RECORDS = [record("t1", 8, "dfc-10pct"),
                 record("t3", 8, "crosscoder", "failed", "ActorDiedError"),      # its node was killed
                 record("t4", 16, "dfc-10pct", "failed", "ValueError")]          # raised on its own
"""cluster-smoke's grid is k ∈ {8, 16} × {dfc-10pct, crosscoder}; (16, crosscoder) never ran."""


def test_owed_after_infrastructure_failures_are_the_lost_and_the_never_run_points():
    spec = load_spec("cluster-smoke")
    assert len(spec.grid_points()) == 4
    n_todo, points = remaining_work(spec, SMOKE_RECORDS)
    assert n_todo == 2
    assert sorted((p["k"], p["variant"]) for p in points) == [(8, "crosscoder"), (16, "crosscoder")]
    judge_down = record("t5", 16, "crosscoder", "failed", "ReplicaUnavailable")  # its judge stayed down
    assert remaining_work(spec, SMOKE_RECORDS + [judge_down])[0] == 2


def test_lost_records_move_to_retried_jsonl_and_results_keep_each_point_once(tmp_path):
    run = RunFolder(str(tmp_path / "run"), create=True)
    run.write_text("results.jsonl", "".join(json.dumps(r) + "\n" for r in SMOKE_RECORDS))
    lost = set_aside_lost(run)
    assert [r["trial_id"] for r in lost] == ["t3"]
    assert read_results(run) == [SMOKE_RECORDS[0], SMOKE_RECORDS[2]]  # order and content kept
    retried = [json.loads(line) for line in run.read_text("retried.jsonl").splitlines()]
    assert retried == [SMOKE_RECORDS[1]]
    assert set_aside_lost(run) == []  # nothing moves twice

    # The retry of t3 is lost again, then the next round's trial succeeds: history keeps both losses.
    again = record("t6", 8, "crosscoder", "failed", "NodeDiedError")
    run.write_text("results.jsonl", run.read_text("results.jsonl") + json.dumps(again) + "\n")
    assert set_aside_lost(run) == [again]
    assert [json.loads(line)["trial_id"] for line in run.read_text("retried.jsonl").splitlines()] == ["t3", "t6"]
    assert remaining_work(load_spec("cluster-smoke"), read_results(run))[0] == 2


# ---------------------------------------------------------------- judges that vanished when two drivers met (#31.2)


def test_a_trial_whose_judges_vanished_is_owed_again_also_from_an_old_record():
    """Another driver's exit ended the pools a trial judged with ("pool '…-evaluator': no actor"): the cluster
    lost the trial. Records written before PoolMissingError existed say ValueError; they are owed again too."""
    from actors.pool import PoolMissingError

    text = "pool 'tiny-1a2b3c4d-evaluator': no actor 'tiny-1a2b3c4d-evaluator-0' in namespace 'dfc-ray'; " \
        "expected a pool created with ReplicaPool.create"
    error = parse_traceback(tune_error_file(raised_in_trial(PoolMissingError(text))))
    assert error.type == "PoolMissingError"
    assert lost_to_infrastructure({"status": "failed", "error_type": error.type, "error": error.message})
    old = {"status": "failed", "error_type": "ValueError", "error": f"ValueError: {text} (traceback: …)"}
    assert lost_to_infrastructure(old)
    assert not lost_to_infrastructure(old | {"error": "ValueError: pool size must be > 0"})
    spec = load_spec("cluster-smoke")
    done = [record(f"t{i}", k, v) for i, (k, v) in enumerate([(8, "dfc-10pct"), (8, "crosscoder"), (16, "dfc-10pct")])]
    vanished = record("t9", 16, "crosscoder", "failed", "ValueError") | {"error": old["error"]}
    n_todo, points = remaining_work(spec, done + [vanished])
    assert n_todo == 1 and [(p["k"], p["variant"]) for p in points] == [(16, "crosscoder")]
