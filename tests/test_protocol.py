"""The seed study's judging protocol as switches (config.JudgeProtocol) and `dfc-ray ablate`: each switch
does what the study did, `protocol: seed` turns them all on, and the ablation re-judges a real (tiny) run
under ours, the study's, and the study's with each switch turned back."""

import json
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from test_seed_import import study_state, write_study

from dfc_ray.cli import main
from dfc_ray.config import (SEED_TRAINING_POSITIONS, ConfigError, DFCConfig, EvalConfig, JudgeProtocol, SteerConfig,
                            protocol_switches)
from dfc_ray.crosscoder import DedicatedFeatureCrosscoder
from dfc_ray.evaluate import load_crosscoder
from dfc_ray.fs import RunFolder
from dfc_ray.harvest import harvest
from dfc_ray.interventions import feature_direction
from dfc_ray.pair import PairSpec, load_tokenizer
from dfc_ray.seed import import_seed
from dfc_ray.spaces import SpecError, parse_spec
from dfc_ray.report.build import ABLATION
from dfc_ray.sweep.ablate import ablation_rows, pick_trials, pooled_delta, switch_effects, verdict
from dfc_ray.sweep.trial import trial_batches, trial_configs
from dfc_ray.tooluse import load_tasks, render_for, render_prompt, score
from dfc_ray.train import train

SEED = {"normalization": "none", "prompt_format": "raw", "metric": "seed_lenient", "steering_selection": "same_split",
        "steer_b_via": "b_decoder"}


def test_seed_turns_every_switch_on_and_single_switches_turn_back():
    assert JudgeProtocol().switches() == {name: meta["ours"] for name, meta in protocol_switches().items()}
    assert JudgeProtocol(base="seed").switches() == SEED
    one_back = JudgeProtocol(base="seed", normalization="checkpoint")
    assert one_back.switches() == SEED | {"normalization": "checkpoint"}
    assert one_back.label() == "seed, normalization: checkpoint" and JudgeProtocol(base="seed").label() == "seed"
    for name in SEED:
        differs = {k for k, v in JudgeProtocol(base="seed").reverted(name).switches().items() if v != SEED[k]}
        assert differs == {name}
    with pytest.raises(ConfigError, match="metric"):
        JudgeProtocol(metric="fuzzy")


def test_a_spec_sets_the_protocol_once_for_eval_steering_and_training_positions(tmp_path):
    base = {"pair": {"a": "organism", "b": "organism"}, "layers": [1], "crosscoder": {"dict_size": 64, "k": 4}}
    spec = parse_spec(base | {"eval": {"protocol": "seed"}}, "p.yaml")
    assert spec.eval.protocol == spec.steering.protocol == JudgeProtocol(base="seed")
    assert spec.harvest.positions == SEED_TRAINING_POSITIONS  # weakness 4: the study's training positions,
    assert spec.harvest.corpus.with_responses  # at the end of texts that hold the reply
    own = parse_spec(base | {"eval": {"protocol": {"base": "seed", "normalization": "checkpoint"}},
                             "harvest": {"positions": "all_tokens"}}, "p.yaml")
    assert own.harvest.positions == "all_tokens" and own.steering.protocol.normalization == "checkpoint"
    assert not own.harvest.corpus.with_responses  # the section chose its training data: its corpus is kept
    assert parse_spec(base, "p.yaml").harvest.positions == "last_prompt_token"  # ours by default
    with pytest.raises(SpecError, match=r"p.yaml: field eval.protocol = 'nope': expected 'ours' or 'seed'"):
        parse_spec(base | {"eval": {"protocol": "nope"}}, "p.yaml")
    with pytest.raises(SpecError, match=r"field steering.protocol = 'seed': expected no protocol here: set it once "
                                         r"as eval.protocol"):  # one protocol per sweep
        parse_spec(base | {"steering": {"protocol": "seed"}}, "p.yaml")
    with pytest.raises(SpecError, match=r"eval.protocol.metric = 'x'"):
        parse_spec(base | {"eval": {"protocol": {"metric": "x"}}}, "p.yaml")


def test_raw_prompt_format_is_the_studys_text_with_a_numbered_tool_list():
    tokenizer, task = load_tokenizer(PairSpec()), load_tasks("organism:test")[0]
    assert render_for(tokenizer, task, "chat") == render_prompt(tokenizer, task)
    raw = render_for(tokenizer, task, "raw")
    assert "<|im_start|>" not in raw and f"1. Name: {task.tools[0]['function']['name']}" in raw
    assert task.messages[-1]["content"] in raw
    toolrl = load_tasks("toolrl:sample")[0]  # already in the study's format: its list is not added twice
    assert render_for(tokenizer, toolrl, "raw").count("1. Name:") == 1


