"""Sweep reports: everything a user sees of a sweep's results.

- `load_results(run)` reads `<run>/results.jsonl` (a folder, file:// or s3:// prefix).
- `build_report(results, run_info)` computes the `report.json` content: headline mean ± std over
  successful trials next to the seed study's published numbers, per-axis breakdowns, best features.
- `write_report(run)` writes report.json, report.md and plots/*.png; `print_report` prints it.
- `LiveView` is the table shown while trials run; `dfc-ray report RUN` rebuilds a report.

Everything after `build_report` reads only the report dict, so a report can be re-rendered from
report.json alone. What each section and plot means: docs/report.md.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

RESULTS = "results.jsonl"
# The seed study's PUBLISHED numbers (docs/ARCHITECTURE.md), the only hard-coded figures here: Qwen2.5-3B vs
# its GRPO tool-use fine-tune, layer 13, 48 crosscoder variants, 40 prompts, lenient scoring.
SEED_STUDY = {
    "source": "published numbers; Qwen2.5-3B vs a GRPO tool-use fine-tune, layer 13, "
              "48 variants, n = 40 prompts, lenient name-in-tool-list scoring",
    "a_correct": 0.19,
    "a_splice": 0.50,
    "delta_a_pp": {"mean": 31.1, "std": 9.7, "n": 48},
    "delta_b_pp": {"mean": 6.8, "std": 5.0, "n": 48},
    "steer_best_pp": {"mean": 65.0, "std": None, "n": 1},
}
CONTROLS = ("steer_random_feature_pp", "steer_random_direction_pp")
# headline key -> per-trial metric it summarizes (steer_delta_pp is already the trial's best
# feature: chosen on the dev split, measured on the test split)
HEADLINE = {"delta_a_pp": "delta_a_pp", "delta_b_pp": "delta_b_pp", "steer_best_pp": "steer_delta_pp",
            "a_splice": "a_splice", "b_splice": "b_splice", **{c: c for c in CONTROLS}}
AXIS_METRICS = ("delta_a_pp", "delta_b_pp", "steer_delta_pp", "fvu_a", "fvu_b")
TIMES = {"train_s": "training", "eval_s": "splice evaluation (waiting for the evaluator)",
         "steer_s": "steering (waiting for the steerer)", "judge_s": "evaluation + steering (in parallel)"}
"""Per-trial wall-clock metrics the sweep records, in seconds, and what each covers."""
FRACTIONS = {"a_clean", "a_splice", "b_clean", "b_splice", "a_correct", "b_correct", "dead_frac"}
BEST_FEATURES = 10
TUNE_STATUSES = {"terminated": "ok", "error": "failed"}  # Ray Tune's names, lower-cased


@dataclass
class TrialResult:
    """One line of results.jsonl."""

    trial_id: str
    """Ray Tune's trial id."""
    config: dict[str, Any]
    """The trial's hyper-parameters (dict_size, k, a_exclusive, l1_excl, layer, variant, …)."""
    metrics: dict[str, Any] = field(default_factory=dict)
    """Final metrics under the contract's names (docs/ARCHITECTURE.md); optional ones may be missing."""
    status: str = "ok"
    """"ok" for a finished trial; anything else ("failed", "diverged", …) counts as failed."""
    error: str | None = None
    """Why a failed trial failed."""

    @property
    def ok(self) -> bool:
        return self.status == "ok"


# ---------------------------------------------------------------- reading results


def _read(run_dir: str | Path, file: str) -> tuple[str | None, str]:
    """Text of `<run_dir>/<file>` (None when missing) and a credential-free name for messages."""
    from dfc_ray.fs import open_fs, redact

    fs, root = open_fs(str(run_dir))
    name = f"{redact(str(run_dir)).rstrip('/')}/{file}"
    try:
        with fs.open_input_stream(f"{root}/{file}") as f:
            return f.read().decode(), name
    except FileNotFoundError:
        return None, name


