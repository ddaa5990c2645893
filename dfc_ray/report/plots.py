"""The report's PNG plots (plots/*.png), drawn from the report dict alone; docs/report.md says what each shows."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from dfc_ray.metrics import CONTROLS, fmt, number
from dfc_ray.report.build import ABLATION_MEASURES, ablation_label, summarize, value_key


def _figure(ncols: int, title: str):
    from matplotlib.figure import Figure  # deferred: matplotlib is heavy; no pyplot, no global backend state

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
    return [x for x in (number(t["metrics"].get(metric)) for t in trials) if x is not None]


def _delta_by_axis(axis: str, rows: list[dict[str, Any]], ok: list[dict]):
    labels = [fmt(axis, r["value"]) for r in rows]
    groups = [[t for t in ok if value_key(t["config"].get(axis)) == value_key(r["value"])] for r in rows]
    fig, (ax_a, ax_b) = _figure(2, f"Splice Δ tool correctness by {axis}")
    _box_strip(ax_a, labels, [_values(g, "delta_a_pp") for g in groups], axis, "Δ A, spliced − clean (pp)")
    _box_strip(ax_b, labels, [_values(g, "delta_b_pp") for g in groups], axis, "Δ B, spliced − clean (pp)")
    return fig


def _curve(curve: list[dict]) -> tuple:
    return tuple(zip(*sorted((p["alpha"], p["delta_pp"]) for p in curve)))


def _alpha_curves(curves: list[tuple[str, list[dict]]], references: dict[str, list[dict]]):
    """Each trial's chosen feature on dev, and the reference direction's curve (one per layer: it
    does not depend on the checkpoint) in black."""
    fig, (ax,) = _figure(1, "Steering: Δ tool correctness vs α, one line per trial")
    named = len(curves) <= 10  # beyond that a legend of trial ids hides the plot: one entry for all
    for i, (trial_id, curve) in enumerate(curves):
        label = trial_id if named else (f"chosen feature, {len(curves)} trials" if i == 0 else None)
        ax.plot(*_curve(curve), marker="o", ms=3, lw=1, alpha=0.7, label=label)
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
            ax.scatter(*zip(*points), s=22, alpha=0.8, label=f"{key}={group}" if group else None, zorder=3)
    layers = sorted({t["config"].get("layer") for t in ok}, key=str)
    for layer, style in zip(layers, ("-", "--", ":", "-.") * len(layers)):
        effect = summarize(t["metrics"].get("steer_reference_pp") for t in ok if t["config"].get("layer") == layer)
        if effect["mean"] is not None:
            ax.axhline(effect["mean"], color="black", lw=1.5, ls=style, label=f"reference Δ, layer {layer}")
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
    for group in sorted({str(t["config"].get(key)) if key else "" for t in curved}, key=_numeric_first):
        members = [t for t in curved if key is None or str(t["config"].get(key)) == group]
        points: dict[int, list[dict]] = {}
        for t in members:
            for point in t["metrics"]["loc_curve"]:
                points.setdefault(int(point["n"]), []).append(point)
        ns = sorted(points)
        sizes |= set(ns)
        label = (f"{key}={group}" if key else "mean") + f" ({len(members)} trial{'s' * (len(members) != 1)})"
        for ax, name in ((ax_pp, "pp"), (ax_share, "share")):
            ax.plot(ns, [np.mean([p[name] for p in points[n]]) for n in ns], marker="o", ms=4, label=label)
    for r, style in zip(rows, ("-", "--", ":", "-.") * len(rows)):
        reference = r.get("reference") or {}
        pp, lo, hi = (number(reference.get(k)) for k in ("pp", "lo", "hi"))
        if pp is not None:
            ax_pp.axhline(pp, color="black", lw=1.5, ls=style, label=f"reference v, layer {r['layer']}")
            if lo is not None and hi is not None:
                ax_pp.axhspan(lo, hi, color="black", alpha=0.08, lw=0)
    ax_share.axhline(1.0, color="black", lw=1.5, label="the reference's effect")
    controls = [x for x in (number(t["metrics"].get("loc_curve_random_pp")) for t in ok) if x is not None]
    if controls:
        low, high = float(np.mean(controls) - np.std(controls)), float(np.mean(controls) + np.std(controls))
        ax_pp.axhspan(low, high, color="tab:red", alpha=0.15, lw=0, label="random features, same norm (mean ± sd)")
    for ax, ylabel in ((ax_pp, "Δ B tool correctness (pp)"), (ax_share, "share of the reference's effect")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(sizes), [str(n) for n in sorted(sizes)])
        ax.axhline(0, color="grey", lw=0.8, ls="--")
        ax.set(xlabel="n features (largest terms of the difference first)", ylabel=ylabel)
        ax.legend(fontsize=7)
    return fig


def _fvu_vs_delta(ok: list[dict]):
    fig, axes = _figure(2, "Reconstruction quality vs splice effect")
    variants = sorted({str(t["config"].get("variant", "")) for t in ok})
    for ax, (fvu, delta, label) in zip(axes, (("fvu_a", "delta_a_pp", "A"), ("fvu_b", "delta_b_pp", "B"))):
        for variant in variants:
            points = [(number(t["metrics"].get(fvu)), number(t["metrics"].get(delta))) for t in ok
                      if str(t["config"].get("variant", "")) == variant]
            points = [p for p in points if None not in p]
            if points:
                ax.scatter(*zip(*points), s=18, alpha=0.8, label=variant or None)
        ax.set(xlabel=f"FVU {label} (fraction of variance unexplained)", ylabel=f"Δ {label}, spliced − clean (pp)")
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
        save(_delta_by_axis(axis, rows, ok), f"delta_by_{re.sub(r'[^A-Za-z0-9_.-]', '_', axis)}.png")
    curves = [(t["trial_id"], t["metrics"]["alpha_curve"]) for t in ok if t["metrics"].get("alpha_curve")]
    references = {f"reference, layer {t['config'].get('layer')}": t["metrics"]["reference_alpha_curve"] for t in ok
                  if t["metrics"].get("reference_alpha_curve")}
    if curves:
        save(_alpha_curves(curves, references), "alpha_curves.png")
    if any(number(t["metrics"].get("steer_cos_reference")) is not None for t in ok):
        save(_cos_vs_effect(ok), "cos_vs_effect.png")
    layers = sorted({t["config"]["layer"] for t in ok if number(t["config"].get("layer")) is not None})
    if layers and any(number(t["metrics"].get("steer_delta_pp")) is not None for t in ok):  # one layer too
        save(_steer_by_layer(layers, ok), "steer_by_layer.png")
    if any(t["metrics"].get("loc_curve") for t in ok):
        save(_localization_curve(ok, report.get("difference") or []), "localization_curve.png")
    save(_fvu_vs_delta(ok), "fvu_vs_delta.png")
    if report.get("protocol_ablation"):  # runs `dfc-ray ablate` judged
        save(_protocol_ablation(report["protocol_ablation"]), "protocol_ablation.png")
    return written
