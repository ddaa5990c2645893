"""Every trial metric, declared once: its name, label, unit, format and where the report shows it.

The report (headline, per-axis tables, trials table, time table), the live view and the trial's
training reports take their columns, labels and formats from this registry. Adding a metric is
its producer (e.g. `EvalResult.metrics()` in dfc_ray/evaluate.py, `SteerResult.metrics()` in
actors/steering.py, the trial in dfc_ray/sweep/trial.py) plus ONE `metric(...)` line in `METRICS`,
for example

    metric("steer_dev_delta_pp", "steer Δ on dev", "pp", PP, ("trials",), per_target=True),

tests/test_metrics.py fails on a produced key that is not registered here.

Steering metrics of the primary target are `steer_<x>`; the same figures per target are
`steer_<target>_<x>`. A `metric(..., per_target=True)` named `steer_<x>` registers both.

Places a metric can show (`Metric.shows`):
- "axis": a column of each per-axis table (mean ± std per axis value); splice and steering effects
  (pp) come before the other columns.
- "live": a column of the live view while trials run.
- "trials": a column of the trials table; metrics with the same `cell` share one column.
- "time": a row of the time table (per-trial wall-clock seconds).
- "train": part of every training report of a trial (what ASHA and the live view see).
Columns and rows follow the order of `METRICS`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

Place = Literal["axis", "live", "trials", "time", "train"]

GENERIC = "g"
"""Integers as they are, other numbers to 3 significant digits."""
PP = "{:+.1f}"
"""Percentage points, signed."""
PERCENT = "{:.1f}%"
"""For fractions (0..1): applied to 100 × the value."""
FVU = "{:.3f}"
SEPARATION = "{:.2f}"
SHARE = "{:+.2f}"
"""A signed share of a whole (1 = all of it)."""


def number(value: Any) -> float | None:
    """`value` as a float when it is a finite number (not a bool), else None."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else None


def _min_set_size(x: float) -> str:
    return str(int(x)) if x > 0 else "not reached"  # -1 records "not reached"


def _feature_count(x: float) -> str:
    """A count of features (−1: none reached), or a mean or spread of counts to one decimal."""
    return "not reached" if x < 0 else f"{x:g}" if x == int(x) else f"{x:.1f}"


@dataclass(frozen=True)
class Metric:
    """One trial metric."""

    name: str
    """Key in the trial's metrics (results.jsonl); a per-target family's primary name."""
    label: str
    """Short name in tables and the live view."""
    unit: str = ""
    """"pp" (percentage points), "fraction" (0..1), "s", "nats", "MB", … ("" for a ratio or a count)."""
    format: str | Callable[[float], str] = GENERIC
    """How a finite value is shown: a format string (fractions: applied to 100 × value) or a function."""
    shows: frozenset[Place] = frozenset()
    """Where the report shows it besides report.json (module docstring)."""
    cell: str = ""
    """Trials table: the heading of a column this metric shares with others (joined by `CELLS`)."""
    per_target: bool = False
    """Also registers `steer_<target>_<x>` for a `steer_<x>` name."""

    @property
    def fraction(self) -> bool:
        return self.unit == "fraction"

    @property
    def heading(self) -> str:
        """Column heading: pp columns name their unit (fractions carry a % sign in every cell)."""
        return f"{self.label} (pp)" if self.unit == "pp" else self.label

    def text(self, value: Any) -> str:
        return show(value, self.format, self.fraction)


def show(value: Any, fmt: str | Callable[[float], str] = GENERIC, fraction: bool = False) -> str:
    """A value as tables show it: "—" for missing, text as is, numbers per `fmt`."""
    x = number(value)
    if x is None:
        return "—" if value is None else str(value)
    if callable(fmt):
        return fmt(x)
    if fmt == GENERIC:
        return f"{x:g}" if isinstance(value, int) or x == int(x) else f"{x:.3g}"
    return fmt.format(100 * x if fraction else x)


def metric(name: str, label: str, unit: str = "", fmt: str | Callable[[float], str] = GENERIC,
           shows: tuple[Place, ...] = (), **kw: Any) -> Metric:
    """A registry line: `Metric` with `shows` as a tuple."""
    return Metric(name, label, unit, fmt, frozenset(shows), **kw)


def effect(name: str, label: str, unit: str = "pp", fmt: str | Callable[[float], str] = PP,
           shows: tuple[Place, ...] = ()) -> tuple[Metric, Metric, Metric]:
    """An effect and its 95% CI's ends (`<name>_lo`, `<name>_hi`): three registry lines in one."""
    return (metric(name, label, unit, fmt, shows), metric(f"{name}_lo", f"{label}, CI low", unit, fmt),
            metric(f"{name}_hi", f"{label}, CI high", unit, fmt))