def _parse_line(line: str, where: str) -> TrialResult:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
    row.setdefault("metrics", {})
    for name, kind in (("trial_id", str), ("config", dict), ("metrics", dict), ("status", str)):
        if not isinstance(row.get(name), kind):
            raise ValueError(f"{where}: field {name!r} is {str(row.get(name))[:40]!r}; expected a {kind.__name__}")
    return TrialResult(row["trial_id"], row["config"], row["metrics"], row["status"], row.get("error"))


def load_results(run_dir: str | Path) -> list[TrialResult]:
    """Trials of `<run_dir>/results.jsonl`, a line per trial; a trial reported twice (a resumed
    sweep) keeps its last line and its first position. `run_dir` may be a path, file:// or s3:// prefix (credentials from
    the standard AWS environment, never printed)."""
    text, name = _read(run_dir, RESULTS)
    if text is None:
        raise FileNotFoundError(f"{name}: no such file (expected a dfc-ray sweep run folder)")
    trials: dict[str, TrialResult] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            trial = _parse_line(line, f"{name}: line {number}")
            trials[trial.trial_id] = trial
    return list(trials.values())


# ---------------------------------------------------------------- the report dict


def _number(value: Any) -> float | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else None


def summarize(values: Iterable[Any]) -> dict[str, Any]:
    """`{mean, std, n}` of the finite numbers in `values`; std is the sample std (n − 1), None below n = 2."""
    xs = [x for x in map(_number, values) if x is not None]
    return {"mean": statistics.fmean(xs) if xs else None,
            "std": statistics.stdev(xs) if len(xs) > 1 else None, "n": len(xs)}


def _descending(value: Any) -> tuple[bool, float]:
    """Sort key: larger numbers first, missing values last."""
    x = _number(value)
    return (x is None, -(x or 0.0))


def _json_safe(obj: Any) -> Any:
    """NaN/inf (a diverged trial) become null: report.json stays strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def _key(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def varying_axes(configs: Sequence[dict[str, Any]]) -> list[str]:
    """Config keys whose value differs between trials (a missing key counts as null)."""
    keys = list(dict.fromkeys(k for c in configs for k in c))
    return [k for k in keys if len({_key(c.get(k)) for c in configs}) > 1]


def _sort_key(value: Any) -> tuple:
    if _number(value) is not None:
        return (0, float(value), "")
    return (1 if isinstance(value, str) else 2, 0.0, _key(value))


def _per_axis(results: Sequence[TrialResult], axis: str) -> list[dict[str, Any]]:
    groups: dict[str, list[TrialResult]] = {}
    for t in results:
        groups.setdefault(_key(t.config.get(axis)), []).append(t)
    rows = []
    for trials in groups.values():
        ok = [t for t in trials if t.ok]
        rows.append({"value": trials[0].config.get(axis), "n_trials": len(trials), "n_failed": len(trials) - len(ok),
                     **{m: summarize(t.metrics.get(m) for t in ok) for m in AXIS_METRICS}})
    return sorted(rows, key=lambda row: _sort_key(row["value"]))


def _best_features(ok: Sequence[TrialResult]) -> list[dict[str, Any]]:
    """Top features over all trials by Cohen's d. A feature index names a feature of ITS trial's
    dictionary only, so each row keeps its trial."""
    rows = []
    for t in ok:
        for feature in t.metrics.get("top_features") or []:
            row = {"trial_id": t.trial_id, **feature}
            if feature.get("feature") == t.metrics.get("steer_feature"):
                row |= {"steer_alpha": t.metrics.get("steer_alpha"), "steer_delta_pp": t.metrics.get("steer_delta_pp")}
            rows.append(row)
    rows.sort(key=lambda r: _descending(r.get("cohens_d")))
    return rows[:BEST_FEATURES]


def min_set_size(metrics: dict[str, Any]) -> int | None:
    """The trial's minimal steerable set size; None when not measured or not reached (recorded as -1)."""
    size = _number(metrics.get("steer_min_set"))
    return int(size) if size is not None and size > 0 else None


