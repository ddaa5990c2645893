"""Reading a report the way a researcher does: the terminal report at 80 columns leads with a verdict per layer
and the headline; plots with nothing to show are left out and said so; the header is human text. The run is
organism48-shaped (48 trials, Δ A and Δ B exactly 0, steering B against a +40 pp reference, the localisation
curve on three trials), with known numbers."""

from __future__ import annotations

import io
import itertools
import json
import shutil
from pathlib import Path

import pytest
from rich.console import Console
from test_report import write_results

from dfc_ray.report import print_report, write_report

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
