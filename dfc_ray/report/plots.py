"""The report's PNG plots (plots/*.png), drawn from the report dict alone; docs/report.md says what each shows."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dfc_ray.metrics import CONTROLS, REGISTRY, fmt, number
from dfc_ray.report.build import ABLATION_MEASURES, ablation_label, summarize, value_key


def _figure(ncols: int, title: str):
    from matplotlib.figure import Figure  # deferred: matplotlib is heavy; no pyplot, no global backend state

    fig = Figure(figsize=(5.5 * ncols, 4.2), layout="constrained")
    fig.suptitle(title)
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    for ax in axes:  # tick labels as the numbers are: no "1e-17" offset or scientific factor above an axis
        ax.ticklabel_format(style="plain", useOffset=False)
    return fig, axes


def block_label(layer: Any) -> str:
    """A layer as the report names it: "block 1" (the residual after block 1)."""
    return f"block {fmt('layer', layer)}" if number(layer) is not None else str(layer)


def _fit_ticks(ax, labels: list[str]) -> None:
    """Category labels that would overlap at their width are slanted (anchored at their end)."""
    if sum(len(label) + 2 for label in labels) > 40:  # ~40 characters fit under a 5.5-inch axis
        ax.tick_params(axis="x", labelrotation=30)
        for tick in ax.get_xticklabels():
            tick.set_horizontalalignment("right")
            tick.set_rotation_mode("anchor")


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
    _fit_ticks(ax, labels)
    ax.set_xlim(-0.6, len(labels) - 0.4)
    ax.set(xlabel=xlabel, ylabel=ylabel)
    _at_least(ax, PP_SPAN)


PP_SPAN = 2.0
"""The smallest y range (pp) an effect axis shows: differences below the report's 0.1 pp are not magnified."""


def _at_least(ax, span: float) -> None:
    """Widen the y axis around its centre to `span` when the data cover less."""
    low, high = ax.get_ylim()
    if high - low < span:
        middle = (low + high) / 2
        ax.set_ylim(middle - span / 2, middle + span / 2)


def _values(trials: list[dict], metric: str) -> list[float]:
    return [x for x in (number(t["metrics"].get(metric)) for t in trials) if x is not None]


SPLICE_DELTAS = {"delta_a_pp": "Δ A, spliced − clean (pp)", "delta_b_pp": "Δ B, spliced − clean (pp)"}
"""The splice effects the per-axis and FVU plots draw, one panel each, → their axis label."""


def _delta_by_axis(axes: list[str], rows: list[dict[str, Any]], ok: list[dict], deltas: list[str]):
    """One panel per splice effect in `deltas` (those that vary), trials grouped by the first of `axes`: axes
    that group the trials alike (a_exclusive and b_exclusive of a symmetric grid) share one plot."""
    axis = axes[0]
    labels = [fmt(axis, r["value"]) for r in rows]
    groups = [[t for t in ok if value_key(t["config"].get(axis)) == value_key(r["value"])] for r in rows]
    fig, panels = _figure(len(deltas), f"Splice Δ tool correctness by {' = '.join(axes)}")
    for ax, delta in zip(panels, deltas):
        _box_strip(ax, labels, [_values(g, delta) for g in groups], " = ".join(axes), SPLICE_DELTAS[delta])
    return fig


def _curve(curve: list[dict]) -> tuple:
    return tuple(zip(*sorted((p["alpha"], p["delta_pp"]) for p in curve)))


def _alpha_curves(curves: list[tuple[str, list[dict]]], references: dict[str, list[dict]]):
    """Each trial's chosen feature on dev, and the reference direction's curve (one per layer: it
    does not depend on the checkpoint) in black. Trials with the same curve share one line, its width
    growing with their number, so the legend counts the lines that are drawn."""
    distinct: dict[tuple, list[str]] = {}
    for trial_id, curve in curves:
        distinct.setdefault(_curve(curve), []).append(trial_id)
    fig, (ax,) = _figure(1, f"Steering: Δ tool correctness vs α ({len(curves)} trials, {len(distinct)} distinct "
                            f"curve{'s' * (len(distinct) != 1)})")
    named = len(distinct) <= 10  # beyond that a legend of trial ids hides the plot: one entry for all
    for i, (points, trial_ids) in enumerate(sorted(distinct.items(), key=lambda item: -len(item[1]))):
        many = f"{len(trial_ids)} trials" + (f" ({trial_ids[0]}, …)" if len(trial_ids) > 1 else "")
        label = (many if len(trial_ids) > 1 else trial_ids[0]) if named else \
            (f"chosen feature: {len(distinct)} lines for {len(curves)} trials" if i == 0 else None)
        ax.plot(*points, marker="o", ms=3, lw=1 + 2 * np.log2(len(trial_ids)) / max(1, np.log2(len(curves))),
                alpha=0.7, label=label)
    for (label, curve), style in zip(references.items(), ("-", "--", ":", "-.") * len(references)):
        ax.plot(*_curve(curve), color="black", marker="s", ms=4, lw=2, ls=style, label=label, zorder=4)
    if named or references:
        ax.legend(fontsize=7)
    ax.axhline(0, color="grey", lw=0.8, ls="--")
    ax.set(xlabel="α (steering scale)", ylabel="Δ tool correctness (pp)")
    return fig