def _min_sets(ok: Sequence[TrialResult]) -> dict[str, Any]:
    """How often a minimal steerable set was found, and its sizes, over trials that ran steering."""
    steered = [t for t in ok if _number(t.metrics.get("steer_min_set")) is not None]
    sizes = [size for t in steered if (size := min_set_size(t.metrics)) is not None]
    return {"n_steered": len(steered), "n_reached": len(sizes), "sizes": summarize(sizes)}


def build_report(results: Sequence[TrialResult], run_info: dict[str, Any] | None = None) -> dict[str, Any]:
    """The report.json content. Every statistic is over successful trials (status "ok")."""
    ok = [t for t in results if t.ok]
    headline = {key: summarize(t.metrics.get(metric) for t in ok) for key, metric in HEADLINE.items()}
    baseline = {"a_correct": summarize(t.metrics.get("a_clean") for t in ok)["mean"],
                "b_correct": summarize(t.metrics.get("b_clean") for t in ok)["mean"]}
    ours = {**{k: v["mean"] for k, v in headline.items()}, **baseline}
    comparison = {}
    for key in ("a_correct", "a_splice", "delta_a_pp", "delta_b_pp", "steer_best_pp"):
        seed = SEED_STUDY[key]["mean"] if isinstance(SEED_STUDY[key], dict) else SEED_STUDY[key]
        diff = None if ours[key] is None else (ours[key] - seed) * (100 if key in FRACTIONS else 1)
        comparison[key] = {"ours": ours[key], "seed": seed, "difference_pp": diff}
    return _json_safe({
        "run": dict(run_info or {}),
        "n_trials": len(results),
        "n_failed": len(results) - len(ok),
        "baseline": baseline,
        "headline": headline,
        "seed_study": SEED_STUDY,
        "comparison": comparison,
        "per_axis": {axis: _per_axis(results, axis) for axis in varying_axes([t.config for t in results])},
        "trials": [{"trial_id": t.trial_id, "config": t.config, "metrics": t.metrics, "status": t.status}
                   for t in results],
        "failed": [{"trial_id": t.trial_id, "status": t.status, "error": t.error, "config": t.config}
                   for t in results if not t.ok],
        "best_features": _best_features(ok),
        "min_set": _min_sets(ok),
        "seconds_per_trial": {name: summarize(t.metrics.get(name) for t in ok) for name in TIMES},
    })


# ---------------------------------------------------------------- tables (rendered to rich and markdown)


@dataclass
class Section:
    """One table of the report, rendered the same way in the terminal and in report.md."""

    title: str
    """Section heading."""
    columns: list[str]
    """Column headers."""
    rows: list[list[str]]
    """Formatted cells."""
    note: str = ""
    """One line printed under the heading."""


def fmt(name: str, value: Any) -> str:
    """A metric value as shown in tables: fractions as %, pp signed, FVU to 3 decimals."""
    x = _number(value)
    if x is None:
        return "—" if value is None else str(value)
    if name in FRACTIONS:
        return f"{100 * x:.1f}%"
    if name.endswith("_pp"):
        return f"{x:+.1f}"
    if name in ("cohens_d", "auroc"):
        return f"{x:.2f}"
    if name.startswith("fvu"):
        return f"{x:.3f}"
    return f"{x:g}" if isinstance(value, int) or x == int(x) else f"{x:.3g}"


def fmt_stat(name: str, stat: dict[str, Any] | None) -> str:
    if not stat or stat.get("mean") is None:
        return "—"
    std = "" if stat.get("std") is None else f" ± {fmt(name, stat['std']).lstrip('+')}"
    return f"{fmt(name, stat['mean'])}{std} (n={stat['n']})"


def _cell(metrics: dict[str, Any], name: str) -> str:
    """A trial's metric, with its CI `<name>_ci` [lo, hi] when reported."""
    text = fmt(name, metrics.get(name))
    ci = metrics.get(f"{name}_ci")
    if isinstance(ci, (list, tuple)) and len(ci) == 2:
        text += f" [{fmt(name, ci[0])}, {fmt(name, ci[1])}]"
    return text


