"""Sweep reports on synthetic results: 12 trials over dict_size × k × layer (2×3×2), one failed."""

from __future__ import annotations

import io
import itertools
import json
import re
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from dfc_ray import cli
from dfc_ray.report import LiveView, load_results, print_report, to_markdown, write_report

GRID = {"dict_size": [64, 128], "k": [4, 8, 16], "layer": [1, 3]}
FAILED_INDEX = 5
FAILED_ID = f"trial_{FAILED_INDEX:04d}"
ERROR = "RuntimeError: CUDA OOM | [bold]not markup[/bold]"
PLOTS = {"delta_by_dict_size.png", "delta_by_k.png", "delta_by_layer.png", "alpha_curves.png",
         "steer_by_layer.png", "fvu_vs_delta.png"}
ABLATION_SAMPLE = Path(__file__).parent / "data" / "ablation.json"
"""A real `dfc-ray ablate` result: 2 checkpoints of an organism48 run."""


def synthetic_rows() -> list[dict]:
    """Known, irregular numbers per trial; every figure the report shows is recomputed from these."""
    rows = []
    for i, (dict_size, k, layer) in enumerate(itertools.product(*GRID.values())):
        trial_id = f"trial_{i:04d}"
        config = {"dict_size": dict_size, "k": k, "layer": layer, "variant": "dfc", "a_exclusive": 0.05, "steps": 100}
        if trial_id == FAILED_ID:
            rows.append({"trial_id": trial_id, "config": config, "metrics": {}, "status": "failed", "error": ERROR})
            continue
        a_clean, b_clean = 0.2, 0.1 + 0.01 * (i % 3)
        a_splice = a_clean + 0.01 * ((7 * i) % 11) + (0.1 if dict_size == 128 else 0.0)
        b_splice = b_clean + 0.005 * ((5 * i) % 7)
        metrics = {"fvu_a": 0.1 + 0.02 * i, "fvu_b": 0.2 + 0.01 * (i % 4), "l0": float(k), "dead_frac": 0.01 * i,
                   "a_clean": a_clean, "a_splice": a_splice, "delta_a_pp": 100 * (a_splice - a_clean),
                   "b_clean": b_clean, "b_splice": b_splice, "delta_b_pp": 100 * (b_splice - b_clean),
                   "steer_feature": i % 5, "steer_alpha": 8.0, "steer_target": "a",
                   "steer_delta_pp": 20.0 + 3 * ((3 * i) % 8) + 4 * layer, "steer_min_set": [-1, 1, 2][i % 3],
                   "train_s": 2.0 + i, "judge_s": 5.0}
        if i % 4 != 1:  # optional extras on most trials only: missing ones must be tolerated
            metrics |= {"steer_random_feature_pp": 1.0 * (i % 3), "steer_random_direction_pp": -0.5 * (i % 2),
                        "delta_a_pp_ci": [metrics["delta_a_pp"] - 5, metrics["delta_a_pp"] + 5],
                        "top_features": [{"feature": f, "cohens_d": 0.1 * ((i * 7 + f * 3) % 31), "auroc": 0.6}
                                         for f in range(3)],
                        "alpha_curve": [{"alpha": a, "delta_pp": a * (1 + i % 3)} for a in (0, 4, 8, 16)],
                        "loss_kl_a": float("nan")}
        rows.append({"trial_id": trial_id, "config": config, "metrics": metrics, "status": "ok"})
    return rows