AB = "A clean → spliced", "B clean → spliced"
STEERED = "steer (feature, α, target)"
CELLS = {AB[0]: " → ", AB[1]: " → ", STEERED: ", "}
"""Trials-table columns shared by several metrics, and what joins their values."""

METRICS: tuple[Metric, ...] = (
    # training (dfc_ray/train.py's metrics, reported by the trial)
    metric("loss", "loss", shows=("live", "train")),
    metric("fvu", "FVU", fmt=FVU, shows=("train",)),  # mean of A's and B's: ASHA's default metric
    metric("fvu_a", "FVU A", fmt=FVU, shows=("axis", "live", "trials", "train")),
    metric("fvu_b", "FVU B", fmt=FVU, shows=("axis", "live", "trials", "train")),
    metric("l0", "L0", "features", shows=("trials", "train")),
    metric("dead_frac", "dead", "fraction", PERCENT, ("trials", "train")),
    metric("phase", "phase"),  # "train" for intermediate reports, "done" for the final one
    metric("step", "step"),
    metric("status", "status"),
    metric("reason", "reason"),
    metric("steps", "steps"),
    metric("checkpoint", "checkpoint"),
    metric("train_peak_mem_mb", "training peak memory", "MB"),
    metric("node_id", "Ray node the trial ran on"),
    metric("harvest_store", "the harvest store the trial trained on (one per distinct positions)"),
    metric("fast_path_fallbacks", "fast paths replaced by their reference after a failed self-check (selfcheck)"),
    # splice evaluation (EvalResult.metrics)
    metric("a_clean", "A clean", "fraction", PERCENT, ("trials",), cell=AB[0]),
    metric("a_splice", "A spliced", "fraction", PERCENT, ("trials",), cell=AB[0]),
    metric("delta_a_pp", "Δ A", "pp", PP, ("axis", "live", "trials")),
    metric("b_clean", "B clean", "fraction", PERCENT, ("trials",), cell=AB[1]),
    metric("b_splice", "B spliced", "fraction", PERCENT, ("trials",), cell=AB[1]),
    metric("delta_b_pp", "Δ B", "pp", PP, ("axis", "live", "trials")),
    metric("delta_a_pp_lo", "Δ A, CI low", "pp", PP),
    metric("delta_a_pp_hi", "Δ A, CI high", "pp", PP),
    metric("delta_b_pp_lo", "Δ B, CI low", "pp", PP),
    metric("delta_b_pp_hi", "Δ B, CI high", "pp", PP),
    metric("a_clean_lenient", "A clean, lenient", "fraction", PERCENT),
    metric("a_splice_lenient", "A spliced, lenient", "fraction", PERCENT),
    metric("b_clean_lenient", "B clean, lenient", "fraction", PERCENT),
    metric("b_splice_lenient", "B spliced, lenient", "fraction", PERCENT),
    metric("loss_a_ce_clean", "A text CE, clean", "nats"),
    metric("loss_a_ce_splice", "A text CE, spliced", "nats"),
    metric("loss_a_kl", "A text KL(clean ‖ spliced)", "nats"),
    metric("loss_b_ce_clean", "B text CE, clean", "nats"),
    metric("loss_b_ce_splice", "B text CE, spliced", "nats"),
    metric("loss_b_kl", "B text KL(clean ‖ spliced)", "nats"),
    metric("eval_compute_s", "evaluator compute", "s"),
    # steering (SteerResult.metrics): the primary target's, and per target
    metric("steer_feature", "steered feature", shows=("trials",), cell=STEERED, per_target=True),
    metric("steer_alpha", "α", shows=("trials",), cell=STEERED, per_target=True),
    metric("steer_target", "target", shows=("trials",), cell=STEERED),
    metric("steer_delta_pp", "steer Δ", "pp", PP, ("axis", "live", "trials"), per_target=True),
    metric("steer_min_set", "min set", fmt=_min_set_size, shows=("trials",), per_target=True),
    metric("steer_delta_pp_lo", "steer Δ, CI low", "pp", PP, per_target=True),
    metric("steer_delta_pp_hi", "steer Δ, CI high", "pp", PP, per_target=True),
    metric("steer_random_feature_pp", "control: random A-exclusive feature", "pp", PP, per_target=True),
    metric("steer_random_direction_pp", "control: random direction", "pp", PP, per_target=True),
    metric("steer_random_feature_pp_lo", "control: random A-exclusive feature, CI low", "pp", PP, per_target=True),
    metric("steer_random_feature_pp_hi", "control: random A-exclusive feature, CI high", "pp", PP, per_target=True),
    metric("steer_random_direction_pp_lo", "control: random direction, CI low", "pp", PP, per_target=True),
    metric("steer_random_direction_pp_hi", "control: random direction, CI high", "pp", PP, per_target=True),
    # the positive control: the A − B difference of means through the same protocol (dfc_ray/reference.py)
    metric("steer_reference_pp", "reference Δ", "pp", PP, ("axis", "live", "trials"), per_target=True),
    metric("steer_reference_pp_lo", "reference Δ, CI low", "pp", PP, per_target=True),
    metric("steer_reference_pp_hi", "reference Δ, CI high", "pp", PP, per_target=True),
    metric("steer_reference_alpha", "reference α", per_target=True),
    metric("steer_reference_random_direction_pp", "control: random direction at the reference's α", "pp", PP,
           per_target=True),
    metric("steer_reference_random_direction_pp_lo", "reference's random-direction control, CI low", "pp", PP,
           per_target=True),
    metric("steer_reference_random_direction_pp_hi", "reference's random-direction control, CI high", "pp", PP,
           per_target=True),
    metric("steer_reference_sig", "reference moves the target beyond its CI (1/0)", per_target=True),
    metric("steer_reference_label", "reference verdict", per_target=True),
    metric("steer_cos_reference", "cos to reference", fmt="{:+.2f}", shows=("axis", "trials"), per_target=True),
    metric("steer_share_of_reference", "share of reference", fmt="{:.2f}", shows=("axis", "trials"), per_target=True),
    metric("steer_compute_s", "steerer compute", "s"),
    metric("steer_skipped", "why steering was skipped"),
    metric("top_features", "top A-exclusive features (feature, Cohen's d, AUROC)"),
    metric("alpha_curve", "dev Δ vs α of the chosen feature"),
    metric("reference_alpha_curve", "dev Δ vs α of the reference direction"),
    # where the A − B difference lives (Steerer.localize: dfc_ray/attribution.py and the causal tests)
    metric("diff_n50", "features for 50% of the difference", fmt=_feature_count, shows=("axis", "trials")),
    metric("diff_n90", "features for 90% of the difference", fmt=_feature_count),
    metric("diff_share_a_exclusive", "A-exclusive share of the difference", fmt=SHARE, shows=("axis", "trials")),
    metric("diff_share_b_exclusive", "B-exclusive share of the difference", fmt=SHARE),
    metric("diff_share_shared", "shared features' share of the difference", fmt=SHARE),
    metric("diff_reference_norm", "‖v‖, the reference direction's norm"),
    metric("diff_features", "Σ of the feature terms c_j along v̂"),
    metric("diff_bias", "the decoder biases' part of v along v̂"),
    metric("diff_norm_means", "the normalization means' part of v along v̂"),
    metric("diff_error", "the reconstruction error's part of v along v̂"),
    metric("diff_cos_reconstruction", "cos(mean x̂_A − x̂_B, v)", fmt="{:.3f}"),
    metric("diff_cos_norm_means", "cos(mean_A − mean_B, v)", fmt="{:.3f}"),
    metric("diff_top", "largest terms of the difference (feature, partition, c_j, cos to v, Latent Scaling β)"),
    metric("loc_n50", "features for 50% of the reference effect (curve, dev)", fmt=_feature_count),
    *effect("loc_reference_pp", "the curve's yardstick: the reference's effect on B"),
    metric("loc_curve", "localisation curve B ← A (n, α, dev and test Δ, share of the reference)"),
    metric("loc_curve_n", "curve: n chosen on dev"),
    metric("loc_curve_alpha", "curve: α at the chosen n"),
    *effect("loc_curve_pp", "curve: top-n mean writes steering B"),
    *effect("loc_curve_share", "curve: share of the reference effect", "", SHARE, ("axis",)),
    *effect("loc_curve_random_pp", "curve control: n random features, same norm"),
    metric("loc_ablate_b_n", "ablation in B: n chosen on dev"),
    *effect("loc_ablate_b_pp", "ablation of top B-exclusive contributors in B"),
    *effect("loc_ablate_b_random_pp", "ablation control: n random B-exclusive features, same norm"),
    metric("loc_patch_a_n", "patch in A: n chosen on dev"),
    *effect("loc_patch_a_pp", "patch A → B of the top contributors in A"),
    *effect("loc_patch_a_random_pp", "patch control: n random features, same norm"),
    metric("loc_compute_s", "localisation compute", "s"),
    # per-feature figures inside top_features (the best-features table)
    metric("cohens_d", "Cohen's d", fmt=SEPARATION),
    metric("auroc", "AUROC", fmt=SEPARATION),
    # wall clock per trial
    metric("train_s", "training", "s", shows=("time",)),
    metric("eval_s", "splice evaluation (waiting for the evaluator)", "s", shows=("time",)),
    metric("steer_s", "steering (waiting for the steerer)", "s", shows=("time",)),
    metric("loc_s", "localisation (waiting for the steerer, which steers first)", "s", shows=("time",)),
    metric("judge_s", "evaluation + steering (in parallel)", "s", shows=("time",)),
)

