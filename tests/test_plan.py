"""`dfc-ray sweep --plan`: counted work against a real harvest, the FLOP model against torch's FLOP
counter, measured rates through costs.json, and the CLI on the shipped specs."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml

from dfc_ray.plan import ModelShape, Rates, load_rates, measure_rates, plan_work, train_flops
from dfc_ray.spaces import load_spec

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


def small_spec(tmp_path: Path, pair, positions: str):
    spec = {"name": "small", "pair": {"a": pair.a, "b": pair.b, "tokenizer": pair.tokenizer}, "layers": [0, 1],
            "harvest": {"tasks": "organism:dev", "n_tasks": 12, "plain_text": "organism", "n_plain": 6,
                        "positions": positions, "batch_size": 8, "dtype": "float16"},
            "crosscoder": {"k": 4}, "train": {"steps": 10, "batch_size": 32, "reader": "local"},
            "grid": {"dict_size": [64, 128]}}
    path = tmp_path / f"small-{positions}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return load_spec(str(path))


@pytest.mark.parametrize("positions", ["last_prompt_token", "all_tokens"])
def test_counted_rows_and_bytes_match_a_real_harvest(tiny_pair, tmp_path, positions):
    from dfc_ray.harvest import harvest
    from dfc_ray.store import validate_store

    spec = small_spec(tmp_path, tiny_pair, positions)
    work = plan_work(spec)
    cfg = replace(spec.harvest, store=str(tmp_path / "store"))
    result = harvest(cfg, use_ray=False, progress=False)
    if positions == "last_prompt_token":
        assert work.rows_per_layer == result.rows == work.prompts == 18
    else:  # every token, minus the attention sinks the harvest drops: the plan is an upper bound
        assert result.rows <= work.rows_per_layer <= 1.05 * result.rows
    assert work.tokens_exact and work.bytes_per_layer == work.rows_per_layer * 2 * 32 * 2
    for layer in spec.layers:  # what a store really holds: the activations, plus parquet framing (a few KB per shard)
        manifest = validate_store(result.uri, layer)
        stored = sum(shard["bytes"] for shard in manifest.shards)
        assert manifest.total_rows == result.rows
        assert result.rows * 2 * 32 * 2 <= stored <= 1.2 * work.bytes_per_layer + 4096
    assert work.n_trials == 2 and work.train_flops == [train_flops(32, d, 32, 10) for d in (64, 128)]


def test_shape_and_forward_flops_match_the_model_and_torchs_flop_counter(tiny_pair):
    from torch.utils.flop_counter import FlopCounterMode

    from dfc_ray.pair import load_config, load_model

    shape = ModelShape.from_config(load_config(tiny_pair, "b"))
    model = load_model(tiny_pair, "b")
    weights = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2)  # matrices: no norms, no biases
    assert shape.params == weights
    tokens = 48
    ids = torch.randint(0, shape.vocab, (1, tokens))
    model.config._attn_implementation = "eager"  # attention as matmuls, which the counter sees (fused SDPA it does not)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(input_ids=ids)
    # torch counts the full (non-causal) attention matrix: mean context = all tokens
    planned = tokens * shape.forward_flops(shape.n_layers, context=tokens, lm_head=True)
    assert planned == pytest.approx(counter.get_total_flops(), rel=1e-3)


def test_rates_from_a_run_turn_flops_into_seconds(tiny_pair, tmp_path):
    spec = small_spec(tmp_path, tiny_pair, "last_prompt_token")
    work = plan_work(spec)
    results = [{"status": "ok", "config": {"dict_size": d, "batch_size": 32, "a_exclusive": share},
                "metrics": {"steps": 10, "train_s": 2.0, "eval_compute_s": 1.0, "steer_compute_s": 3.0}}
               for d, share in ((64, 0.1), (128, 0.0))]  # a plain crosscoder is not steered
    results.append({"status": "failed", "config": {"dict_size": 64, "batch_size": 32}, "metrics": {"train_s": 99.0}})
    rates = measure_rates(spec, results, {"harvest": 4.0}, reused_harvest=False, device="test")
    assert rates.train == pytest.approx(sum(work.train_flops) / 4.0)
    assert rates.judge == pytest.approx((work.judge_setup_flops + 2 * work.eval_flops + work.steer_flops) / 8.0)
    assert rates.harvest == pytest.approx(work.harvest_flops / 4.0)
    assert measure_rates(spec, results, {"harvest": 4.0}, reused_harvest=True, device="test").harvest is None
    (tmp_path / "run").mkdir()
    (tmp_path / "run/costs.json").write_text(json.dumps(rates.__dict__))
    assert load_rates(str(tmp_path / "run")) == rates
    assert rates.seconds("train", sum(work.train_flops)) == pytest.approx(4.0)
    with pytest.raises(FileNotFoundError, match="no costs.json"):
        load_rates(str(tmp_path / "nothing"))


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "COLUMNS": "400"}
    return subprocess.run([sys.executable, "-m", "dfc_ray.cli", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def test_plan_cli_on_the_shipped_specs(tmp_path):
    out = run_cli("sweep", "--plan", "organism48")
    assert out.returncode == 0, out.stderr
    assert "165,213 rows per layer" in out.stdout and "48 trials" in out.stdout and "no measured rates" in out.stdout
    assert "To get CPU rates: run any sweep on CPU" in out.stdout and "?" not in out.stdout
    costs = tmp_path / "costs.json"
    costs.write_text(json.dumps(Rates("NVIDIA H200 (test)", "gpu_judges (d_model 192, 4 blocks)", 192, 1e9, 1e9, 1e9,
                                      per_device=True).__dict__))
    out = run_cli("sweep", "--plan", "paper48", "--costs", str(costs))
    assert out.returncode == 0, out.stderr
    assert "published config of Qwen/Qwen2.5-3B" in out.stdout
    assert "width rule: measured at d_model 192, planned at d_model 2048" in out.stdout
    assert "device time" in out.stdout and "memory: evaluator replica" in out.stdout
    assert out.stdout.count("H200-h") >= 4 and "(H200-hours; " in out.stdout  # every stage, and what dominates
    bad = run_cli("sweep", "--plan", "organism48", "--costs", str(tmp_path / "missing"))
    assert bad.returncode != 0 and "no costs.json" in bad.stderr


def test_per_device_rates_give_device_hours_whatever_share_a_worker_holds():
    """A rate of one whole device (benchmarks/gpu_judges.py) turns FLOPs into device-hours directly; a run's
    rate is one worker's at the spec's share of a device (paper48: four trials per GPU)."""
    from dfc_ray.plan import device_seconds

    spec = load_spec("paper48")
    work = plan_work(spec)
    run = Rates("NVIDIA H200", "a run", 2048, 1e14, 2e14, 5e13)
    whole = device_seconds(spec, work, replace(run, per_device=True))
    assert whole["train"] == pytest.approx(sum(work.train_flops) / 2e14)
    assert whole["judge"] == pytest.approx(work.judge_flops_total / 5e13)
    assert whole["harvest"] == pytest.approx(work.harvest_flops / 1e14)
    shared = device_seconds(spec, work, run)
    assert shared["train"] == pytest.approx(whole["train"] * spec.resources.gpu) and spec.resources.gpu == 0.25
    assert shared["judge"] == pytest.approx(whole["judge"]) and run.device_label() == "H200"


def test_a_resumed_run_keeps_the_harvest_rate_its_first_attempt_measured(tiny_pair, tmp_path):
    from dfc_ray.fs import RunFolder
    from dfc_ray.sweep import _write_costs

    spec = small_spec(tmp_path, tiny_pair, "last_prompt_token")
    run = RunFolder(str(tmp_path / "run"))
    run.write_text("results.jsonl", "")
    _write_costs(spec, run, {"harvest": 2.0}, reused_harvest=False)
    first = load_rates(run.uri)
    assert first.harvest == pytest.approx(plan_work(spec).harvest_flops / 2.0) and first.train is None
    _write_costs(spec, run, {"harvest": 0.1}, reused_harvest=True)  # the resume found the harvest done
    assert load_rates(run.uri).harvest == first.harvest


def test_a_spec_without_steps_is_planned_at_trainconfigs_default(tmp_path):
    """The trial trains TrainConfig's default number of steps when a spec sets none; the plan counts
    the same (it used to assume 1000 of its own)."""
    from dfc_ray.config import TrainConfig

    path = tmp_path / "nosteps.yaml"
    path.write_text(yaml.safe_dump({"extends": "organism48", "train": {"steps": None}}))
    spec = load_spec(str(path))
    assert "steps" not in spec.train
    work = plan_work(spec)
    trial = spec.trial_settings(spec.grid_points()[0])
    expected = train_flops(work.shape.d_model, trial["dict_size"], trial["batch_size"], TrainConfig().steps)
    assert work.train_flops[0] == pytest.approx(expected)


CPU_RATES = Rates("cpu (2 cores, 2 torch threads)", "organism48 (d_model 192, 4 blocks)", 192, 4e10, 9e10, 3e10)


def test_rates_of_another_device_class_are_refused_and_another_width_is_scaled_by_a_printed_rule():
    """CPU rates cannot plan a sweep on GPUs (paper48 came out at 9,129 h from organism48's costs.json), nor GPU
    rates a CPU sweep; rates of the same class at another d_model are used by the width rule, which is printed."""
    from dfc_ray.plan import rates_rule

    paper, organism = load_spec("paper48"), load_spec("organism48")
    paper_work, organism_work = plan_work(paper), plan_work(organism)
    with pytest.raises(ValueError) as err:
        rates_rule(paper, paper_work, CPU_RATES)
    assert "cannot plan paper48, which runs on GPUs" in str(err.value) and "benchmarks/gpu_judges.py" in str(err.value)
    assert "\n" not in str(err.value)
    h200 = Rates("NVIDIA H200", "gpu_judges (d_model 192, 4 blocks)", 192, 1e13, 1e13, 1e13, per_device=True)
    with pytest.raises(ValueError, match="cannot plan organism48, which runs on CPUs .* `dfc-ray sweep organism48`"):
        rates_rule(organism, organism_work, h200)
    rule = rates_rule(paper, paper_work, h200)
    assert rule[1].startswith("width rule: measured at d_model 192, planned at d_model 2048 (×10.7)")
    assert rule[1].endswith("an upper bound")
    assert len(rates_rule(organism, organism_work, CPU_RATES)) == 1  # the same width: no rule to apply


def test_a_cpu_plan_counts_cpu_hours_and_trials_per_cpu():
    from dfc_ray.plan import plan_table

    spec = load_spec("organism48")
    work = plan_work(spec)
    rows = {stage: cost for stage, _, cost in plan_table(spec, work, CPU_RATES)}
    train = sum(work.train_flops) / CPU_RATES.train
    assert f"{train:.0f} s of trial time = {train * 0.5 / 3600:.3g} CPU-h at 0.5 CPU per trial" in rows["train"]
    assert "at 0.25 CPU per judge replica" in rows["judge"] and rows["total"].endswith(" CPU-h")
    assert not any("GPU" in cost for cost in rows.values())
    assert rows["actors"] == "2 trials per CPU"
    smoke = load_spec("cluster-smoke")
    assert dict((s, c) for s, _, c in plan_table(smoke, plan_work(smoke), None))["actors"] == \
        "at most 2 trials at once; one trial per CPU"
    unmeasured = {stage: cost for stage, _, cost in plan_table(spec, work, None)}
    assert unmeasured["train"].endswith("device time: needs measured rates (below)")