def _min_set_cell(metrics: dict[str, Any]) -> str:
    if _number(metrics.get("steer_min_set")) is None:
        return "—"
    size = min_set_size(metrics)
    return "not reached" if size is None else str(size)


def short_config(config: dict[str, Any], axes: Sequence[str]) -> str:
    return " ".join(f"{a}={config[a]:g}" if _number(config.get(a)) is not None else f"{a}={config.get(a)}"
                    for a in axes if a in config)


def _min_set_text(min_set: dict[str, Any] | None) -> str:
    if not min_set or not min_set["n_steered"]:
        return "—"
    text = f"{min_set['n_reached']} of {min_set['n_steered']}"
    return text + (f", size {fmt_stat('size', min_set['sizes'])}" if min_set["n_reached"] else "")


def _time_section(report: dict[str, Any]) -> Section | None:
    """Where the wall-clock time went: the run's stages and the per-trial phases."""
    stages = (report["run"].get("seconds") or {}).items()
    rows = [[f"run: {name.replace('_', ' ')}", f"{value:.1f}"] for name, value in stages]
    rows += [[f"per trial: {TIMES[name]}", fmt_stat(name, stat)]
             for name, stat in (report.get("seconds_per_trial") or {}).items() if stat.get("mean") is not None]
    return Section("Time (seconds, wall clock)", ["stage", "seconds"], rows) if rows else None


def _headline_section(report: dict[str, Any]) -> Section:
    h, seed, comp = report["headline"], report["seed_study"], report["comparison"]
    rows = [
        ("A tool correctness, clean", "a_correct", fmt("a_correct", report["baseline"]["a_correct"]), fmt("a_correct", seed["a_correct"])),
        ("A tool correctness, spliced", "a_splice", fmt_stat("a_splice", h["a_splice"]), fmt("a_splice", seed["a_splice"])),
        ("Δ A = spliced − clean (pp)", "delta_a_pp", fmt_stat("delta_a_pp", h["delta_a_pp"]), fmt_stat("delta_a_pp", seed["delta_a_pp"])),
        ("B tool correctness, clean", "b_correct", fmt("b_correct", report["baseline"]["b_correct"]), "—"),
        ("B tool correctness, spliced", "b_splice", fmt_stat("b_splice", h["b_splice"]), "—"),
        ("Δ B = spliced − clean (pp), spillover", "delta_b_pp", fmt_stat("delta_b_pp", h["delta_b_pp"]), fmt_stat("delta_b_pp", seed["delta_b_pp"])),
        ("best single-feature steering Δ (pp)", "steer_best_pp", fmt_stat("steer_best_pp", h["steer_best_pp"]), fmt_stat("steer_best_pp", seed["steer_best_pp"])),
        ("control: random A-exclusive feature (pp)", "", fmt_stat("steer_random_feature_pp", h["steer_random_feature_pp"]), "—"),
        ("control: random direction (pp)", "", fmt_stat("steer_random_direction_pp", h["steer_random_direction_pp"]), "—"),
        ("minimal steerable set reached (trials)", "", _min_set_text(report.get("min_set")), "—"),
    ]
    table = [[label, ours, theirs, fmt("difference_pp", comp.get(key, {}).get("difference_pp"))]
             for label, key, ours, theirs in rows]
    note = (f"{report['n_trials']} trials, {report['n_trials'] - report['n_failed']} ok, {report['n_failed']} failed; "
            f"mean ± sample std over successful trials. Seed study: {seed['source']}.")
    return Section("Headline: ours vs the seed study", ["", "ours", "seed study (published)", "ours − seed (pp)"], table, note)