REGISTRY: dict[str, Metric] = {m.name: m for m in METRICS}
_PER_TARGET = re.compile(r"steer_([A-Za-z0-9]+)_(.+)")


def find(name: str) -> Metric | None:
    """The registered metric `name` is (a `steer_<target>_<x>` name finds its family), else None."""
    if name in REGISTRY:
        return REGISTRY[name]
    if (match := _PER_TARGET.fullmatch(name)) and (family := REGISTRY.get(f"steer_{match[2]}")) and family.per_target:
        return family
    return None


def shown_in(place: Place) -> list[Metric]:
    """The metrics a place shows, in its order."""
    shown = [m for m in METRICS if place in m.shows]
    return sorted(shown, key=lambda m: m.unit != "pp") if place == "axis" else shown


def names(place: Place) -> list[str]:
    return [m.name for m in shown_in(place)]


def fmt(name: str, value: Any) -> str:
    """A value as tables show it, by its metric's format (anything unregistered, e.g. a config
    axis, in the generic one)."""
    found = find(name)
    return found.text(value) if found else show(value)


@dataclass(frozen=True)
class Headline:
    """A headline figure of report.json: a summary over successful trials of one trial metric."""

    key: str
    """Its key in report.json (`headline`, or `baseline` for the clean rates) and in SEED_STUDY."""
    metric: str
    """The trial metric it summarizes."""
    label: str
    """Its row in the headline table."""
    baseline: bool = False
    """A clean rate: report.json keeps only its mean, under `baseline`."""
    control: bool = False
    """A steering control (a random feature or direction at the chosen α)."""
    feature_count: bool = False
    """A number of features where −1 means "none reached": summarized over the trials that reached one,
    with how many measured it (`n_measured`)."""

    @property
    def fraction(self) -> bool:
        return REGISTRY[self.metric].fraction