def _steer_by_layer(layers: list, ok: list[dict]):
    groups = [[t for t in ok if t["config"].get("layer") == layer] for layer in layers]
    fig, (ax,) = _figure(1, "Best single-feature steering Δ by layer (test split)")
    _box_strip(ax, [block_label(layer) for layer in layers], [_values(g, "steer_delta_pp") for g in groups],
               "layer", "steering Δ tool correctness (pp)")
    for control, marker in zip(CONTROLS, ("x", "+")):
        means = [(i, summarize(t["metrics"].get(control) for t in g)["mean"]) for i, g in enumerate(groups)]
        means = [(i, m) for i, m in means if m is not None]
        if means:
            ax.scatter(*zip(*means), marker=marker, s=60, color="tab:red", zorder=4,
                       label=f"mean {control.removeprefix('steer_').removesuffix('_pp').replace('_', ' ')} control")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    return fig


def _cos_vs_effect(ok: list[dict]):
    """|cos| of each trial's steered feature with the reference against its test effect; the
    reference's own effect (one per layer) as a horizontal line."""
    fig, (ax,) = _figure(1, "Steered feature: alignment with the reference vs effect (test split)")
    key = "positions" if len({str(t["config"].get("positions")) for t in ok}) > 1 else "variant"
    for group in sorted({str(t["config"].get(key, "")) for t in ok}):
        points = [(number(t["metrics"].get("steer_cos_reference")), number(t["metrics"].get("steer_delta_pp")))
                  for t in ok if str(t["config"].get(key, "")) == group]
        points = [(abs(x), y) for x, y in points if x is not None and y is not None]
        if points:
            ax.scatter(*zip(*points), s=22, alpha=0.8, label=f"{key}={group} ({len(points)})" if group else None,
                       zorder=3)
    layers = sorted({t["config"].get("layer") for t in ok}, key=str)
    for layer, style in zip(layers, ("-", "--", ":", "-.") * len(layers)):
        effect = summarize(t["metrics"].get("steer_reference_pp") for t in ok if t["config"].get("layer") == layer)
        if effect["mean"] is not None:
            ax.axhline(effect["mean"], color="black", lw=1.5, ls=style, label=f"reference Δ, {block_label(layer)}")
    ax.axhline(0, color="grey", lw=0.8, ls="--")
    ax.set_xlim(0, 1)
    ax.set(xlabel="|cos| of the steered feature's A direction with the reference", ylabel="steering Δ (pp)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    return fig


def _numeric_first(text: str) -> tuple:
    """Sort key: numbers by value, then text."""
    x = number(float(text)) if text.replace(".", "", 1).isdigit() else None
    return (x is None, x or 0.0, text)


def _localization_curve(ok: list[dict], rows: list[dict[str, Any]]):
    """The localisation curve: B steered by the top-n contributors' mean writes, test Δ (left) and share of the
    reference's effect (right) vs n, one line (mean over its trials) per group; the reference with its CI and the
    random controls (n random features, same norm) as bands."""
    fig, (ax_pp, ax_share) = _figure(2, "Where the difference lives: top-n features steering B (test split)")
    curved = [t for t in ok if t["metrics"].get("loc_curve")]
    varying = [k for k in ("positions", "variant", "k", "dict_size")
               if len({str(t["config"].get(k)) for t in curved}) > 1]
    key = varying[0] if varying else None
    sizes: set[int] = set()
    lines: dict[tuple, list[tuple[str, int]]] = {}  # identical curves share one line (and one legend entry)
    for group in sorted({str(t["config"].get(key)) if key else "" for t in curved}, key=_numeric_first):
        members = [t for t in curved if key is None or str(t["config"].get(key)) == group]
        points: dict[int, list[dict]] = {}
        for t in members:
            for point in t["metrics"]["loc_curve"]:
                points.setdefault(int(point["n"]), []).append(point)
        ns = tuple(sorted(points))
        sizes |= set(ns)
        series = tuple(tuple(float(np.mean([p[name] for p in points[n]])) for n in ns) for name in ("pp", "share"))
        lines.setdefault((ns, series), []).append((f"{key}={group}" if key else "mean", len(members)))
    for (ns, series), groups in lines.items():
        n = sum(count for _, count in groups)
        label = ", ".join(name for name, _ in groups) + f" ({n} trial{'s' * (n != 1)}" + \
            (", the same curve)" if len(groups) > 1 else ")")
        for ax, ys in zip((ax_pp, ax_share), series):
            ax.plot(ns, ys, marker="o", ms=4, label=label)
    for r, style in zip(rows, ("-", "--", ":", "-.") * len(rows)):
        reference = r.get("reference") or {}
        pp, lo, hi = (number(reference.get(k)) for k in ("pp", "lo", "hi"))
        if pp is not None:
            ax_pp.axhline(pp, color="black", lw=1.5, ls=style, label=f"reference v, {block_label(r['layer'])}")
            if lo is not None and hi is not None:
                ax_pp.axhspan(lo, hi, color="black", alpha=0.08, lw=0, label="its 95% CI")
    ax_share.axhline(1.0, color="black", lw=1.5, label="the reference's effect")
    controls = [x for x in (number(t["metrics"].get("loc_curve_random_pp")) for t in ok) if x is not None]
    if controls:  # the mean as a line (visible whatever the spread), the spread as a band when there is one
        mean, sd = float(np.mean(controls)), float(np.std(controls))
        ax_pp.axhline(mean, color="tab:red", lw=1.2, ls=":", label=f"random features, same norm: mean of "
                                                                 f"{len(controls)} trials")
        if sd > 0:
            ax_pp.axhspan(mean - sd, mean + sd, color="tab:red", alpha=0.15, lw=0, label="± 1 sd")
    for ax, ylabel in ((ax_pp, "Δ B tool correctness (pp)"), (ax_share, "share of the reference's effect")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(sizes), [str(n) for n in sorted(sizes)])
        ax.axhline(0, color="grey", lw=0.8, ls="--")
        ax.set(xlabel="n features (largest terms of the difference first)", ylabel=ylabel)
        ax.legend(fontsize=7)
    return fig


def _fvu_vs_delta(ok: list[dict], deltas: list[str]):
    """FVU against the splice effect, one panel per effect in `deltas` (those that vary)."""
    fig, axes = _figure(len(deltas), "Reconstruction quality vs splice effect")
    variants = sorted({str(t["config"].get("variant", "")) for t in ok})
    pairs = [(fvu, delta, label) for fvu, delta, label in (("fvu_a", "delta_a_pp", "A"), ("fvu_b", "delta_b_pp", "B"))
             if delta in deltas]
    for ax, (fvu, delta, label) in zip(axes, pairs):
        for variant in variants:
            points = [(number(t["metrics"].get(fvu)), number(t["metrics"].get(delta))) for t in ok
                      if str(t["config"].get("variant", "")) == variant]
            points = [p for p in points if None not in p]
            if points:
                ax.scatter(*zip(*points), s=18, alpha=0.8, label=variant or None)
        ax.set(xlabel=f"FVU {label} (fraction of variance unexplained)", ylabel=f"Δ {label}, spliced − clean (pp)")
        _at_least(ax, PP_SPAN)
        if len(variants) > 1:
            ax.legend(fontsize=8)
    return fig


def _protocol_ablation(ablation: dict[str, Any]):
    """Per measure, every ablation row's effect as a bar with its 95% CI; the ours and seed rows in colour,
    the seed study's published number as a diamond on the seed row."""
    rows = ablation["rows"]
    fig, axes = _figure(len(ABLATION_MEASURES), "Ours vs the seed study's protocol (pp, 95% CI over prompts)")
    highlight = {"ours": "tab:blue", "seed": "tab:red"}
    y = np.arange(len(rows))[::-1]  # the first row on top
    for i, (ax, measure) in enumerate(zip(axes, ABLATION_MEASURES)):
        for yi, row in zip(y, rows):
            color = highlight.get(row["name"], "tab:gray")
            if row["name"] in highlight:  # a band too: a zero effect draws no bar
                ax.axhspan(yi - 0.45, yi + 0.45, color=color, alpha=0.1, lw=0)
            effect = row[measure] or {}
            pp, lo, hi = (number(effect.get(k)) for k in ("pp", "lo", "hi"))
            if pp is None:
                continue
            xerr = None if lo is None or hi is None else [[max(pp - lo, 0.0)], [max(hi - pp, 0.0)]]
            ax.barh(yi, pp, xerr=xerr, capsize=3, height=0.6, color=color,
                    alpha=0.9 if row["name"] in highlight else 0.5)
            ax.plot([pp], [yi], marker="|", ms=12, color=color)
        if (published := ablation["published"].get(measure)) is not None:
            seed_y = next(yi for yi, row in zip(y, rows) if row["name"] == "seed")
            ax.scatter([published["published"]], [seed_y], marker="D", s=50, color="black", zorder=4,
                       label=f"seed study, published ({published['published']:+.1f})")
            ax.legend(fontsize=8)
        left, right = ax.get_xlim()
        margin = 0.05 * (right - left)  # 0 stays inside the frame when every effect has one sign
        ax.set_xlim(min(left, -margin), max(right, margin))
        ax.axvline(0, color="grey", lw=0.8, ls="--")
        ax.set_yticks(y, [row["name"] for row in rows] if i == 0 else [])
        ax.set(xlabel=f"{ablation_label(measure, ablation['steer_target'])} (pp)")
    for tick in axes[0].get_yticklabels():
        if tick.get_text() in highlight:
            tick.set_fontweight("bold")
    return fig


@dataclass(frozen=True)
class Flat:
    """A metric that has one value in every trial that measured it: a plot of it would show a flat line."""

    label: str
    """The metric's label, e.g. "Δ A"."""
    value: str | None
    """Its one value, formatted; None: no trial measured it."""
    n: int
    """Trials that measured it."""


@dataclass(frozen=True)
class PlotChoice:
    """One plot the report could draw: drawn when `draw` is set, else left out because of `flat`."""

    name: str
    """File name under plots/."""
    draw: Callable[[], Any] | None
    """Makes the figure."""
    flat: tuple[Flat, ...] = ()
    """What does not vary: why it is left out, or (when drawn) why some of its panels are."""


def _flat(ok: list[dict], metric: str) -> Flat | None:
    """`metric` as a `Flat` when every trial that measured it shows the same value as the report prints it (+0.0
    and 1e-17 alike: float noise is no variation) or none measured it, else None."""
    shown = {fmt(metric, x) for x in _values(ok, metric)}
    label = FLAT_LABELS.get(metric, REGISTRY[metric].label)
    return Flat(label, shown.pop() if shown else None, len(_values(ok, metric))) if len(shown) <= 1 else None


FLAT_LABELS = {"steer_delta_pp": "steering Δ", "steer_random_feature_pp": "the random-feature control",
               "steer_random_direction_pp": "the random-direction control"}
"""Shorter names than the registry's for the omitted-plots line."""


def _same_grouping(axes: list[str], ok: list[dict]) -> list[list[str]]:
    """The axes, those that split the trials into the same groups (a_exclusive and b_exclusive of a grid that
    always sets both alike) gathered into one list, in their order."""
    def signature(axis: str) -> tuple[int, ...]:
        first: dict[str, int] = {}
        return tuple(first.setdefault(value_key(t["config"].get(axis)), len(first)) for t in ok)

    merged: dict[tuple[int, ...], list[str]] = {}
    for axis in axes:
        merged.setdefault(signature(axis), []).append(axis)
    return list(merged.values())


def plot_choices(report: dict[str, Any]) -> list[PlotChoice]:
    """Every plot the report's data call for, in the report's order, each drawn or left out: a plot (or a panel)
    whose data are one constant shows nothing, and axes that group trials alike share one plot."""
    ok = [t for t in report["trials"] if t["status"] == "ok"]
    if not ok:
        return []  # nothing measured, nothing to draw
    choices: list[PlotChoice] = []
    flat = {m: f for m in (*SPLICE_DELTAS, "steer_delta_pp", *CONTROLS) if (f := _flat(ok, m)) is not None}
    deltas = [d for d in SPLICE_DELTAS if d not in flat]
    splice_flat = tuple(flat[d] for d in SPLICE_DELTAS if d in flat)
    per_axis = report["per_axis"]
    for axes in _same_grouping(list(per_axis), ok):
        name = f"delta_by_{re.sub(r'[^A-Za-z0-9_.-]', '_', axes[0])}.png"
        draw = (lambda axes=axes: _delta_by_axis(axes, per_axis[axes[0]], ok, deltas)) if deltas else None
        choices.append(PlotChoice(name, draw, splice_flat))
    curves = [(t["trial_id"], t["metrics"]["alpha_curve"]) for t in ok if t["metrics"].get("alpha_curve")]
    references = {f"reference, {block_label(t['config'].get('layer'))}": t["metrics"]["reference_alpha_curve"]
                  for t in ok if t["metrics"].get("reference_alpha_curve")}
    if curves:
        choices.append(PlotChoice("alpha_curves.png", lambda: _alpha_curves(curves, references)))
    if any(number(t["metrics"].get("steer_cos_reference")) is not None for t in ok):
        choices.append(PlotChoice("cos_vs_effect.png", lambda: _cos_vs_effect(ok)))
    layers = sorted({t["config"]["layer"] for t in ok if number(t["config"].get("layer")) is not None})
    if layers and any(number(t["metrics"].get("steer_delta_pp")) is not None for t in ok):  # one layer too
        steering = ("steer_delta_pp", *CONTROLS)
        still = all(m in flat for m in steering)  # the effect and its controls: one value each (or none)
        why = tuple(flat[m] for m in steering if m in flat and flat[m].value is not None)
        choices.append(PlotChoice("steer_by_layer.png", None if still else lambda: _steer_by_layer(layers, ok),
                                  why if still else ()))
    if any(t["metrics"].get("loc_curve") for t in ok):
        choices.append(PlotChoice("localization_curve.png",
                                  lambda: _localization_curve(ok, report.get("difference") or [])))
    choices.append(PlotChoice("fvu_vs_delta.png", (lambda: _fvu_vs_delta(ok, deltas)) if deltas else None, splice_flat))
    if report.get("protocol_ablation"):  # runs `dfc-ray ablate` judged
        choices.append(PlotChoice("protocol_ablation.png", lambda: _protocol_ablation(report["protocol_ablation"])))
    return choices


def _why(flats: Iterable[Flat]) -> str:
    """"Δ A and Δ B are +0.0 in all 48 trials" (metrics with the same value and count share a clause)."""
    by_value: dict[tuple[str | None, int], list[str]] = {}
    for flat in dict.fromkeys(flats):
        by_value.setdefault((flat.value, flat.n), []).append(flat.label)
    return "; ".join(f"{' and '.join(labels)} {'were' if len(labels) > 1 else 'was'} not measured" if value is None
                     else f"{' and '.join(labels)} {'are' if len(labels) > 1 else 'is'} {value} in all {n} trials"
                     for (value, n), labels in by_value.items())


def omitted_note(report: dict[str, Any]) -> str | None:
    """One line saying which plots (or panels) were left out and why ("Δ A and Δ B are +0.0 in all 48 trials:
    9 plots omitted (…)"), None when everything was drawn."""
    choices = plot_choices(report)
    left_out = [c for c in choices if c.draw is None]
    partial = [c for c in choices if c.draw is not None and c.flat]
    notes = []
    if left_out:
        names = ", ".join(c.name.removesuffix(".png") for c in left_out)
        notes.append(f"{_why(f for c in left_out for f in c.flat)}: {len(left_out)} "
                     f"plot{'s' * (len(left_out) != 1)} omitted ({names})")
    if partial:
        notes.append(f"{_why(f for c in partial for f in c.flat)}: its panel is left out of {len(partial)} "
                     f"plot{'s' * (len(partial) != 1)}")
    return "; ".join(notes) or None


def write_plots(report: dict[str, Any], out_dir: str | Path) -> list[str]:
    """plots/*.png for a report (those `plot_choices` draws); returns their paths relative to the report folder."""
    out_dir = Path(out_dir)
    (out_dir / "plots").mkdir(parents=True, exist_ok=True)
    written: list[str] = []
    for choice in plot_choices(report):
        if choice.draw is not None:
            choice.draw().savefig(out_dir / "plots" / choice.name, dpi=110)
            written.append(f"plots/{choice.name}")
    return written
