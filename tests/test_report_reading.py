"""Reading a report the way a researcher does: the terminal report at 80 columns leads with a verdict per layer
and the headline; plots with nothing to show are left out and said so; the header is human text. The run is
organism48-shaped (48 trials, Δ A and Δ B exactly 0, steering B against a +40 pp reference, the localisation
curve on three trials), with known numbers."""

from __future__ import annotations

import io
import itertools
import math
import shutil
import statistics
from pathlib import Path

import pytest
from rich.console import Console
from test_report import synthetic_rows, with_reference, write_results

from dfc_ray.report import TrialResult, build_report, print_report, write_report
from dfc_ray.report.plots import omitted_note, plot_choices
from dfc_ray.report.render import verdicts

VARIANTS = {"dfc-3pct": (0.03, 0.0), "dfc-3pct-l1": (0.03, 1e-3), "dfc-5pct": (0.05, 0.0), "dfc-5pct-l1": (0.05, 1e-3),
            "dfc-10pct": (0.10, 0.0), "dfc-10pct-l1": (0.10, 1e-3), "crosscoder": (0.0, 0.0),
            "crosscoder-l1": (0.0, 1e-3)}
CURVE_SHARES = {1: 0.3, 2: 0.55, 4: 0.8, 8: 0.9, 16: 0.97}
"""The localisation curve's share of the reference effect at each n (the same in the three trials that ran it)."""
REFERENCE_PP = 40.0


def organism48_rows() -> list[dict]:
    """48 trials over dict_size × k × variant at block 1: splicing changes nothing (Δ A = Δ B = 0 exactly), the
    best A-exclusive feature moves B by 0, the difference lives in ~4 shared features and the curve recovers
    97% of the reference at n = 16 on the three dfc-5pct trials of dict 768."""
    rows = []
    for i, (dict_size, k, variant) in enumerate(itertools.product([768, 1536], [8, 16, 32], VARIANTS)):
        share, l1 = VARIANTS[variant]
        config = {"dict_size": dict_size, "k": k, "variant": variant, "a_exclusive": share, "b_exclusive": share,
                  "l1_excl": l1 if share else 0.0, "l1_shared": l1 if not share else 0.0, "layer": 1, "steps": 300}
        m = {"fvu_a": 0.05 + 0.001 * i, "fvu_b": 0.06 + 0.001 * (i % 7), "l0": float(k), "dead_frac": 0.01 * (i % 5),
             "a_clean": 0.8, "a_splice": 0.8, "delta_a_pp": 0.0, "b_clean": 0.17, "b_splice": 0.17, "delta_b_pp": 0.0,
             "steer_target": "b", "steer_reference_pp": REFERENCE_PP, "steer_reference_pp_lo": 30.0,
             "steer_reference_pp_hi": 49.0, "steer_reference_alpha": 0.8, "steer_reference_sig": 1,
             "steer_reference_label": "", "train_s": 3.5, "judge_s": 6.9,
             "diff_reference_norm": 12.0, "diff_features": 11.5, "diff_cos_reconstruction": 0.997,
             "diff_cos_norm_means": 0.27, "diff_n50": 3 + i % 3, "diff_n90": 4 + i % 11,
             "diff_share_a_exclusive": 0.0, "diff_share_b_exclusive": 0.1 if share else 0.0,
             "diff_share_shared": 0.9 if share else 1.0,
             "diff_top": [{"feature": 5 + i, "partition": "shared", "contribution": 4.0, "share": 0.3 + 0.001 * i,
                           "cos_reference": 0.5, "mean_activation": 1.0, "fires": 0.4, "beta_a": 1.0, "beta_b": 0.9}],
             "reference_alpha_curve": [{"alpha": a, "delta_pp": d} for a, d in ((0.4, 2.0), (0.8, 40.0), (1.2, 8.0))]}
        if share:  # plain crosscoders have no A-exclusive feature to steer with
            m |= {"steer_feature": i % 7, "steer_alpha": 0.8, "steer_delta_pp": 0.0, "steer_delta_pp_lo": -3.0,
                  "steer_delta_pp_hi": 3.0, "steer_min_set": -1, "steer_random_feature_pp": 0.0,
                  "steer_random_direction_pp": 0.0, "steer_cos_reference": 0.02 * (i % 5),
                  "steer_share_of_reference": 0.0,
                  "alpha_curve": [{"alpha": a, "delta_pp": 0.0 if i % 12 else 1.0} for a in (0.4, 0.8, 1.2)],
                  "top_features": [{"feature": f, "cohens_d": 0.5 + 0.01 * ((i * 7 + f) % 13), "auroc": 0.6}
                                   for f in range(2)]}
        if variant == "dfc-5pct" and dict_size == 768:  # the causal tests (localize_when)
            m |= {"loc_reference_pp": REFERENCE_PP, "loc_reference_pp_lo": 30.0, "loc_reference_pp_hi": 49.0,
                  "loc_n50": 2, "loc_curve_n": 16, "loc_curve_pp": CURVE_SHARES[16] * REFERENCE_PP,
                  "loc_curve_share": CURVE_SHARES[16], "loc_curve_random_pp": 0.5 * (k % 3),
                  "loc_curve": [{"n": n, "alpha": 0.8, "dev_pp": s * REFERENCE_PP, "pp": s * REFERENCE_PP, "lo": 0.0,
                                 "hi": 50.0, "share": s, "share_lo": 0.0, "share_hi": 1.2}
                                for n, s in CURVE_SHARES.items()]}
        rows.append({"trial_id": f"{i:08x}", "config": config, "metrics": m, "status": "ok"})
    return rows


