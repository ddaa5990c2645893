"""Evaluation and steering actors on a real local Ray cluster: named pools, clean-output cache, crash
recovery mid-request, JSON-able results with the contract's metric names."""

from __future__ import annotations

import json

import pytest
import ray

from actors.evaluator import EvaluatorActor
from actors.pool import PoolConfig, ReplicaPool
from actors.replica import CONCURRENCY_GROUPS, MONITOR
from actors.steering import SteerConfig, SteeringActor, greedy_min_set
from dfc_ray.evaluate import EvalConfig
from dfc_ray.reference import NO_STEERABLE_DIRECTION
from test_interventions import LAYER, make_checkpoint

EVAL = EvalConfig(tasks="organism:test", n_tasks=6, n_texts=4, max_new_tokens=6, batch_size=8, n_bootstrap=200)
STEER = SteerConfig(n_dev=8, n_test=6, n_plain=8, top_n=2, alphas=(0.0, 1.0), min_set_pool=2, min_set_max=2,
                    max_new_tokens=6, batch_size=8, n_bootstrap=200, targets=("a", "b"), primary="a")
TRIAL_METRICS = ("a_clean", "a_splice", "delta_a_pp", "b_clean", "b_splice", "delta_b_pp")
STEER_METRICS = ("steer_feature", "steer_alpha", "steer_target", "steer_delta_pp", "steer_min_set",
                 "steer_reference_pp", "steer_reference_pp_lo", "steer_reference_pp_hi", "steer_reference_sig",
                 "steer_reference_label", "steer_cos_reference", "steer_share_of_reference")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_pair):
    root, pair = tmp_path_factory.mktemp("actors"), tiny_pair
    first = make_checkpoint(pair, root / "dfc1", steps=60)
    second = make_checkpoint(pair, root / "dfc2", steps=120)
    plain = make_checkpoint(pair, root / "plain", a_exclusive=0.0, steps=10)
    return pair, str(first), str(second), str(plain)


@pytest.fixture(scope="module")
def evaluators(ray_cluster, setup):
    pool = ReplicaPool.create(EvaluatorActor, PoolConfig(name="test-eval", num_cpus=1), setup[0], EVAL)
    yield pool
    pool.shutdown()


def test_clean_outputs_are_cached_across_checkpoints_and_metrics_are_named(evaluators, setup):
    _, first, second, _ = setup
    found = ReplicaPool.connect(PoolConfig(name="test-eval"))  # what a Tune trial does: look it up by name
    one = found.call("evaluate", first, LAYER)
    two = found.call("evaluate", second, LAYER)
    assert not one.clean_cached and two.clean_cached
    stats = found.call("stats")
    # one clean set per model, generated once; each evaluation reads it again as its splices' drafts
    assert (stats["clean_misses"], stats["clean_hits"]) == (2, 2 + 2 * 2)
    assert all(stats["prefix_hits"][t] > 0 for t in "ab")  # the second checkpoint re-used the prompts' prefill
    assert one.a_clean == two.a_clean and one.b_clean == two.b_clean  # same clean replies, same rates
    metrics = two.metrics()
    assert set(TRIAL_METRICS) <= set(metrics)
    assert metrics["delta_a_pp"] == pytest.approx(100 * (metrics["a_splice"] - metrics["a_clean"]))
    assert two.loss_a.kl.mean >= 0 and two.loss_a.ce_splice.n == 4
    json.dumps(two.to_dict())
    with pytest.raises(ValueError, match="no actor"):
        ReplicaPool.connect(PoolConfig(name="no-such-pool"))


def test_a_replica_killed_mid_request_is_restarted_and_the_request_completes(ray_cluster, evaluators, setup):
    _, first, _, _ = setup
    handle = evaluators.handles[0]
    pid_before = evaluators.call("stats")["pid"]
    restarts_before = evaluators.restarts()
    slow = EvalConfig(tasks="organism:dev", n_tasks=32, n_texts=8, max_new_tokens=16, n_bootstrap=200)  # uncached
    ref = evaluators.submit("evaluate", first, LAYER, slow)
    ready, _ = ray_cluster.wait([ref], timeout=0.2)
    assert not ready, "the request finished before the kill; make it longer"
    ray_cluster.kill(handle, no_restart=False)  # the process dies; Ray restarts it and re-sends the request
    result = ray_cluster.get(ref, timeout=300)
    assert set(TRIAL_METRICS) <= set(result.metrics())
    assert evaluators.call("stats")["pid"] != pid_before
    assert evaluators.restarts() == restarts_before + 1  # counted for the report (run.judge_restarts)