HEADLINE: tuple[Headline, ...] = (  # in the headline table's order
    Headline("a_correct", "a_clean", "A tool correctness, clean", baseline=True),
    Headline("a_splice", "a_splice", "A tool correctness, spliced"),
    Headline("delta_a_pp", "delta_a_pp", "Δ A = spliced − clean (pp)"),
    Headline("b_correct", "b_clean", "B tool correctness, clean", baseline=True),
    Headline("b_splice", "b_splice", "B tool correctness, spliced"),
    Headline("delta_b_pp", "delta_b_pp", "Δ B = spliced − clean (pp), spillover"),
    # steer_delta_pp is already the trial's best feature: chosen on the dev split, measured on test
    Headline("steer_best_pp", "steer_delta_pp", "best single-feature steering Δ (pp)"),
    Headline("steer_reference_pp", "steer_reference_pp", "positive control: reference direction A − B (pp)"),
    # where the difference lives (Steerer.localize): attribution of A − B to features, and the curve B ← A
    Headline("diff_n50", "diff_n50", "features carrying 50% of the difference (attribution)", feature_count=True),
    Headline("loc_n50", "loc_n50", "features needed for 50% of the reference effect (curve, chosen on dev)",
             feature_count=True),
    Headline("loc_curve_share", "loc_curve_share", "the curve's chosen n: share of the reference effect (test)"),
    Headline("diff_share_a_exclusive", "diff_share_a_exclusive", "A-exclusive share of the difference"),
    Headline("steer_random_feature_pp", "steer_random_feature_pp", "control: random A-exclusive feature (pp)",
             control=True),
    Headline("steer_random_direction_pp", "steer_random_direction_pp", "control: random direction (pp)",
             control=True),
)
CONTROLS = tuple(h.key for h in HEADLINE if h.control)