RUN_INFO = {"spec": "organism48", "spec_file": "search_spaces/organism48.yaml", "run": "runs/organism48",
            "run_id": "r-20261206", "harvest": "store/abc123", "harvest_rows": 165213, "harvest_reused": False,
            "layers": [1], "pair": {"a": "organism", "b": "organism", "tokenizer": None, "dtype": "float32"},
            "protocol": "ours", "seconds": {"harvest": 20.1, "trials": 450.2}, "attempts": [{"harvest": 20.1}],
            "judge_peak_mem_mb": {"s-evaluator": 900, "s-steering": 1100},
            "judge_restarts": {"s-evaluator": 0, "s-steering": 2}}


@pytest.fixture
def organism48(tmp_path) -> tuple[Path, dict]:
    run = write_results(tmp_path / "organism48", organism48_rows())
    return run, write_report(run, run_info=RUN_INFO)


def rendered(report: dict, width: int = 80, full: bool = False) -> str:
    out = io.StringIO()
    print_report(report, Console(file=out, width=width, color_system=None), full=full)
    return out.getvalue()


def test_the_terminal_report_opens_with_the_verdict_and_fits_a_screen(organism48):
    run, report = organism48
    out = rendered(report)
    lines = out.splitlines()
    assert len(lines) <= 60 and max(map(len, lines)) <= 80
    assert "organism48" in lines[0] and "48 trials (48 ok, 0 failed)" in out
    text = " ".join(out.split())
    verdict = text.index("At block 1 the A − B difference is carried by ~4 features")
    assert verdict < text.index("Headline") and text.index("Headline") < text.index("Δ A = spliced − clean")
    assert "100% of it in shared features" not in text and "92% of it in shared features" in text
    assert f"recovers {CURVE_SHARES[16]:.0%} of the reference effect (+38.8 of +40.0 pp" in text
    assert "moves B by +0.0 [-3.0, +3.0] pp, against +40.0 [+30.0, +49.0] pp" in text
    assert "pair: A organism · B organism" in text and "layers: block 1" in text
    assert "{'" not in out and "': " not in out and "None" not in out  # no Python reprs
    assert "Trials (by Δ A)" not in out and "--full" in text


def test_full_prints_every_table_with_labelled_layers_and_counts(organism48):
    run, report = organism48
    out = rendered(report, full=True)
    assert "Trials (by Δ A)" in out and "By variant" in out and "Largest terms of the difference" in out
    text = " ".join(out.split())
    assert "block 1 · steering target B" in text and "1 · target b" not in text
    assert "judge replica restarts (count): s-evaluator 0 · s-steering 2" in text
    time_table = out.split("Time (seconds, wall clock)")[1]
    assert "restarts" not in time_table
    assert "wall clock: harvest 20.1 s · trials 450.2 s" in text and "judge peak memory: s-evaluator 900 MB" in text