def sections(report: dict[str, Any]) -> list[Section]:
    """The report's tables, in reading order."""
    out = [_headline_section(report)]
    for axis, rows in report["per_axis"].items():
        out.append(Section(f"By {axis}", [axis, "trials", "failed", "Δ A (pp)", "Δ B (pp)", "steer Δ (pp)", "FVU A", "FVU B"],
                           [[fmt(axis, r["value"]), str(r["n_trials"]), str(r["n_failed"]),
                             *(fmt_stat(m, r[m]) for m in AXIS_METRICS)] for r in rows]))
    axes = list(report["per_axis"])
    ranked = sorted(report["trials"], key=lambda t: (t["status"] != "ok", *_descending(t["metrics"].get("delta_a_pp"))))
    out.append(Section("Trials (by Δ A)", ["trial", "config", "status", "FVU A", "FVU B", "L0", "dead", "A clean → spliced",
                                           "Δ A (pp)", "B clean → spliced", "Δ B (pp)", "steer (feature, α, target)", "steer Δ (pp)",
                                           "min set"],
                       [[t["trial_id"], short_config(t["config"], axes), t["status"],
                         *(_cell(t["metrics"], m) for m in ("fvu_a", "fvu_b", "l0", "dead_frac")),
                         f"{_cell(t['metrics'], 'a_clean')} → {_cell(t['metrics'], 'a_splice')}", _cell(t["metrics"], "delta_a_pp"),
                         f"{_cell(t['metrics'], 'b_clean')} → {_cell(t['metrics'], 'b_splice')}", _cell(t["metrics"], "delta_b_pp"),
                         ", ".join(fmt(m, t["metrics"].get(m)) for m in ("steer_feature", "steer_alpha", "steer_target")),
                         _cell(t["metrics"], "steer_delta_pp"), _min_set_cell(t["metrics"])] for t in ranked]))
    if report["best_features"]:
        out.append(Section("Best features (by Cohen's d, tool vs non-tool prompts)",
                           ["trial", "feature", "Cohen's d", "AUROC", "steered α", "steer Δ (pp)"],
                           [[f["trial_id"], fmt("feature", f.get("feature")), fmt("cohens_d", f.get("cohens_d")), fmt("auroc", f.get("auroc")),
                             fmt("alpha", f.get("steer_alpha")) if "steer_alpha" in f else "", fmt("steer_delta_pp", f.get("steer_delta_pp"))
                             if "steer_delta_pp" in f else ""] for f in report["best_features"]],
                           "A feature index names a feature of its own trial's dictionary."))
    if (time_section := _time_section(report)) is not None:
        out.append(time_section)
    if report["failed"]:
        out.append(Section("Failed trials", ["trial", "config", "status", "error"],
                           [[f["trial_id"], short_config(f["config"], axes), f["status"], str(f["error"] or "")]
                            for f in report["failed"]]))
    return out


def print_report(report: dict[str, Any], console: Console | None = None) -> None:
    """The terminal report: headline panel, per-axis tables, trials, best features, failures."""
    console = console or Console()
    for i, section in enumerate(sections(report)):
        table = Table(title=None if i == 0 else section.title, caption=section.note or None, title_justify="left")
        for column in section.columns:
            table.add_column(column, overflow="fold")
        for row in section.rows:
            table.add_row(*(Text(cell) for cell in row))  # Text: errors may contain [markup]
        console.print(Panel(table, title=section.title) if i == 0 else table)


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def to_markdown(report: dict[str, Any]) -> str:
    lines = [f"# dfc-ray sweep report{': ' + str(report['run']['name']) if report['run'].get('name') else ''}", ""]
    lines += [f"- {k}: {_md_cell(str(v))}" for k, v in report["run"].items()] + [""]
    for section in sections(report):
        lines += [f"## {section.title}", ""] + ([section.note, ""] if section.note else [])
        lines += ["| " + " | ".join(map(_md_cell, section.columns)) + " |", "|" + "---|" * len(section.columns)]
        lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in section.rows] + [""]
    if report.get("plots"):
        lines += ["## Plots", ""] + [f"![{Path(p).stem}]({p})" for p in report["plots"]] + [""]
    return "\n".join(lines)