def test_the_metric_switch_chooses_strict_or_the_studys_fuzzy_name_match():
    task = next(t for t in load_tasks("organism:test") if t.ground_truth)
    name = next(iter(task.ground_truth[0]))
    fuzzy = score(task, '<tool_call>\n{"name": "' + name + '_v2", "arguments": {}}\n</tool_call>')
    assert fuzzy.passes("seed_lenient") and not fuzzy.passes("strict")


def test_normalization_none_feeds_raw_activations_and_unknown_statistics_need_it(tmp_path):
    cc = DedicatedFeatureCrosscoder(DFCConfig(d_model=8, dict_size=32, k=4, a_exclusive=0.25, b_exclusive=0.25))
    x = torch.randn(256, 2, 8) * 5 + 3
    cc.fit_normalization(x)
    cc.save(tmp_path / "trained")
    kept, raw = load_crosscoder(str(tmp_path / "trained"), "cpu"), load_crosscoder(str(tmp_path / "trained"), "cpu",
                                                                                      "none")
    assert torch.equal(raw.norm_mean, torch.zeros_like(raw.norm_mean)) and torch.equal(raw.norm_scale,
                                                                                         torch.ones(2))
    assert not torch.allclose(kept.encode(x), raw.encode(x))  # the study's splice reads other codes
    write_study(tmp_path / "study", study_state(0.1))
    import_seed(str(tmp_path / "study"), str(tmp_path / "imported"))  # no --norm-from: statistics unknown
    with pytest.raises(ValueError, match="normalization unknown"):
        load_crosscoder(str(tmp_path / "imported"), "cpu")
    assert load_crosscoder(str(tmp_path / "imported"), "cpu", "none").cfg.dict_size == 40


def test_steering_b_through_its_own_decoder_is_a_zero_vector():
    cc = DedicatedFeatureCrosscoder(DFCConfig(d_model=8, dict_size=32, k=4, a_exclusive=0.25, b_exclusive=0.25))
    feature = int(cc.partition.a_exclusive[0])
    assert not feature_direction(cc, feature, "b", own_decoder_only=True).any()  # weakness 6
    assert torch.equal(feature_direction(cc, feature, "b"), feature_direction(cc, feature, "a"))


def test_steer_tables_name_the_protocol_and_the_split_selection_ran_on(capsys):
    from actors.steering import SteerResult, print_steer  # deferred: the actors import Ray

    for protocol, chosen_on in (("ours", "dev"), ("seed", "test")):
        print_steer(SteerResult("ckpt", 1, asdict(SteerConfig(protocol=JudgeProtocol(base=protocol))), skipped=""))
        out = " ".join(capsys.readouterr().out.split())
        assert f"chosen on {chosen_on})" in out and f"(protocol: {protocol})" in out
        assert f"on {chosen_on} tool prompts" in out


def test_spaces_show_says_what_the_protocol_sets_without_the_spec_saying_it(tmp_path, capsys):
    spec = tmp_path / "seed.yaml"
    for positions, trained_at, replies in (("null", "text_end", "yes"),
                                           ("last_prompt_token", "last_prompt_token", "no")):
        spec.write_text(f"extends: organism48\nharvest: {{positions: {positions}}}\n"
                        "eval: {protocol: {base: seed, metric: strict}}\n")  # null: organism48's all_tokens unset
        assert main(["spaces", "show", str(spec)]) == 0
        out = " ".join(capsys.readouterr().out.split())
        assert "judged under protocol seed, metric: strict (normalization: none, prompt_format: raw, metric: strict" \
            in out
        assert f"trained at positions {trained_at}, A's replies appended to tool prompts: {replies}" in out