def test_report_md_carries_the_verdict_and_a_human_header(organism48):
    run, report = organism48
    md = (run / "report.md").read_text()
    assert md.index("## Verdict") < md.index("## Headline")
    assert "At block 1 the A − B difference is carried by ~4 features" in md.split("## Verdict")[1]
    header = md.split("## Verdict")[0]
    assert "- pair: A organism · B organism · dtype float32" in header and "{" not in header


def test_a_rebuilt_report_names_the_folder_it_was_built_from(organism48, tmp_path):
    run, report = organism48
    moved = tmp_path / "moved"
    shutil.move(run, moved)
    rebuilt = write_report(moved)
    assert rebuilt["run"]["run"] == str(moved) and rebuilt["run"]["swept_in"] == "runs/organism48"
    assert f"run folder {moved} (swept in runs/organism48)" in " ".join(rendered(rebuilt).split())
    again = write_report(moved)  # rebuilt in place: the folder it was swept in is kept, not replaced by this one
    assert again["run"]["swept_in"] == "runs/organism48"


def test_flat_plots_are_left_out_and_the_report_says_so(organism48):
    run, report = organism48
    assert report["plots"] == ["plots/alpha_curves.png", "plots/cos_vs_effect.png", "plots/localization_curve.png"]
    assert sorted(p.name for p in (run / "plots").iterdir()) == ["alpha_curves.png", "cos_vs_effect.png",
                                                                 "localization_curve.png"]
    note = omitted_note(report)
    assert note.startswith("Δ A and Δ B are +0.0 in all 48 trials; steering Δ and the random-feature control and the "
                           "random-direction control are +0.0 in all 36 trials: 8 plots omitted (delta_by_dict_size")
    assert "delta_by_b_exclusive" not in note  # it groups the trials as a_exclusive does: one plot for both
    assert note in (run / "report.md").read_text() and f"plots: {note}" in " ".join(rendered(report).split())


def varied(rows: list[dict], noise: float = 0.0) -> list[dict]:
    """The organism48 trials with Δ A varying by whole points (Δ B stays 0) and steering by float noise only."""
    for i, row in enumerate(rows):
        row["metrics"]["delta_a_pp"] = float((7 * i) % 11)
        if "steer_delta_pp" in row["metrics"]:
            row["metrics"]["steer_delta_pp"] = noise * (i % 2)
    return rows


def choices(rows: list[dict]) -> dict:
    return {c.name: c for c in plot_choices(build_report([TrialResult(**r) for r in rows]))}


def test_plot_selection_draws_what_varies_and_merges_axes_that_group_alike():
    got = choices(varied(organism48_rows(), noise=1e-17))
    assert set(got) == {"delta_by_dict_size.png", "delta_by_k.png", "delta_by_variant.png", "delta_by_a_exclusive.png",
                        "delta_by_l1_excl.png", "delta_by_l1_shared.png", "alpha_curves.png", "cos_vs_effect.png",
                        "steer_by_layer.png", "localization_curve.png", "fvu_vs_delta.png"}
    assert got["steer_by_layer.png"].draw is None  # 1e-17 shows as +0.0: float noise is no variation
    drawn = {name: c.draw() for name, c in got.items() if c.draw is not None}
    assert len(drawn["delta_by_a_exclusive.png"].axes) == 1  # Δ A only: Δ B is flat
    assert drawn["delta_by_a_exclusive.png"].axes[0].get_xlabel() == "a_exclusive = b_exclusive"
    assert [f.label for f in got["delta_by_k.png"].flat] == ["Δ B"]
    assert not choices(varied(organism48_rows(), noise=1.0))["steer_by_layer.png"].flat