def test_a_trials_request_goes_to_an_idle_replica_whatever_other_trials_sent(ray_cluster, setup, tmp_path):
    """Each trial connects its own handle (its own in-flight count): while another caller's request runs on one
    replica, a fresh caller's requests go to the other (before, every caller's first request went to replica 0);
    with both idle, callers spread at random. A judge replica counts its trials' requests as busy. Requests sent
    in turn go to one replica and run in order."""
    import random

    from actors.evaluator import Evaluator
    from dfc_ray.pair import pair_fingerprint

    class Held:  # defined here: Ray workers cannot import this test module, so the class travels by value
        """A replica stand-in whose request runs until a file exists: busy for exactly as long as the test says."""

        def __init__(self):
            self.running = 0

        def hold(self, path: str) -> None:
            import os
            import time

            self.running += 1
            try:
                while not os.path.exists(path):
                    time.sleep(0.01)
            finally:
                self.running -= 1

        @ray.method(concurrency_group=MONITOR)
        def busy(self) -> int:
            return self.running

    pair = setup[0]
    judge = Evaluator(pair, EVAL)  # in-process: busy() inside a trial's request is 1, outside 0
    assert judge.busy() == 0 and judge.for_pair(pair_fingerprint(pair), "busy") == 1 and judge.busy() == 0
    cfg = PoolConfig(name="test-held", replicas=2)
    actor = ray_cluster.remote(concurrency_groups=CONCURRENCY_GROUPS)(Held)
    handles = [actor.options(num_cpus=0.1).remote() for _ in range(2)]
    try:
        assert ray_cluster.get([h.busy.remote() for h in handles], timeout=60) == [0, 0]
        running = ReplicaPool(cfg, handles)
        release = tmp_path / "release"
        ref = running.submit("hold", str(release))
        busy = next(i for i, refs in enumerate(running._in_flight) if refs)
        while ray_cluster.get(handles[busy].busy.remote(), timeout=60) == 0:  # answered beside the request
            pass
        other = ReplicaPool(cfg, handles)  # another trial's handle: it knows nothing of `running`'s request
        assert {other._pick() for _ in range(8)} == {1 - busy}
        release.touch()
        ray_cluster.get(ref, timeout=60)
        random.seed(0)
        assert {other._pick() for _ in range(16)} == {0, 1}
        # a trial's steering and localisation: both to one replica, in order; the next caller takes the other
        first, second = tmp_path / "first", tmp_path / "second"
        in_turn = running.submit_in_turn([("hold", (str(first),)), ("hold", (str(second),))])
        together = [i for i, refs in enumerate(running._in_flight) if set(in_turn) <= set(refs)]
        assert len(together) == 1
        while ray_cluster.get(handles[together[0]].busy.remote(), timeout=60) == 0:
            pass
        assert {ReplicaPool(cfg, handles)._pick() for _ in range(8)} == {1 - together[0]}
        second.touch()  # the second request waits for the first: it has not started, so it cannot end
        assert ray_cluster.wait(in_turn, num_returns=1, timeout=1.0)[0] == []
        first.touch()
        ray_cluster.get(in_turn, timeout=60)
    finally:
        for handle in handles:
            ray_cluster.kill(handle)


def test_steering_protocol_reports_design_metrics(ray_cluster, setup):
    pair, first, second, plain = setup
    pool = ReplicaPool.create(SteeringActor, PoolConfig(name="test-steer", num_cpus=1, dispatch="round_robin"),
                              pair, STEER)
    try:
        result = pool.call("steer", first, LAYER)
        again = pool.call("steer", second, LAYER)
        skipped = pool.call("steer", plain, LAYER)
        stats = pool.call("stats")
    finally:
        pool.shutdown()
    metrics = result.metrics()
    assert set(STEER_METRICS) <= set(metrics) and metrics["steer_target"] == "a"
    assert {"steer_b_delta_pp", "steer_random_feature_pp", "steer_random_direction_pp", "steer_b_reference_pp",
            "steer_b_cos_reference"} <= set(metrics)
    a = result.targets["a"]
    candidates = list(dict.fromkeys(f for picks in a.candidates.values() for f in picks))
    assert set(a.candidates) == set(STEER.rankings) and all(len(p) <= 2 for p in a.candidates.values())
    assert len(a.grid) == 2 * len(candidates) and a.alpha in (0.0, 1.0) and a.feature in candidates
    assert a.random_feature != a.feature and a.delta_pp.n == 6
    assert result.ranking == sorted(result.ranking, key=lambda s: (-s.cohens_d, -s.auroc, s.feature))
    assert -1 <= metrics["steer_cos_reference"] <= 1 and metrics["steer_reference_sig"] in (0, 1)
    assert metrics["steer_reference_label"] == ("" if a.reference.delta_pp.lo > 0 else NO_STEERABLE_DIRECTION)
    # the reference does not depend on the checkpoint: run once per target, re-used for the second one
    assert stats["reference_runs"] == 2 and again.targets["a"].reference == a.reference
    json.dumps(result.to_dict())
    assert skipped.skipped and set(skipped.metrics()) == {"steer_compute_s"}  # no steer_* numbers


def test_greedy_min_set_finds_the_smallest_greedy_set():
    gains = {1: 0.2, 2: 0.1, 3: 0.05}

    def gain(fs):  # additive, plus a bonus for {2, 3} together that greedy cannot see in round one
        return sum(gains[f] for f in fs) + (0.3 if {2, 3} <= set(fs) else 0)

    assert greedy_min_set([1, 2, 3], gain, 0.15, 3) == [1]
    assert greedy_min_set([1, 2, 3], gain, 0.25, 3) == [1, 2]
    assert greedy_min_set([1, 2, 3], gain, 0.9, 2) == []
    assert greedy_min_set([1, 2, 3], gain, 0.6, 3) == [1, 2, 3]


def test_eval_and_steer_commands_print_tables(setup, capsys):
    import argparse

    from dfc_ray.commands.evaluate import add_cli

    pair, first, _, _ = setup
    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers())
    common = ["--layer", str(LAYER), "--pair-a", pair.a, "--pair-b", pair.b, "--tokenizer", pair.tokenizer,
              "--max-new-tokens", "4", "--batch-size", "8"]
    args = parser.parse_args(["eval", first, *common, "--n-tasks", "3", "--n-texts", "2"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "a_splice" in out and "Δ A" in out
    args = parser.parse_args(["steer", first, *common, "--n-dev", "6", "--n-test", "3", "--top-n", "1",
                              "--alphas", "2"])
    assert args.func(args) == 0
    assert "AUROC" in capsys.readouterr().out
    with pytest.raises(ValueError, match="layer 7"):
        args = parser.parse_args(["eval", first, *common[2:], "--layer", "7", "--n-tasks", "1"])
        args.func(args)