def test_pooling_and_effects_on_known_numbers():
    # Two checkpoints, four prompts: prompt means of the differences are 1, 0.5, 0, 0 → +37.5 pp.
    pooled = pooled_delta([[0, 0, 1, 0], [0, 0, 1, 0]], [[1, 1, 1, 0], [1, 0, 1, 0]], 200, 0)
    assert pooled.mean == pytest.approx(37.5) and pooled.lo <= 37.5 <= pooled.hi and pooled.n == 4
    rate = {"lo": 0.0, "hi": 0.0, "n": 4}

    def row(name: str, base: str, switch: str, mean: float) -> dict:
        return {"name": name, "base": base, "switch": switch,
                **{m: rate | {"mean": mean} for m in ("delta_a_pp", "delta_b_pp")}}

    rows = [row("ours", "ours", "", 0.0), row("seed", "seed", "", 30.0),
            row("seed, normalization ours", "seed", "normalization", 5.0),
            row("seed, metric ours", "seed", "metric", 28.0), row("ours, metric seed", "ours", "metric", 1.0)]
    effects = switch_effects(rows)
    assert effects == [{"switch": "normalization", "from": "seed", "delta_a_pp": 25.0, "delta_b_pp": 25.0},
                       {"switch": "metric", "from": "seed", "delta_a_pp": 2.0, "delta_b_pp": 2.0},
                       {"switch": "metric", "from": "ours", "delta_a_pp": 1.0, "delta_b_pp": 1.0}]
    line = verdict(effects, rows)[0]
    assert "from seed, normalization moves it most (+25.0 pp)" in line and "from ours, metric moves it most" in line
    names = [r.name for r in ablation_rows()]
    assert names[:2] == ["ours", "seed"] and len(names) == 2 + 2 * (len(SEED) + 1)
    assert names.index("seed, positions ours") == 2 + 3  # the study's weakness order: 1, 2, 3, then 4
    assert names[-1] == "ours, steer_b_via seed"