def test_plots_have_no_offset_no_overlapping_labels_and_legends_that_match(tmp_path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.ticker import ScalarFormatter

    rows = varied(organism48_rows(), noise=1.0)
    for row in rows:
        row["metrics"]["fvu_a"] = 1.0 + 1e-6 * int(row["trial_id"], 16)  # values matplotlib would offset
    drawn = {c.name: c.draw() for c in plot_choices(build_report([TrialResult(**r) for r in rows])) if c.draw}
    for name, fig in drawn.items():
        FigureCanvasAgg(fig).draw()
        for ax in fig.axes:
            for axis in (ax.xaxis, ax.yaxis):
                formatter = axis.get_major_formatter()
                assert not isinstance(formatter, ScalarFormatter) or not formatter.get_offset(), name
    labels = [label for label in drawn["delta_by_variant.png"].axes[0].get_xticklabels() if label.get_text()]
    assert len(labels) == len(VARIANTS)
    for left, right in zip(labels, labels[1:]):  # slanted labels are parallel strips: apart by spacing × sin(angle)
        angle = math.radians(left.get_rotation())
        spacing = right.get_window_extent().x1 - left.get_window_extent().x1
        height = left.get_fontsize() * drawn["delta_by_variant.png"].dpi / 72
        assert (spacing * math.sin(angle) > height) if angle else not left.get_window_extent().overlaps(
            right.get_window_extent())
    alpha = drawn["alpha_curves.png"].axes[0]
    entries = [t.get_text() for t in alpha.get_legend().get_texts()]
    assert entries == ["32 trials (00000001, …)", "4 trials (00000000, …)", "reference, block 1"]
    assert len(alpha.get_lines()) - 1 == len(entries)  # every line drawn has its entry (the last is the zero line)
    left = drawn["localization_curve.png"].axes[0]
    entries = [t.get_text() for t in left.get_legend().get_texts()]
    assert entries[0] == "k=8, k=16, k=32 (3 trials, the same curve)"
    assert "its 95% CI" in entries and any(e.startswith("random features, same norm") for e in entries)


def test_verdicts_without_the_attribution_come_from_the_reference_or_the_splice():
    """Per layer × positions against the reference (saying when the reference itself does not steer); without a
    reference or an attribution, one sentence on what splicing did."""
    rows = with_reference(synthetic_rows())
    got = verdicts(build_report([TrialResult(**r) for r in rows]))
    assert [v.split(" the ")[0] for v in got] == ["At block 1 (all_tokens)", "At block 1 (last_prompt_token)",
                                                  "At block 3 (all_tokens)", "At block 3 (last_prompt_token)"]
    best = max(r["metrics"]["steer_delta_pp"] for r in rows if r["status"] == "ok" and r["config"]["layer"] == 1
               and r["config"]["positions"] == "all_tokens")
    assert f"single A-exclusive feature moves A by {best:+.1f} [{best - 9:+.1f}, {best + 9:+.1f}] pp" in got[0]
    assert "the reference direction itself does not steer A here" in got[2]
    plain = [r for r in synthetic_rows() if r["status"] == "ok"]
    (sentence,) = verdicts(build_report([TrialResult(**r) for r in plain]))
    delta_a = [r["metrics"]["delta_a_pp"] for r in plain]
    assert sentence.startswith(f"Splicing the reconstruction changes A's tool correctness by "
                               f"{statistics.fmean(delta_a):+.1f} ± {statistics.stdev(delta_a):.1f} pp")


def test_a_train_only_run_says_so_instead_of_an_empty_headline(tmp_path):
    """`--no-eval`: no verdict on splicing or steering, no headline of dashes, and the splice plots are left out
    because nothing was measured."""
    keep = ("fvu_a", "fvu_b", "l0", "dead_frac", "train_s")
    rows = [r | {"metrics": {k: r["metrics"][k] for k in keep}} for r in organism48_rows()]
    report = write_report(write_results(tmp_path / "run", rows))
    fvu_a = statistics.fmean(r["metrics"]["fvu_a"] for r in rows)
    assert verdicts(report) == [f"No trial was judged (trained only): FVU A {fvu_a:.3f}, FVU B "
                                f"{statistics.fmean(r['metrics']['fvu_b'] for r in rows):.3f} (mean over 48 trials)."]
    assert omitted_note(report).startswith("Δ A and Δ B were not measured: 7 plots omitted (delta_by_dict_size")
    out = rendered(report)
    assert "Headline" not in out and "No trial was judged" in out and report["plots"] == []