# ---------------------------------------------------------------- plots


def _figure(ncols: int, title: str):
    from matplotlib.figure import Figure  # no pyplot: no global backend state, Agg canvas on save

    fig = Figure(figsize=(5.5 * ncols, 4.2), layout="constrained")
    fig.suptitle(title)
    return fig, fig.subplots(1, ncols, squeeze=False)[0]


def _box_strip(ax, labels: list[str], groups: list[list[float]], xlabel: str, ylabel: str) -> None:
    """Box plot per group with every trial drawn on top (few trials per value: show them all)."""
    rng = np.random.default_rng(0)
    filled = [i for i, g in enumerate(groups) if g]
    if filled:
        ax.boxplot([groups[i] for i in filled], positions=filled, widths=0.5, showfliers=False)
    for i, g in enumerate(groups):
        ax.scatter(i + rng.uniform(-0.12, 0.12, len(g)), g, s=14, alpha=0.7, color="tab:blue", zorder=3)
    ax.axhline(0, color="grey", lw=0.8, ls="--")
    ax.set_xticks(range(len(labels)), labels)
    ax.set_xlim(-0.6, len(labels) - 0.4)
    ax.set(xlabel=xlabel, ylabel=ylabel)


def _values(trials: list[dict], metric: str) -> list[float]:
    return [x for x in (_number(t["metrics"].get(metric)) for t in trials) if x is not None]


def write_plots(report: dict[str, Any], out_dir: str | Path) -> list[str]:
    """plots/*.png for a report; returns their paths relative to the report folder."""
    out_dir = Path(out_dir)
    (out_dir / "plots").mkdir(parents=True, exist_ok=True)
    ok = [t for t in report["trials"] if t["status"] == "ok"]
    written: list[str] = []
    if not ok:
        return written  # nothing measured, nothing to draw

    def save(fig, name: str) -> None:
        fig.savefig(out_dir / "plots" / name, dpi=110)
        written.append(f"plots/{name}")

    for axis, rows in report["per_axis"].items():
        labels = [fmt(axis, r["value"]) for r in rows]
        groups = [[t for t in ok if _key(t["config"].get(axis)) == _key(r["value"])] for r in rows]
        fig, (ax_a, ax_b) = _figure(2, f"Splice Δ tool correctness by {axis}")
        _box_strip(ax_a, labels, [_values(g, "delta_a_pp") for g in groups], axis, "Δ A, spliced − clean (pp)")
        _box_strip(ax_b, labels, [_values(g, "delta_b_pp") for g in groups], axis, "Δ B, spliced − clean (pp)")
        save(fig, f"delta_by_{re.sub(r'[^A-Za-z0-9_.-]', '_', axis)}.png")

    curves = [(t["trial_id"], t["metrics"]["alpha_curve"]) for t in ok if t["metrics"].get("alpha_curve")]
    if curves:
        fig, (ax,) = _figure(1, "Steering: Δ tool correctness vs α, one line per trial")
        for trial_id, curve in curves:
            points = sorted((p["alpha"], p["delta_pp"]) for p in curve)
            ax.plot(*zip(*points), marker="o", ms=3, lw=1, alpha=0.7, label=trial_id)
        if len(curves) <= 10:
            ax.legend(fontsize=7)
        ax.axhline(0, color="grey", lw=0.8, ls="--")
        ax.set(xlabel="α (steering scale)", ylabel="Δ tool correctness (pp)")
        save(fig, "alpha_curves.png")

    layers = sorted({t["config"]["layer"] for t in ok if _number(t["config"].get("layer")) is not None})
    if layers and any(_number(t["metrics"].get("steer_delta_pp")) is not None for t in ok):  # one layer too
        groups = [[t for t in ok if t["config"].get("layer") == layer] for layer in layers]
        fig, (ax,) = _figure(1, "Best single-feature steering Δ by layer (test split)")
        _box_strip(ax, [fmt("layer", layer) for layer in layers], [_values(g, "steer_delta_pp") for g in groups],
                   "layer", "steering Δ tool correctness (pp)")
        for control, marker in zip(CONTROLS, ("x", "+")):
            means = [(i, summarize(t["metrics"].get(control) for t in g)["mean"]) for i, g in enumerate(groups)]
            means = [(i, m) for i, m in means if m is not None]
            if means:
                ax.scatter(*zip(*means), marker=marker, s=60, color="tab:red", zorder=4,
                           label=f"mean {control.removeprefix('steer_').removesuffix('_pp').replace('_', ' ')} control")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        save(fig, "steer_by_layer.png")

    fig, axes = _figure(2, "Reconstruction quality vs splice effect")
    variants = sorted({str(t["config"].get("variant", "")) for t in ok})
    for ax, (fvu, delta, label) in zip(axes, (("fvu_a", "delta_a_pp", "A"), ("fvu_b", "delta_b_pp", "B"))):
        for variant in variants:
            points = [(_number(t["metrics"].get(fvu)), _number(t["metrics"].get(delta))) for t in ok
                      if str(t["config"].get("variant", "")) == variant]
            points = [p for p in points if None not in p]
            if points:
                ax.scatter(*zip(*points), s=18, alpha=0.8, label=variant or None)
        ax.set(xlabel=f"FVU {label} (fraction of variance unexplained)", ylabel=f"Δ {label}, spliced − clean (pp)")
        if len(variants) > 1:
            ax.legend(fontsize=8)
    save(fig, "fvu_vs_delta.png")
    return written