def write_results(run: Path, rows: list[dict]) -> Path:
    run.mkdir(parents=True, exist_ok=True)
    (run / "results.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    return run


def stat(values) -> dict:
    xs = np.array([v for v in values], dtype=float)
    return {"mean": xs.mean(), "std": xs.std(ddof=1), "n": len(xs)}


def assert_stat(got: dict, want: dict) -> None:
    assert got["n"] == want["n"]
    assert got["mean"] == pytest.approx(want["mean"])
    assert got["std"] == pytest.approx(want["std"])


@pytest.fixture
def run(tmp_path) -> Path:
    return write_results(tmp_path / "run", synthetic_rows())


@pytest.fixture
def report(run) -> dict:
    write_report(run)
    # strict JSON: NaN metrics must have become null
    return json.loads((run / "report.json").read_text(), parse_constant=lambda c: pytest.fail(f"report.json has {c}"))


def test_headline_and_contract_keys(report):
    rows = synthetic_rows()
    ok = [r["metrics"] for r in rows if r["status"] == "ok"]
    assert report["n_trials"] == 12 and report["n_failed"] == 1
    assert_stat(report["headline"]["delta_a_pp"], stat(m["delta_a_pp"] for m in ok))
    assert_stat(report["headline"]["delta_b_pp"], stat(m["delta_b_pp"] for m in ok))
    assert_stat(report["headline"]["steer_best_pp"], stat(m["steer_delta_pp"] for m in ok))
    assert_stat(report["headline"]["steer_random_feature_pp"],
                stat(m["steer_random_feature_pp"] for m in ok if "steer_random_feature_pp" in m))
    assert report["baseline"]["a_correct"] == pytest.approx(np.mean([m["a_clean"] for m in ok]))
    assert report["baseline"]["b_correct"] == pytest.approx(np.mean([m["b_clean"] for m in ok]))
    assert [t["trial_id"] for t in report["trials"]] == [r["trial_id"] for r in rows]
    assert all({"trial_id", "config", "metrics"} <= t.keys() for t in report["trials"])
    assert report["failed"] == [{"trial_id": FAILED_ID, "status": "failed", "error": ERROR,
                                 "config": rows[FAILED_INDEX]["config"]}]
    assert report["seed_study"]["delta_a_pp"] == {"mean": 31.1, "std": 9.7, "n": 48}
    ours = np.mean([m["delta_a_pp"] for m in ok])
    assert report["comparison"]["delta_a_pp"]["difference_pp"] == pytest.approx(ours - 31.1)
    a_correct = report["comparison"]["a_correct"]
    assert a_correct["difference_pp"] == pytest.approx(100 * (report["baseline"]["a_correct"] - 0.19))
    assert report["trials"][0]["metrics"]["loss_kl_a"] is None


def test_per_axis_breakdown(report):
    rows = synthetic_rows()
    assert list(report["per_axis"]) == list(GRID)  # variant, a_exclusive and steps never vary
    for axis, values in GRID.items():
        got = report["per_axis"][axis]
        assert [r["value"] for r in got] == values
        for entry, value in zip(got, values):
            group = [r for r in rows if r["config"][axis] == value]
            ok = [r["metrics"] for r in group if r["status"] == "ok"]
            assert entry["n_trials"] == len(group) and entry["n_failed"] == len(group) - len(ok)
            for metric in ("delta_a_pp", "delta_b_pp", "steer_delta_pp", "fvu_a", "fvu_b"):
                assert_stat(entry[metric], stat(m[metric] for m in ok))


def test_best_features_ranked_across_trials(report):
    rows = [r for r in synthetic_rows() if r["status"] == "ok"]
    every = [(f["cohens_d"], r["trial_id"], f["feature"]) for r in rows for f in r["metrics"].get("top_features", [])]
    best = report["best_features"]
    assert len(best) == 10
    assert [b["cohens_d"] for b in best] == pytest.approx(sorted((d for d, _, _ in every), reverse=True)[:10])
    for b in best:
        trial = next(r["metrics"] for r in rows if r["trial_id"] == b["trial_id"])
        assert ("steer_delta_pp" in b) == (b["feature"] == trial["steer_feature"])


def test_plots_written(run, report):
    from matplotlib.image import imread

    assert set(report["plots"]) == {f"plots/{p}" for p in PLOTS}
    for name in PLOTS:
        path = run / "plots" / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert imread(path).std() > 0.01  # something was drawn


def test_markdown_sections(run, report):
    md = (run / "report.md").read_text()
    for heading in ("## Headline", "## By dict_size", "## By k", "## By layer", "## Trials", "## Best features",
                    "## Failed trials", "## Plots"):
        assert heading in md
    for row in synthetic_rows():
        assert row["trial_id"] in md
    assert ERROR.replace("|", "\\|") in md
    assert "+31.1 ± 9.7 (n=48)" in md  # the seed study, side by side
    d = report["headline"]["delta_a_pp"]
    assert f"{d['mean']:+.1f} ± {d['std']:.1f} (n={d['n']})" in md
    for plot in PLOTS:
        assert f"(plots/{plot})" in md


def with_reference(rows: list[dict]) -> list[dict]:
    """The synthetic trials as a steering-against-the-reference run: two positions values, the reference's
    effect and dev α curve per layer (the same in every trial of a layer), cos and share per trial."""
    out = []
    for i, row in enumerate(rows):
        row = json.loads(json.dumps(row))
        row["config"]["positions"] = ["all_tokens", "last_prompt_token"][i // 2 % 2]
        if row["status"] == "ok":
            layer, m = row["config"]["layer"], row["metrics"]
            m |= {"steer_reference_pp": 30.0 + layer, "steer_reference_pp_lo": 18.0 + layer,
                  "steer_reference_pp_hi": 42.0 + layer, "steer_reference_alpha": 0.8,
                  "steer_reference_sig": int(layer == 1),
                  "steer_reference_label": "" if layer == 1 else "no steerable direction at this layer/position",
                  "steer_reference_random_direction_pp": 1.0, "steer_reference_random_direction_pp_lo": -4.0,
                  "steer_reference_random_direction_pp_hi": 6.0,
                  "steer_delta_pp_lo": m["steer_delta_pp"] - 9, "steer_delta_pp_hi": m["steer_delta_pp"] + 9,
                  "steer_cos_reference": (-1) ** i * 0.05 * (i % 7), "steer_share_of_reference": 0.01 * i,
                  "reference_alpha_curve": [{"alpha": a, "delta_pp": 50 * a - layer} for a in (0.4, 0.8, 1.2)]}
        out.append(row)
    return out


def test_a_best_feature_shared_by_several_trials_names_the_tie(tmp_path):
    """Every trial of a layer at +0.0: no trial is the best one, so the row says how many tie."""
    rows = with_reference(synthetic_rows())
    for row in rows:
        if row["status"] == "ok":
            row["metrics"] |= {"steer_delta_pp": 0.0, "steer_delta_pp_lo": 0.0, "steer_delta_pp_hi": 0.0}
    report = write_report(write_results(tmp_path / "run", rows))
    for r in report["steering_reference"]:
        assert r["best_trial"]["tied"] == r["n_trials"] > 1
    section = (tmp_path / "run" / "report.md").read_text().split("## Steering against its reference")[1]
    section = section.split("\n## ")[0]
    assert f"+0.0, tied in {report['steering_reference'][0]['n_trials']} trials" in section
    assert "(trial_" not in section  # no trial named as the winner


def test_steering_against_the_reference(tmp_path):
    """Per layer × positions: the reference's CI and verdict, the best trial's feature with its CI, and
    cos / share over trials; the scatter and the reference's α curve are drawn."""
    from matplotlib.image import imread

    rows = with_reference(synthetic_rows())
    run = write_results(tmp_path / "run", rows)
    report = write_report(run)
    got = report["steering_reference"]
    assert [(r["layer"], r["positions"]) for r in got] == [(1, "all_tokens"), (1, "last_prompt_token"),
                                                            (3, "all_tokens"), (3, "last_prompt_token")]
    for r in got:
        group = [x for x in rows if x["status"] == "ok" and x["config"]["layer"] == r["layer"]
                 and x["config"]["positions"] == r["positions"]]
        best = max(group, key=lambda x: x["metrics"]["steer_delta_pp"])
        assert r["n_trials"] == len(group) and r["best_trial"]["trial_id"] == best["trial_id"]
        assert r["best_trial"]["delta"] == {"pp": best["metrics"]["steer_delta_pp"],
                                            "lo": best["metrics"]["steer_delta_pp"] - 9,
                                            "hi": best["metrics"]["steer_delta_pp"] + 9}
        assert r["reference"]["pp"] == 30 + r["layer"] and r["reference"]["lo"] == 18 + r["layer"]
        assert_stat(r["cos_reference"], stat(x["metrics"]["steer_cos_reference"] for x in group))
        assert_stat(r["share_of_reference"], stat(x["metrics"]["steer_share_of_reference"] for x in group))
    assert_stat(report["headline"]["steer_reference_pp"],
                stat(r["metrics"]["steer_reference_pp"] for r in rows if r["status"] == "ok"))
    md = (run / "report.md").read_text()
    section = md.split("## Steering against its reference")[1].split("\n## ")[0]
    assert "+31.0 [+19.0, +43.0] at α 0.8" in section and "steerable" in section
    assert section.count("no steerable direction at this layer/position") == 2  # layer 3, both positions
    assert "## By positions" in md
    for name in ("cos_vs_effect.png", "alpha_curves.png"):
        assert f"plots/{name}" in report["plots"] and imread(run / "plots" / name).std() > 0.01


def with_difference(rows: list[dict]) -> list[dict]:
    """The synthetic trials as a run that attributed the difference: n50 (sometimes none), n90, partition
    shares and the top term per trial; the curve over n ∈ {1, 2, 4}, its n50 (sometimes not reached), and
    the patch in A on every trial but the first (the attribution only), the ablation in B on some."""
    out = []
    for i, row in enumerate(rows):
        row = json.loads(json.dumps(row))
        if row["status"] == "ok":
            layer, m = row["config"]["layer"], row["metrics"]
            b_share = 0.1 * (i % 3)
            m |= {"diff_n50": [2, 3, -1, 5, -1][i % 5], "diff_n90": 4 + i % 5, "diff_reference_norm": 12.0 + layer,
                  "diff_features": 10.0 + 0.1 * i, "diff_cos_reconstruction": 0.99 - 0.001 * i,
                  "diff_cos_norm_means": 0.27, "diff_share_a_exclusive": -0.01 * (i % 4),
                  "diff_share_b_exclusive": b_share, "diff_share_shared": 1 + 0.01 * (i % 4) - b_share,
                  "diff_top": [{"feature": i, "partition": ["shared", "b_exclusive"][i % 2], "contribution": 3.0 + i,
                                "share": 0.2 + 0.03 * ((5 * i) % 11), "cos_reference": 0.5, "mean_activation": 1.0,
                                "fires": 0.5, "beta_a": 1.0, "beta_b": 0.9}]}
            if i == 0:  # the attribution only (SteerConfig.localize_when): the first trial of layer 1
                out.append(row)
                continue
            m |= {
                  "loc_reference_pp": 40.0 + layer, "loc_reference_pp_lo": 30.0, "loc_reference_pp_hi": 49.0,
                  "loc_n50": [4, -1, 2][i % 3],
                  "loc_curve": [{"n": n, "alpha": 0.8, "dev_pp": 4.0 * n, "pp": 5.0 * n + i, "lo": 0.0, "hi": 60.0,
                                 "share": (5.0 * n + i) / 40, "share_lo": 0.0, "share_hi": 1.5} for n in (1, 2, 4)],
                  "loc_curve_n": 4, "loc_curve_pp": 20.0 + i, "loc_curve_pp_lo": 10.0 + i, "loc_curve_pp_hi": 30.0 + i,
                  "loc_curve_share": (20.0 + i) / 40, "loc_curve_random_pp": -1.0 * (i % 2),
                  "loc_curve_random_pp_lo": -5.0, "loc_curve_random_pp_hi": 3.0,
                  "loc_patch_a_n": 1 + i % 2, "loc_patch_a_pp": -3.0 * ((7 * i) % 5), "loc_patch_a_pp_lo": -20.0,
                  "loc_patch_a_pp_hi": 0.0, "loc_patch_a_random_pp": 1.0, "loc_patch_a_random_pp_lo": -2.0,
                  "loc_patch_a_random_pp_hi": 4.0}
            if i % 4 in (0, 3):
                m |= {"loc_ablate_b_n": 2, "loc_ablate_b_pp": 2.0 * i, "loc_ablate_b_random_pp": 0.5}
        out.append(row)
    return out


def test_where_the_difference_lives(tmp_path):
    """Per layer: n50/n90 over the trials that have one, partition shares, the top term's partition, the curve
    per n against the reference, each causal test with its largest effect and control, the largest terms,
    the headline rows, and localization_curve.png."""
    from matplotlib.image import imread

    rows = with_difference(synthetic_rows())
    run = write_results(tmp_path / "run", rows)
    report = write_report(run)
    got = report["difference"]
    assert [r["layer"] for r in got] == [1, 3]
    for r in got:
        group = [x["metrics"] for x in rows if x["status"] == "ok" and x["config"]["layer"] == r["layer"]]
        n50 = [m["diff_n50"] for m in group if m["diff_n50"] > 0]
        assert r["n_trials"] == len(group) and r["n50"]["n_reached"] == len(n50) < r["n50"]["n_measured"]
        assert_stat(r["n50"]["sizes"], stat(n50))
        assert r["n50"]["range"] == [min(n50), max(n50)]
        assert_stat(r["shares"]["b_exclusive"], stat(m["diff_share_b_exclusive"] for m in group))
        tops = [m["diff_top"][0]["partition"] for m in group]
        assert r["top_partition"] == {p: tops.count(p) for p in ("a_exclusive", "b_exclusive", "shared")}
        assert r["reference"] == {"pp": 40.0 + r["layer"], "lo": 30.0, "hi": 49.0}
        assert [p["n"] for p in r["curve"]] == [1, 2, 4]
        tested = [m for m in group if "loc_curve" in m]
        assert_stat(r["curve"][1]["pp"], stat(next(p["pp"] for p in m["loc_curve"] if p["n"] == 2) for m in tested))
        patch = r["tests"]["patch_a"]
        largest = max(tested, key=lambda m: abs(m["loc_patch_a_pp"]))
        assert patch["n_trials"] == len(tested) == len(group) - (r["layer"] == 1)
        assert patch["best"]["effect"] == {"pp": largest["loc_patch_a_pp"], "lo": -20.0, "hi": 0.0}
        assert r["tests"]["ablate_b"]["n_trials"] == sum("loc_ablate_b_pp" in m for m in group)
    ok = [r["metrics"] for r in rows if r["status"] == "ok"]
    reached = [m["loc_n50"] for m in ok if m.get("loc_n50", -1) > 0]
    assert_stat(report["headline"]["loc_n50"], stat(reached))
    assert report["headline"]["loc_n50"]["n_measured"] == len(ok) - 1
    assert_stat(report["headline"]["diff_share_a_exclusive"], stat(m["diff_share_a_exclusive"] for m in ok))
    terms = report["largest_terms"]
    assert [t["share"] for t in terms] == sorted((m["diff_top"][0]["share"] for m in ok), reverse=True)[:len(terms)]
    md = (run / "report.md").read_text()
    for heading in ("## Where the difference lives", "## Where the difference lives: localisation curve",
                    "## Where the difference lives: causal tests", "## Largest terms of the difference"):
        assert heading in md
    assert f"reached in {len(reached)} of {len(ok) - 1}" in md
    assert "features needed for 50% of the reference effect" in md
    assert "plots/localization_curve.png" in report["plots"]
    assert imread(run / "plots" / "localization_curve.png").std() > 0.01


def test_runs_without_the_reference_render_as_before(report, run):
    assert "steering_reference" not in report and "plots/cos_vs_effect.png" not in report["plots"]
    assert "difference" not in report and "plots/localization_curve.png" not in report["plots"]
    assert "Steering against its reference" not in (run / "report.md").read_text()


def test_single_layer_run_still_plots_steering_by_layer(tmp_path):
    rows = [r for r in synthetic_rows() if r["config"]["layer"] == 1]
    report = write_report(write_results(tmp_path / "run", rows))
    assert "layer" not in report["per_axis"]  # not an axis of the sweep, but its steering effect is still drawn
    assert (tmp_path / "run/plots/steer_by_layer.png").exists()


def test_unreached_minimal_set_is_not_a_size_and_times_are_summarized(tmp_path):
    rows = synthetic_rows()
    restarts = {"s-evaluator": 0, "s-steering": 2}
    report = write_report(write_results(tmp_path / "run", rows), run_info={"judge_restarts": restarts})
    ok = [r["metrics"] for r in rows if r["status"] == "ok"]
    sizes = [m["steer_min_set"] for m in ok if m["steer_min_set"] > 0]  # -1 = not reached
    assert report["min_set"]["n_steered"] == len(ok) and report["min_set"]["n_reached"] == len(sizes)
    assert report["min_set"]["sizes"]["mean"] == pytest.approx(np.mean(sizes))
    assert report["seconds_per_trial"]["train_s"]["mean"] == pytest.approx(np.mean([m["train_s"] for m in ok]))
    md = (tmp_path / "run/report.md").read_text()
    assert "not reached" in md and f"{len(sizes)} of {len(ok)}" in md and "Time (seconds" in md
    assert report["run"]["judge_restarts"] == restarts and "judge replica restarts" in md and "s-steering 2" in md


def test_all_failed_run_reports_without_plots(tmp_path):
    rows = [{**r, "status": "diverged", "metrics": {}, "error": "loss is NaN"} for r in synthetic_rows()]
    report = write_report(write_results(tmp_path / "run", rows))
    assert report["n_failed"] == 12 and report["headline"]["delta_a_pp"] == {"mean": None, "std": None, "n": 0}
    assert report["plots"] == [] and "loss is NaN" in (tmp_path / "run/report.md").read_text()


@pytest.mark.parametrize("bad, message", [
    ('{"trial_id": "t2", "config": {', "line 3: not valid JSON"),
    ('{"trial_id": "t2", "config": [], "metrics": {}, "status": "ok"}', "line 3: field 'config'"),
    ('{"config": {}, "metrics": {}, "status": "ok"}', "line 3: field 'trial_id'"),
    ('[1, 2]', "line 3: expected a JSON object"),
])
def test_corrupt_line_names_file_and_line(tmp_path, bad, message):
    rows = synthetic_rows()[:2]
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.jsonl").write_text(json.dumps(rows[0]) + "\n\n" + bad + "\n" + json.dumps(rows[1]) + "\n")
    with pytest.raises(ValueError, match=f"results.jsonl: {message}"):
        load_results(run)


def test_missing_results_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="results.jsonl: no such file"):
        load_results(tmp_path)


def test_a_trial_recorded_twice_is_refused_naming_both_lines(tmp_path):
    """The sweep records each trial once (a retry gets a new id), so two lines of one trial id are a damaged
    file: refused, not read as "the last one wins" (issue 29)."""
    rows = synthetic_rows()
    retry = {**rows[FAILED_INDEX], "status": "ok", "metrics": rows[0]["metrics"]}
    with pytest.raises(ValueError, match=f"lines {FAILED_INDEX + 1} and 13 both record trial "
                                         f"'{rows[FAILED_INDEX]['trial_id']}'; expected each trial once"):
        load_results(write_results(tmp_path / "run", rows + [retry]))



def ablation_sample() -> dict:
    """The sample with a non-zero seed row (the real one is all zeros: the study's prompt format scores 0% on
    the organism) and one row that did not steer."""
    data = json.loads(ABLATION_SAMPLE.read_text())
    rows = {row["name"]: row for row in data["rows"]}
    rows["seed"]["delta_a_pp"] = {"mean": 12.5, "lo": 3.0, "hi": 21.0, "n": 100}
    del rows["seed, steer_b_via ours"]["steer_pp"]
    rows["seed, steer_b_via ours"]["reference_pp"] = None
    return data


def test_ours_vs_the_study_protocol(run):
    """ablation.json in the run folder: its rows with CIs, each switch's effect with its weakness number, the
    verdict and the seed row next to the published numbers, right after the headline; and its plot."""
    from matplotlib.image import imread

    sample = ablation_sample()
    (run / "ablation.json").write_text(json.dumps(sample))
    report = write_report(run)
    got = report["protocol_ablation"]
    assert [r["name"] for r in got["rows"]] == [r["name"] for r in sample["rows"]]
    for row, want in zip(got["rows"], sample["rows"]):
        for measure in ("delta_a_pp", "delta_b_pp", "steer_pp", "reference_pp"):
            rate = want.get(measure)
            assert row[measure] == (None if rate is None else {"pp": rate["mean"], "lo": rate["lo"], "hi": rate["hi"]})
    assert {e["switch"]: e["weakness"] for e in got["effects"]} == {
        "normalization": 1, "prompt_format": 2, "metric": 3, "positions": 4, "steering_selection": 5, "steer_b_via": 6}
    assert got["published"]["delta_a_pp"] == {"seed_protocol": 12.5, "published": 31.1,
                                             "difference_pp": pytest.approx(12.5 - 31.1)}
    assert "twins" not in got and "protocol" not in got["rows"][0]  # only what the report shows

    md = (run / "report.md").read_text()
    assert md.index("## Headline") < md.index("## Ours vs the study's protocol\n") < md.index("## By dict_size")
    rows = md.split("## Ours vs the study's protocol\n")[1].split("\n## ")[0]
    assert ("| seed, prompt_format ours | text_end | 87.0% | 4.0% | -86.7 [-92.7, -79.7] | -2.3 [-5.3, -0.3] | "
            "+0.0 [+0.0, +0.0] | +83.0 [+76.0, +90.0] |") in rows
    assert "| ours, positions seed | text_end | 80.0% | 17.0% | -67.0 [-76.0, -58.0] | -4.0 [-9.0, -1.0] |" in rows
    assert "| ours | all_tokens | 80.0% | 17.0% | +0.0 [+0.0, +0.0] |" in rows
    assert "| seed | text_end | 0.0% | 0.0% | +12.5 [+3.0, +21.0] |" in rows
    assert "| seed, steer_b_via ours | text_end | 0.0% | 0.0% | +0.0 [+0.0, +0.0] | +0.0 [+0.0, +0.0] | — | — |" in rows
    assert "Δ A +12.5 vs +31.1, Δ B +0.0 vs +6.8, steering B +0.0 vs +65.0" in rows
    effects = md.split("## Ours vs the study's protocol: what each switch adds")[1].split("\n## ")[0]
    assert "| prompt_format | 2 | seed | +86.7 | +2.3 | +0.0 |" in effects
    assert "| positions | 4 | seed | +0.0 |" in effects and "| positions | 4 | ours | -67.0 | -4.0 | +0.0 |" in effects
    assert all(f"- {line}" in effects for line in sample["verdict"])

    assert "plots/protocol_ablation.png" in report["plots"] and "(plots/protocol_ablation.png)" in md
    assert imread(run / "plots/protocol_ablation.png").std() > 0.01
    assert to_markdown(json.loads((run / "report.json").read_text())) == md  # report.json alone re-renders it

    console = Console(file=io.StringIO(), width=250)
    print_report(report, console, full=True)
    out = console.file.getvalue()
    assert "Ours vs the study's protocol" in out and "what each switch adds" in out
    assert "-86.7 [-92.7, -79.7]" in out and sample["verdict"][0] in out and "+12.5 vs +31.1" in out


def test_no_ablation_no_section(report, run):
    assert "protocol_ablation" not in report and "plots/protocol_ablation.png" not in report["plots"]
    assert "Ours vs the study's protocol" not in (run / "report.md").read_text()


def damage(data: dict, where: str) -> str:
    """ablation.json with one part broken."""
    if where == "rows":
        del data["rows"]
    elif where == "lo":
        data["rows"][3]["delta_a_pp"]["lo"] = "x"
    elif where == "seed":
        data["rows"] = [row for row in data["rows"] if row["name"] != "seed"]
    elif where == "effect":
        data["effects"][1] = ["prompt_format"]
    return json.dumps(data)


@pytest.mark.parametrize("where, message", [
    ("json", "not valid JSON"),
    ("rows", "field 'rows' is 'None'; expected a list"),
    ("lo", "rows[3]: delta_a_pp: field 'lo' is 'x'; expected a number"),
    ("seed", "no 'seed' row"),
    ("effect", "effects[1]: expected a JSON object, got list"),
])
def test_damaged_ablation_is_one_line(run, where, message):
    text = '{"rows": [' if where == "json" else damage(json.loads(ABLATION_SAMPLE.read_text()), where)
    (run / "ablation.json").write_text(text)
    with pytest.raises(ValueError) as err:
        write_report(run)
    assert str(err.value).startswith(f"{run}/ablation.json: {message}") and "\n" not in str(err.value)


@pytest.fixture
def report_cli(monkeypatch):
    monkeypatch.setattr(cli, "COMMAND_MODULES", ["dfc_ray.commands.report"])  # only this stage: a faster import
    monkeypatch.setenv("COLUMNS", "250")
    return cli.main


def test_cli_rebuilds_and_prints(run, report_cli, capsys):
    assert report_cli(["report", str(run), "--full"]) == 0
    out = capsys.readouterr().out
    for text in ("Headline", "By dict_size", "Trials (by Δ A)", "Best features", "Failed trials", FAILED_ID,
                 "CUDA OOM", "[bold]not markup[/bold]"):
        assert text in out
    report = json.loads((run / "report.json").read_text())
    assert report["n_trials"] == 12 and len(list((run / "plots").glob("*.png"))) == len(PLOTS)


def test_cli_error_is_one_line(tmp_path, report_cli, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.jsonl").write_text("{not json\n")
    assert report_cli(["report", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "results.jsonl: line 1: not valid JSON" in err
    write_results(run, synthetic_rows())
    (run / "ablation.json").write_text("[]")
    assert report_cli(["report", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "ablation.json: expected a JSON object, got list" in err


def test_s3_run(s3_bucket, s3_server, tmp_path, report_cli, capsys):
    import boto3

    bucket = s3_bucket.removeprefix("s3://")
    body = "\n".join(json.dumps(r) for r in synthetic_rows()).encode()
    boto3.client("s3").put_object(Bucket=bucket, Key="runs/r1/results.jsonl", Body=body)
    boto3.client("s3").put_object(Bucket=bucket, Key="runs/r1/ablation.json", Body=ABLATION_SAMPLE.read_bytes())
    uri = f"{s3_bucket}/runs/r1"
    assert [r.trial_id for r in load_results(uri)] == [r["trial_id"] for r in synthetic_rows()]

    assert report_cli(["report", uri, "--full"]) == 0  # print only: no local files without --out
    assert "Ours vs the study's protocol" in capsys.readouterr().out  # the run's ablation.json, read from S3
    assert report_cli(["report", uri, "--out", str(tmp_path / "out")]) == 0
    captured = capsys.readouterr()
    assert json.loads((tmp_path / "out/report.json").read_text())["n_failed"] == 1
    assert (tmp_path / "out/plots/protocol_ablation.png").exists()
    assert (tmp_path / "out/report.md").exists() and (tmp_path / "out/plots/fvu_vs_delta.png").exists()
    secret = s3_server.env["AWS_SECRET_ACCESS_KEY"]
    assert secret not in captured.out + captured.err and secret not in (tmp_path / "out/report.md").read_text()

    with pytest.raises(FileNotFoundError, match=f"{s3_bucket}/runs/missing/results.jsonl: no such file"):
        load_results(f"{s3_bucket}/runs/missing")


def feed(view: LiveView) -> None:
    """A sweep of two trials as the Tune callback reports it."""
    view.update("t1", {"dict_size": 64, "k": 4, "steps": 100}, "pending")
    view.update("t1", {"dict_size": 64, "k": 4, "steps": 100}, "running", {"step": 10, "loss": 0.5})
    view.update("t1", {"dict_size": 64, "k": 4, "steps": 100}, "running", {"step": 20, "loss": 0.4, "fvu_a": 0.3})
    view.update("t2", {"dict_size": 128, "k": 8, "steps": 100}, "RUNNING", {"step": 5})
    view.update("t1", {"dict_size": 64, "k": 4, "steps": 100}, "ok", {"delta_a_pp": 12.5, "delta_b_pp": 3.0})
    view.update("t2", {"dict_size": 128, "k": 8, "steps": 100}, "ERROR", {"error": "diverged at step 7\ntrace"})


def test_live_view_prints_a_line_per_state_change_without_tty():
    console = Console(file=io.StringIO(), width=300)
    assert not console.is_terminal
    with LiveView(2, console=console, axes=["dict_size", "k"]) as view:
        feed(view)
    lines = console.file.getvalue().splitlines()
    assert len(lines) == 5  # t1: pending, running, ok; t2: running, failed — metric-only updates print nothing
    assert lines[2].startswith("[0/2 finished: 0 ok, 0 failed, 2 running]") and "t2" in lines[2]
    assert "t1" in lines[3] and "dict_size=64 k=4" in lines[3] and "Δ A=+12.5" in lines[3] and "FVU A=0.300" in lines[3]
    assert lines[4].startswith("[2/2 finished: 1 ok, 1 failed, 0 running]")
    assert "failed" in lines[4] and "error: diverged at step 7" in lines[4] and "trace" not in lines[4]
    assert view.counts() == {"done": 1, "failed": 1, "running": 0}


def test_live_view_redraws_on_a_terminal():
    console = Console(file=io.StringIO(), width=200, force_terminal=True)
    with LiveView(2, console=console) as view:
        feed(view)
    out = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", console.file.getvalue())  # without ANSI codes
    assert "20/100" in out and "+12.5" in out and "2/2 finished: 1 ok, 1 failed" in out
