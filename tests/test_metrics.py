"""The metric registry: every key the producers emit is registered, formats, and one line adds a metric."""

from __future__ import annotations

import json

import pytest

from actors.steering import GridCell, SteerResult, TargetSteer
from dfc_ray import metrics
from dfc_ray.crosscoder import DFCConfig
from dfc_ray.evaluate import EvalResult, Rate, SpliceLoss, ToolRates
from dfc_ray.ranking import FeatureStats
from dfc_ray.report import LiveView, TrialResult, build_report, sections
from dfc_ray.sweep import judge_metrics
from dfc_ray.sweep.trial import training_report
from dfc_ray.synthetic import PlantedConfig, PlantedFeatures
from dfc_ray.train import TrainConfig, train


def rate(mean: float) -> Rate:
    return Rate(mean, mean - 0.05, mean + 0.05, 8)


def tool_rates(mean: float) -> ToolRates:
    return ToolRates(rate(mean), rate(mean + 0.1), rate(mean + 0.15), rate(0.9), rate(0.8))


def eval_result() -> EvalResult:
    loss = SpliceLoss(rate(2.0), rate(2.3), rate(0.1))
    return EvalResult("ckpt", 1, {}, tool_rates(0.25), tool_rates(0.5), tool_rates(0.125), tool_rates(0.25),
                      rate(25.0), rate(12.5), loss, loss, clean_cached=False, seconds=3.0)


def target(name: str) -> TargetSteer:
    grid = [GridCell(7, alpha, 0.25 + alpha / 100) for alpha in (0.0, 4.0, 8.0)] + [GridCell(3, 4.0, 0.2)]
    return TargetSteer(name, 7, 8.0, 1.5, 12.0, 0.25, 0.33, grid, rate(0.25), rate(0.5), rate(25.0), 3, rate(2.0),
                       rate(-1.0), [7, 3], 10.0)


def steer_result() -> SteerResult:
    ranking = [FeatureStats(f, 1.0 - f / 10, 0.8, 0.5, 0.1, 0.6, 0.1, 0.9) for f in range(6)]
    return SteerResult("ckpt", 1, {"primary": "b"}, "", ranking, {"a": target("a"), "b": target("b")}, seconds=2.0)


def trained_metrics() -> tuple[dict[str, float], dict[str, float]]:
    """(a training step's metrics, the final ones) of a real 4-step training on planted features."""
    planted = PlantedFeatures(PlantedConfig())
    steps: list[dict[str, float]] = []
    result = train(DFCConfig(d_model=planted.cfg.d_model, dict_size=64, k=4, a_exclusive=0.1, b_exclusive=0.1),
                   TrainConfig(steps=4, warmup_steps=1, norm_rows=64), planted.batches(32),
                   on_metrics=lambda name, step, m: steps.append(m))
    assert result.status == "ok" and steps
    return steps[-1], result.metrics


def test_every_produced_key_is_registered():
    step, final = trained_metrics()
    seconds = {"eval_s": 3.5, "steer_s": 2.5}  # judge_checkpoint's wait times, named as it names them
    produced = {
        "EvalResult.metrics": eval_result().metrics(),
        "SteerResult.metrics": steer_result().metrics(),
        "judge_metrics": judge_metrics(eval_result(), steer_result(), seconds),
        "training step": training_report(step),
        "training result": training_report(final),
    }
    for producer, values in produced.items():
        assert values, producer
        unregistered = sorted(k for k in values if metrics.find(k) is None)
        assert not unregistered, f"{producer} emits unregistered metrics {unregistered}: add them to dfc_ray/metrics.py"
    assert "steer_a_random_direction_pp" in produced["SteerResult.metrics"]  # per-target keys took the pattern
    assert produced["training step"]["fvu"] == pytest.approx((step["fvu_a"] + step["fvu_b"]) / 2)


def test_lookup_rejects_what_is_not_declared():
    assert metrics.find("steer_b_delta_pp") is metrics.REGISTRY["steer_delta_pp"]
    assert metrics.find("steer_b_target") is None  # steer_target is the primary's name only, not a family
    for name in ("made_up", "steer_a_made_up", "delta_c_pp"):
        assert metrics.find(name) is None
    assert len(metrics.REGISTRY) == len(metrics.METRICS)  # no name declared twice
    for h in metrics.HEADLINE:
        assert h.metric in metrics.REGISTRY, h


def test_formats():
    assert metrics.fmt("a_clean", 0.25) == "25.0%"
    assert metrics.fmt("delta_a_pp", 3) == "+3.0" and metrics.fmt("steer_b_delta_pp", -2.04) == "-2.0"
    assert metrics.fmt("fvu_a", 0.12345) == "0.123" and metrics.fmt("auroc", 0.666) == "0.67"
    assert metrics.fmt("steer_min_set", -1) == "not reached" and metrics.fmt("steer_min_set", 2) == "2"
    assert metrics.fmt("dict_size", 128) == "128" and metrics.fmt("lr", 0.00012345) == "0.000123"
    assert metrics.fmt("delta_a_pp", None) == "—" and metrics.fmt("steer_target", "a") == "a"
    assert metrics.fmt("delta_a_pp", float("nan")) == "nan"


def test_a_new_metric_is_one_registry_line(monkeypatch):
    line = metrics.metric("splice_kl_a", "KL A", "nats", shows=("axis", "live", "trials"))
    monkeypatch.setattr(metrics, "METRICS", metrics.METRICS + (line,))
    monkeypatch.setattr(metrics, "REGISTRY", metrics.REGISTRY | {line.name: line})
    trials = [TrialResult(f"t{i}", {"k": k}, {"delta_a_pp": 10.0 * i, "splice_kl_a": 0.5 + i})
              for i, k in enumerate((4, 8, 8))]
    report = json.loads(json.dumps(build_report(trials)))
    assert report["per_axis"]["k"][1]["splice_kl_a"] == {"mean": 2.0, "std": pytest.approx(0.7071, abs=1e-4), "n": 2}
    by_title = {s.title: s for s in sections(report)}
    assert by_title["By k"].columns[-1] == "KL A" and by_title["By k"].rows[1][-1] == "2 ± 0.707 (n=2)"
    assert by_title["Trials (by Δ A)"].columns[-1] == "KL A" and by_title["Trials (by Δ A)"].rows[0][-1] == "2.5"
    view = LiveView(total=1)
    assert "KL A" in [c.header for c in view.render(200, 30).renderables[1].columns]  # room for every live metric