def test_the_judged_trials_are_the_best_dfcs_by_the_objective():
    spec = parse_spec({"pair": {"a": "organism", "b": "organism"}, "layers": [1],
                       "crosscoder": {"dict_size": 64, "k": 4, "a_exclusive": 0.1, "b_exclusive": 0.1}}, "p.yaml")

    def record(trial: str, status: str = "ok", **metrics) -> dict:
        return {"trial_id": trial, "config": {}, "status": status, "metrics": {"checkpoint": f"c/{trial}"} | metrics}

    records = [record("nan", delta_a_pp=float("nan")), record("five", delta_a_pp=5.0), record("one", delta_a_pp=1.0),
               record("none"), record("failed", "failed", delta_a_pp=50.0)]
    assert [t["trial_id"] for t in pick_trials(spec, records, 4)] == ["five", "one", "nan", "none"]
    assert [t["trial_id"] for t in pick_trials(spec, records, 1, ["one"])] == ["one"]
    with pytest.raises(ValueError, match="--trials failed: not a finished trial"):
        pick_trials(spec, records, 1, ["failed"])


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A finished one-trial run on the organism: spec.yaml, results.jsonl and a trained checkpoint."""
    root = tmp_path_factory.mktemp("ablate")
    raw = {"name": "ablate-tiny", "pair": {"a": "organism", "b": "organism"}, "layers": [1],
           "harvest": {"n_tasks": 24, "n_plain": 24, "positions": "last_prompt_token", "batch_size": 24},
           # k 16 with a quarter A-exclusive: some A-exclusive feature fires on the dev prompts under every protocol
           # row, so each row's ranking has a signal and steers (a ranking that ties everywhere steers nothing)
           "crosscoder": {"dict_size": 96, "k": 16, "a_exclusive": 0.25, "b_exclusive": 0.1, "aux_k": 8},
           "train": {"steps": 20, "batch_size": 16, "reader": "local", "lr": 0.001, "warmup_steps": 2},
           "eval": {"n_tasks": 6, "max_new_tokens": 12, "batch_size": 6, "n_texts": 0, "n_bootstrap": 50},
           "steering": {"n_dev": 6, "n_test": 6, "n_plain": 4, "top_n": 1, "alphas": [0.8], "targets": ["b"],
                        "primary": "b", "min_set_pool": 1, "min_set_max": 1, "max_new_tokens": 12, "batch_size": 6,
                        "n_bootstrap": 50, "rankings": ["cohens_d"]}}
    spec = parse_spec(raw, "ablate-tiny.yaml")
    run = RunFolder(str(root / "run"))
    run.write_text("spec.yaml", yaml.safe_dump(raw))
    harvested = harvest(replace(spec.harvest, store=str(root / "harvests")), use_ray=False, progress=False)
    settings = spec.trial_settings({})
    dfc, cfg = trial_configs(settings, harvested.d_model)
    batches = trial_batches(harvested.uri, 1, 16, "local", 0, harvested.d_model, harvested.models)
    result = train(dfc, cfg, batches, out_dir=root / "trained")
    assert result.status == "ok"
    checkpoint = run.upload_dir(root / "trained" / "dfc", "checkpoints/t1")
    record = {"trial_id": "t1", "config": {}, "status": "ok",
              "metrics": {"checkpoint": checkpoint, "harvest_store": harvested.uri, "delta_a_pp": 0.0}}
    run.write_text("results.jsonl", json.dumps(record) + "\n")
    return root / "run"


def test_ablate_rejudges_a_run_under_every_row(tiny_run, capsys):
    assert main(["ablate", str(tiny_run), "--checkpoints", "1", "--device", "cpu"]) == 0
    result = json.loads((tiny_run / ABLATION).read_text())
    assert "ours vs the seed study's protocol" in capsys.readouterr().out
    rows = {row["name"]: row for row in result["rows"]}
    assert list(rows) == [r.name for r in ablation_rows()] and result["trials"] == ["t1"]
    assert rows["seed"]["protocol"] == SEED and rows["ours"]["training_positions"] == "run"
    twin = DedicatedFeatureCrosscoder.load(str(tiny_run / "ablation" / "twins" / "t1"))  # trained on text_end
    original = DedicatedFeatureCrosscoder.load(str(tiny_run / "checkpoints" / "t1"))
    assert twin.cfg == original.cfg and not torch.equal(twin.norm_mean, original.norm_mean)
    for name, row in rows.items():
        assert {"delta_a_pp", "delta_b_pp", "steer_pp", "reference_pp"} <= set(row), name
        if row["protocol"]["steer_b_via"] == "b_decoder":  # B's own row of an A-exclusive feature is zero
            assert (row["steer_pp"]["mean"], row["steer_pp"]["lo"], row["steer_pp"]["hi"]) == (0, 0, 0), name
    effects = {(e["switch"], e["from"]): e for e in result["effects"]}
    assert set(effects) == {(name, side) for name in [*SEED, "positions"] for side in ("seed", "ours")}
    for (switch, side), effect in effects.items():
        changed = rows[f"{side}, {switch} {'ours' if side == 'seed' else 'seed'}"]
        gap = changed["delta_a_pp"]["mean"] - rows[side]["delta_a_pp"]["mean"]
        assert effect["delta_a_pp"] == pytest.approx(-gap if side == "seed" else gap)
    assert np.isfinite(result["seconds"]) and result["verdict"]
    report = (tiny_run / "report.md").read_text()  # a local run's report is refreshed with the section
    assert "Ours vs the study's protocol" in report and (tiny_run / "plots" / "protocol_ablation.png").stat().st_size


def test_ablate_bad_input_is_one_line(tiny_run, tmp_path, capsys):
    assert main(["ablate", str(tmp_path / "nothing")]) == 2
    assert main(["ablate", str(tiny_run), "--trials", "nope"]) == 2
    assert main(["ablate", str(tiny_run), "--checkpoints", "0"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3 and "no spec.yaml" in err[0] and "--trials nope" in err[1] and "--checkpoints 0" in err[2]


def test_eval_config_accepts_the_shorthand_and_steer_config_the_mapping():
    assert EvalConfig(protocol="seed").protocol.metric == "seed_lenient"
    steer = SteerConfig(protocol=JudgeProtocol(steer_b_via="b_decoder"))
    assert steer.protocol.label() == "ours, steer_b_via: b_decoder"


def test_an_in_process_evaluator_shares_the_steerers_pair_and_clean_replies():
    from actors.evaluator import Evaluator  # deferred: the actors import Ray
    from actors.steering import Steerer
    from dfc_ray.generation import GenerationConfig

    steerer = Steerer(PairSpec(device="cpu"))
    evaluator = Evaluator(PairSpec(device="cpu"), shared=steerer)  # what dfc-ray ablate does: one pair in memory
    assert evaluator.model_a is steerer.model_a and evaluator.prefix is steerer.prefix
    prompts, cfg = steerer.prompts(load_tasks("organism:test")[:2]), GenerationConfig(max_new_tokens=4)
    first = steerer.clean_replies("a", prompts, cfg)
    assert evaluator.clean_replies("a", prompts, cfg) is first  # generated once, by either
    assert (evaluator.clean_hits, evaluator.clean_misses) == (1, 0)
    with pytest.raises(ValueError, match="expected the same pair"):
        Evaluator(PairSpec(device="cpu", dtype="float16"), shared=steerer)