# ---------------------------------------------------------------- writing


def _run_info(run_dir: str | Path) -> dict[str, Any]:
    """The run block of an earlier report.json in `run_dir` (the sweep's settings), else the run's location."""
    text, name = _read(run_dir, "report.json")
    try:
        return json.loads(text)["run"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return {"run_dir": name.removesuffix("/report.json")}


def write_report(run_dir: str | Path, results: Sequence[TrialResult] | None = None,
                 run_info: dict[str, Any] | None = None, out_dir: str | Path | None = None) -> dict[str, Any]:
    """Write report.json, report.md and plots/*.png into `out_dir` (default: `run_dir`, local only)
    from `results` (default: `<run_dir>/results.jsonl`). Returns the report dict."""
    if out_dir is None:
        if str(run_dir).startswith("s3://"):
            raise ValueError(f"write_report: run {run_dir!r} is on S3; give a local out_dir for the report files")
        out_dir = str(run_dir).removeprefix("file://")
    results = load_results(run_dir) if results is None else results
    report = build_report(results, _run_info(run_dir) if run_info is None else run_info)
    out_dir = Path(out_dir)
    report["plots"] = write_plots(report, out_dir)
    (out_dir / "report.json").write_text(json.dumps(report, indent=1, allow_nan=False) + "\n")
    (out_dir / "report.md").write_text(to_markdown(report))
    return report


# ---------------------------------------------------------------- live view


class LiveView:
    """What the user watches while trials run: a row per trial and a done/failed/running bar.

    On a terminal it redraws in place (rich Live); elsewhere (CI logs, files) it prints one line
    per trial state change. The sweep calls `update` from its Tune callback.
    """

    COLUMNS = {"loss": "loss", "fvu_a": "FVU A", "fvu_b": "FVU B", "delta_a_pp": "Δ A", "delta_b_pp": "Δ B",
               "steer_delta_pp": "steer Δ"}

    def __init__(self, total: int, console: Console | None = None, axes: Sequence[str] | None = None,
                 title: str = "sweep") -> None:
        self.total, self.title, self.axes = total, title, axes
        self.console = console or Console()
        self.trials: dict[str, dict[str, Any]] = {}
        self._live = Live(self._render(), console=self.console, refresh_per_second=4) if self.console.is_terminal else None

    def __enter__(self) -> "LiveView":
        if self._live:
            self._live.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._live:
            self._live.update(self._render())
            self._live.stop()

    def counts(self) -> dict[str, int]:
        """Trials finished ok, failed, and running now (pending ones are in none of these)."""
        statuses = [t["status"] for t in self.trials.values()]
        done, running = statuses.count("ok"), sum(s in ("running", "pending") for s in statuses)
        return {"done": done, "failed": len(statuses) - done - running, "running": statuses.count("running")}

    def update(self, trial_id: str, config: dict[str, Any], status: str, metrics: dict[str, Any] | None = None) -> None:
        """Record a trial's state; `metrics` merge into what it reported before (step, loss, FVU, Δ …).
        Tune's own statuses are accepted too (TERMINATED → ok, ERROR → failed)."""
        status = TUNE_STATUSES.get(status.lower(), status.lower())
        trial = self.trials.setdefault(trial_id, {"config": config, "status": None, "metrics": {}})
        changed = trial["status"] != status
        trial["config"], trial["status"] = config, status
        trial["metrics"].update(metrics or {})
        if self._live:
            self._live.update(self._render())
        elif changed:
            self.console.print(Text(self._line(trial_id)), soft_wrap=True)

    def _config(self, config: dict[str, Any]) -> str:
        axes = self.axes if self.axes is not None else [k for k, v in config.items() if _number(v) is not None or isinstance(v, str)]
        return short_config(config, axes)

    @staticmethod
    def _step(trial: dict[str, Any]) -> str:
        step = trial["metrics"].get("step", trial["metrics"].get("training_iteration"))
        steps = trial["config"].get("steps")
        return "" if step is None else f"{step}/{steps}" if steps else str(step)

    def _progress(self) -> str:
        c = self.counts()
        return f"{c['done'] + c['failed']}/{self.total} finished: {c['done']} ok, {c['failed']} failed, {c['running']} running"

    def _line(self, trial_id: str) -> str:
        trial = self.trials[trial_id]
        parts = [f"[{self._progress()}]", trial_id, self._config(trial["config"]), trial["status"]]
        parts += [f"{label}={fmt(name, trial['metrics'][name])}" for name, label in self.COLUMNS.items()
                  if name in trial["metrics"]]
        if trial["metrics"].get("error"):
            parts.append(f"error: {str(trial['metrics']['error']).splitlines()[0]}")
        return "  ".join(p for p in parts if p)

    def _render(self) -> Group:
        table = Table(title=self.title, title_justify="left")
        for column in ("trial", "config", "status", "step", *self.COLUMNS.values()):
            table.add_column(column)
        for trial_id, trial in self.trials.items():
            table.add_row(trial_id, Text(self._config(trial["config"])), trial["status"], self._step(trial),
                          *(fmt(name, trial["metrics"].get(name)) for name in self.COLUMNS))
        c = self.counts()
        progress = Table.grid(padding=(0, 2))
        progress.add_row(ProgressBar(total=max(self.total, 1), completed=c["done"] + c["failed"], width=40),
                         Text(self._progress()))
        return Group(progress, table)  # bar first: Live crops what does not fit at the bottom


# ---------------------------------------------------------------- CLI


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("report", help="rebuild and print a sweep's report from its results.jsonl",
                              description="Rebuild report.json, report.md and plots/ from RUN/results.jsonl and "
                                          "print the terminal report. RUN is a run folder or an s3:// prefix.")
    p.add_argument("run", metavar="RUN", help="run folder, file:// or s3:// prefix holding results.jsonl")
    p.add_argument("--out", help="folder for the report files (default: RUN for a local run; for an s3:// run "
                                 "the report is only printed unless --out is given)")
    p.set_defaults(func=_run_cli)


def _run_cli(args: argparse.Namespace) -> int:
    console = Console()
    if args.out is None and args.run.startswith("s3://"):
        report = build_report(load_results(args.run), _run_info(args.run))
    else:
        report = write_report(args.run, out_dir=args.out)
    print_report(report, console)
    if "plots" in report:
        console.print(f"wrote report.json, report.md and {len(report['plots'])} plots to {args.out or args.run}")
    return 0
