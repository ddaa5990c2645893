"""`dfc-ray sweep` on tiny non-Qwen pairs (a Llama and a Gemma-2 pair of tests/test_families.py): two trials are
harvested, trained, judged by the evaluator and steering pools, and reported, on a real local Ray cluster."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from test_families import BY_NAME, LAYER, base_tokenizer, build_family_pair

from dfc_ray.spaces import load_spec

RAY_CPUS = 4
"""Logical CPUs of this module's cluster (conftest `ray_cluster`): one trial and two judges at a time."""


@pytest.mark.parametrize("name", ["llama", "gemma2"])
def test_a_two_trial_sweep_finishes_on_a_non_qwen_pair(name, ray_cluster, tmp_path):
    from dfc_ray.sweep import run_sweep

    pair = build_family_pair(BY_NAME[name], base_tokenizer(tmp_path / "organism-tokenizer"), tmp_path / name)
    spec = {
        "name": f"family-{name}",
        "pair": {"a": pair.a, "b": pair.b, "tokenizer": pair.tokenizer},
        "layers": [LAYER],
        "harvest": {"tasks": "organism:dev", "n_tasks": 8, "plain_text": "organism", "n_plain": 8,
                    "positions": "all_tokens", "batch_size": 8},
        "crosscoder": {"k": 16, "aux_k": 8, "a_exclusive": 0.25, "b_exclusive": 0.1},  # A-exclusive features fire
        "train": {"steps": 10, "batch_size": 32, "lr": 1e-3, "warmup_steps": 2, "reader": "local", "norm_rows": 128},
        "grid": {"dict_size": [64, 128]},
        "eval": {"tasks": "organism:test", "n_tasks": 4, "n_texts": 2, "max_new_tokens": 6, "batch_size": 4,
                 "n_bootstrap": 20},
        "steering": {"n_dev": 6, "n_test": 4, "n_plain": 2, "top_n": 1, "alphas": [0.8], "targets": ["a"],
                     "primary": "a", "rankings": ["cohens_d"], "min_set_pool": 1, "min_set_max": 1,
                     "max_new_tokens": 6, "batch_size": 6, "n_bootstrap": 20},
        "resources": {"cpu": 1, "max_concurrent": 1, "evaluator_cpu": 0.5},
    }
    path = tmp_path / f"family-{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    run = Path(tmp_path / "run")
    run_sweep(load_spec(str(path)), str(run), live=False)
    results = [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines() if line.strip()]
    assert [r["status"] for r in results] == ["ok", "ok"]
    assert all(r["metrics"]["steer_target"] == "a" for r in results)
    report = json.loads((run / "report.json").read_text())
    assert report["n_trials"] == 2 and report["n_failed"] == 0 and report["headline"]["delta_a_pp"]["n"] == 2
    assert report["dialect"] == {"llama": "llama3", "gemma2": "pythonic"}[name]  # detected from the template
