"""The report's tables, rendered the same way in the terminal (rich) and in report.md.

Everything here reads only the report dict, so a report can be re-rendered from report.json alone.
Labels, formats and which metric shows where come from dfc_ray/metrics.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from dfc_ray.metrics import CELLS, HEADLINE, PP, REGISTRY, fmt, number, show, shown_in
from dfc_ray.report.build import ABLATION_MEASURES, LOCALIZE_TESTS, PARTITION_SHARES, descending
from dfc_ray.report.build import ablation_label as label_of


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
    remarks: list[str] = field(default_factory=list)
    """Sentences printed under the table (verdicts, comparisons)."""


def fmt_stat(name: str, stat: dict[str, Any] | None) -> str:
    """`mean ± std (n=…)` of a summary, in metric `name`'s format."""
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


def short_config(config: dict[str, Any], axes: Sequence[str]) -> str:
    return " ".join(f"{a}={config[a]:g}" if number(config.get(a)) is not None else f"{a}={config.get(a)}"
                    for a in axes if a in config)


def _min_set_text(min_set: dict[str, Any] | None) -> str:
    if not min_set or not min_set["n_steered"]:
        return "—"
    text = f"{min_set['n_reached']} of {min_set['n_steered']}"
    return text + (f", size {fmt_stat('size', min_set['sizes'])}" if min_set["n_reached"] else "")


def _headline_section(report: dict[str, Any]) -> Section:
    seed, comp = report["seed_study"], report["comparison"]
    table = []
    for h in HEADLINE:
        ours = fmt(h.metric, report["baseline"][h.key]) if h.baseline else fmt_stat(h.metric, report["headline"][h.key])
        if h.feature_count and report["headline"][h.key].get("n_measured"):
            ours += f", reached in {report['headline'][h.key]['n']} of {report['headline'][h.key]['n_measured']}"
        published = seed.get(h.key)
        theirs = ("—" if published is None else fmt_stat(h.metric, published) if isinstance(published, dict)
                  else fmt(h.metric, published))
        table.append([h.label, ours, theirs, show(comp.get(h.key, {}).get("difference_pp"), PP)])
    table.append(["minimal steerable set reached (trials)", _min_set_text(report.get("min_set")), "—", "—"])
    note = (f"{report['n_trials']} trials, {report['n_trials'] - report['n_failed']} ok, {report['n_failed']} failed; "
            f"mean ± sample std over successful trials; judged with protocol "
            f"{report['run'].get('protocol', 'ours')} (docs/replication.md)"
            f"{', tool-call dialect ' + report['dialect'] if report.get('dialect') else ''}. "
            f"Seed study: {seed['source']}.")
    if unfinished := report["run"].get("unfinished"):  # Ctrl-C stopped the sweep
        n = len(unfinished.get("running", [])) + unfinished.get("not_started", 0)
        note = f"INTERRUPTED: {n} trials did not finish (`dfc-ray sweep --resume` runs them). " + note
    return Section("Headline: ours vs the seed study", ["", "ours", "seed study (published)", "ours − seed (pp)"],
                   table, note)


def _axis_sections(report: dict[str, Any]) -> list[Section]:
    shown = shown_in("axis")
    return [Section(f"By {axis}", [axis, "trials", "failed", *(m.heading for m in shown)],
                    [[fmt(axis, r["value"]), str(r["n_trials"]), str(r["n_failed"]),
                      *(fmt_stat(m.name, r[m.name]) for m in shown)] for r in rows])
            for axis, rows in report["per_axis"].items()]


def _trial_columns() -> dict[str, list[str]]:
    """Trials-table heading → the metrics in its cell, in the registry's order."""
    columns: dict[str, list[str]] = {}
    for m in shown_in("trials"):
        columns.setdefault(m.cell or m.heading, []).append(m.name)
    return columns


def _trials_section(report: dict[str, Any]) -> Section:
    axes = list(report["per_axis"])
    columns = _trial_columns()
    ranked = sorted(report["trials"], key=lambda t: (t["status"] != "ok", *descending(t["metrics"].get("delta_a_pp"))))
    rows = [[t["trial_id"], short_config(t["config"], axes), t["status"],
             *(CELLS.get(heading, "").join(_cell(t["metrics"], name) for name in names)
               for heading, names in columns.items())] for t in ranked]
    return Section("Trials (by Δ A)", ["trial", "config", "status", *columns], rows)


def _best_features_section(report: dict[str, Any]) -> Section:
    steer_delta = REGISTRY["steer_delta_pp"]
    return Section("Best features (by Cohen's d, tool vs non-tool prompts)",
                   ["trial", "feature", REGISTRY["cohens_d"].label, REGISTRY["auroc"].label, "steered α",
                    steer_delta.heading],
                   [[f["trial_id"], fmt("feature", f.get("feature")), fmt("cohens_d", f.get("cohens_d")),
                     fmt("auroc", f.get("auroc")), fmt("alpha", f.get("steer_alpha")) if "steer_alpha" in f else "",
                     steer_delta.text(f.get("steer_delta_pp")) if "steer_delta_pp" in f else ""]
                    for f in report["best_features"]],
                   "A feature index names a feature of its own trial's dictionary.")


def _ci_text(effect: dict[str, Any]) -> str:
    """`+40.0 pp [+27.0, +53.0]` of a {pp, lo, hi} effect (without brackets when no CI was reported)."""
    text = show(effect.get("pp"), PP)
    if number(effect.get("lo")) is not None and number(effect.get("hi")) is not None:
        text += f" [{show(effect['lo'], PP)}, {show(effect['hi'], PP)}]"
    return text


def _steering_reference_section(report: dict[str, Any]) -> Section | None:
    """The reference direction beside the best feature and the controls, each with its 95% CI."""
    rows = report.get("steering_reference")
    if not rows:
        return None
    by_positions = "positions" in rows[0]
    table = []
    for r in rows:
        ref, best = r["reference"], r["best_trial"]
        table.append([fmt("layer", r["layer"]), *([str(r["positions"])] if by_positions else []), str(r["target"]),
                      f"{_ci_text(ref)} at α {fmt('alpha', ref['alpha'])}", ref["label"] or "steerable",
                      f"{_ci_text(best['delta'])} ({best['trial_id']}, feature {fmt('feature', best['feature'])}, "
                      f"α {fmt('alpha', best['alpha'])})",
                      _ci_text(best["random_feature"]), _ci_text(best["random_direction"]),
                      _ci_text(ref["random_direction"]),
                      fmt_stat("steer_cos_reference", r["cos_reference"]),
                      fmt_stat("steer_share_of_reference", r["share_of_reference"])])
    return Section("Steering against its reference",
                   ["layer", *(["positions"] if by_positions else []), "target", "reference Δ [95% CI]", "verdict",
                    "best feature Δ [95% CI] (trial, feature, α)", "control: random feature [CI]",
                    "control: random direction [CI]", "reference's control: random direction [CI]",
                    "cos to reference", "share of reference"], table,
                   "Test split, pp, paired-bootstrap 95% CIs over prompts. The reference (A − B mean on dev tool "
                   "prompts) is the same for every trial of a layer; controls are the best trial's, at its α; "
                   "cos and share are mean ± std over trials.")


def _count_text(name: str, counts: dict[str, Any]) -> str:
    """`mean ± std (n=…), range a–b` of feature counts, and how many trials reached none."""
    if not counts["n_measured"]:
        return "—"
    text = fmt_stat(name, counts["sizes"])
    if counts["range"]:
        text += f", range {counts['range'][0]}–{counts['range'][1]}"
    missing = counts["n_measured"] - counts["n_reached"]
    return text + (f"; not reached in {missing} of {counts['n_measured']}" if missing else "")


def _difference_sections(report: dict[str, Any]) -> list[Section]:
    """Where the A − B difference lives: the attribution per layer, the localisation curve against the
    reference, the causal tests with their controls, and the largest terms."""
    rows = report.get("difference")
    if not rows:
        return []
    by_positions = "positions" in rows[0]
    where = ["layer", *(["positions"] if by_positions else [])]

    def at(r: dict[str, Any]) -> list[str]:
        return [fmt("layer", r["layer"]), *([str(r["positions"])] if by_positions else [])]

    attribution = [[*at(r), str(r["n_trials"]), f"{r['reference_norm']:.1f}",
                    fmt_stat("diff_share_shared", r["features_of_reference"]),
                    _count_text("diff_n50", r["n50"]), _count_text("diff_n90", r["n90"]),
                    *(fmt_stat(f"diff_share_{p}", r["shares"][p]) for p in PARTITION_SHARES),
                    " / ".join(str(r["top_partition"][p]) for p in PARTITION_SHARES),
                    fmt_stat("diff_cos_reconstruction", r["cos_reconstruction"]),
                    fmt("diff_cos_norm_means", r["cos_norm_means"])] for r in rows]
    out = [Section("Where the difference lives",
                   [*where, "trials", "‖v‖", "Σ c_j / ‖v‖", "features for 50% of Σ c_j", "features for 90%",
                    *(REGISTRY[f"diff_share_{p}"].label for p in PARTITION_SHARES),
                    "top term's partition (trials: A-excl / B-excl / shared)", "cos(mean x̂_A − x̂_B, v)",
                    "cos(mean_A − mean_B, v)"], attribution,
                   "v = mean(x_A − x_B) on the dev tool prompts at the last prompt token; c_j = mean(f_j)·(d_j^A − "
                   "d_j^B)·v̂ in raw space, so Σ c_j + biases + normalization means + error = ‖v‖ "
                   "(docs/evaluation.md). Shares are of Σ c_j; mean ± std over trials.")]
    curve, tests = [], []
    for r in rows:
        if r.get("reference"):
            curve.append([*at(r), "reference v", _ci_text(r["reference"]), "1.00"])
        curve += [[*at(r), str(p["n"]), fmt_stat("loc_curve_pp", p["pp"]), fmt_stat("loc_curve_share", p["share"])]
                  for p in r["curve"]]
        if r["effect_n50"]["n_measured"]:
            tests.append([*at(r), "features for 50% of the reference effect (dev)", "b",
                          str(r["effect_n50"]["n_measured"]), _count_text("loc_n50", r["effect_n50"]), "", "", "", ""])
        for name, t in r["tests"].items():
            best = t["best"]
            tests.append([*at(r), LOCALIZE_TESTS[name], "a" if name == "patch_a" else "b", str(t["n_trials"]),
                          fmt_stat("loc_curve_n", t["n"]), fmt_stat("loc_curve_pp", t["pp"]),
                          f"{_ci_text(best['effect'])} ({best['trial_id']}, n {fmt('n', best['n'])})",
                          _ci_text(best["random"]), fmt_stat("loc_curve_pp", t["random"])])
    if curve:
        out.append(Section("Where the difference lives: localisation curve B ← A (test split)",
                           [*where, "n", "Δ B (pp)", "share of the reference effect"], curve,
                           "B steered by Σ over the top n terms of mean(f_j)·(d_j^A − d_j^B) at the reference's "
                           "calibration; mean ± std over trials (each trial's paired CIs are in report.json's "
                           "trials, loc_curve)."))
    if tests:
        out.append(Section("Where the difference lives: causal tests (test split)",
                           [*where, "test", "target", "trials", "n (chosen on dev)", "Δ (pp) over trials",
                            "largest |Δ| [95% CI] (trial, n)", "its control [95% CI]", "control over trials (pp)"],
                           tests, "Each test: n chosen on dev, effect on test with a paired-bootstrap CI, and a "
                           "control of n random firing features resized to the same norm."))
    terms = [[t["trial_id"], fmt("feature", t.get("feature")), str(t.get("partition")),
              show(t.get("contribution")), fmt("diff_share_shared", t.get("share")), show(t.get("cos_reference")),
              show(t.get("mean_activation")), fmt("dead_frac", t.get("fires")), show(t.get("beta_a")),
              show(t.get("beta_b"))] for t in report.get("largest_terms") or []]
    if terms:
        out.append(Section("Largest terms of the difference", ["trial", "feature", "partition", "c_j",
                                                               "share of Σ c_j", "cos(d^A − d^B, v)", "mean f_j",
                                                               "fires", "β_A", "β_B"], terms,
                           "Latent Scaling β_m: how much of model m's activation the feature's (stronger) decoder "
                           "row explains; β_B ≈ β_A means B has the direction too (not exclusive)."))
    return out


def _protocol_ablation_sections(report: dict[str, Any]) -> list[Section]:
    """`dfc-ray ablate`'s rows (ours, seed, each with one switch changed), each switch's effect with its
    weakness number, the verdict, and the seed row next to the published numbers."""
    ablation = report.get("protocol_ablation")
    if not ablation:
        return []
    target, positions = ablation["steer_target"], ablation["training_positions"]
    rows = [[r["name"], ", ".join(positions["run"]) if r["training_positions"] == "run" else r["training_positions"],
             fmt("a_clean", r["a_clean"]), fmt("b_clean", r["b_clean"]),
             *(_ci_text(r[m] or {}) for m in (*ABLATION_MEASURES, "reference_pp"))] for r in ablation["rows"]]
    n_prompts = sorted({r["n_prompts"] for r in ablation["rows"]})
    published = ablation["published"]
    versus = ", ".join(f"{label_of(m, target)} {show(p['seed_protocol'], PP)} vs {show(p['published'], PP)}"
                       + (" (its best cell, steering A)" if m == "steer_pp" else "") for m, p in published.items())
    effects = [[e["switch"], show(e["weakness"]), e["from"], *(show(e.get(m), PP) for m in ABLATION_MEASURES)]
               for e in ablation["effects"]]
    return [
        Section("Ours vs the study's protocol",
                ["protocol", "trained on (positions)", REGISTRY["a_clean"].label, REGISTRY["b_clean"].label,
                 *(f"{label_of(m, target)} [95% CI]" for m in ABLATION_MEASURES), "reference [95% CI]"], rows,
                f"`dfc-ray ablate`: {len(ablation['trials'])} checkpoints of {ablation['spec']} re-judged under our "
                f"protocol, the seed study's, and each of the two with one switch changed per row. pp, "
                f"each prompt's paired difference averaged over checkpoints, 95% bootstrap CI over "
                f"{'/'.join(map(str, n_prompts))} prompts; clean rates and Δs count each row's own metric. The "
                f"reference direction steered under the row's protocol says whether it could see an effect at all.",
                [f"Seed protocol on this run vs the seed study's published numbers (pp): {versus}."] if versus else []),
        Section("Ours vs the study's protocol: what each switch adds",
                ["switch", "weakness", "from", *(f"{label_of(m, target)} (pp)" for m in ABLATION_MEASURES)],
                effects, "from seed: seed − (seed with that switch ours), what reproducing the weakness adds to "
                "the study's numbers; from ours: (ours with that switch as the study had it) − ours, what it alone "
                "does to ours (weaknesses as numbered in docs/ARCHITECTURE.md).", list(ablation["verdict"]))]


def _time_section(report: dict[str, Any]) -> Section | None:
    """Where the wall-clock time went: the run's stages and the per-trial phases."""
    stages = (report["run"].get("seconds") or {}).items()
    rows = [[f"run: {name.replace('_', ' ')}", f"{value:.1f}"] for name, value in stages]
    rows += [[f"per trial: {REGISTRY[name].label}", fmt_stat(name, stat)]
             for name, stat in (report.get("seconds_per_trial") or {}).items() if stat.get("mean") is not None]
    if restarts := report["run"].get("judge_restarts"):  # a judge that kept dying cost time
        rows.append(["run: judge replica restarts", ", ".join(f"{pool} {n}" for pool, n in restarts.items())])
    return Section("Time (seconds, wall clock)", ["stage", "seconds"], rows) if rows else None


def sections(report: dict[str, Any]) -> list[Section]:
    """The report's tables, in reading order."""
    out = [_headline_section(report), *_protocol_ablation_sections(report)]
    if (reference := _steering_reference_section(report)) is not None:
        out.append(reference)
    out += _difference_sections(report)
    out += [*_axis_sections(report), _trials_section(report)]
    if report["best_features"]:
        out.append(_best_features_section(report))
    if (time_section := _time_section(report)) is not None:
        out.append(time_section)
    if report["failed"]:
        axes = list(report["per_axis"])
        out.append(Section("Failed trials", ["trial", "config", "status", "error"],
                           [[f["trial_id"], short_config(f["config"], axes), f["status"], str(f["error"] or "")]
                            for f in report["failed"]]))
    return out


def _table(section: Section, headed: bool, compact: bool = False) -> Table:
    """A section as a table with a column per field (`headed`: its title above it). `compact`: no borders and
    every column at least as wide as its widest cell, so headers wrap but cells never do."""
    options: dict[str, Any] = dict(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False) if compact else {}
    table = Table(title=section.title if headed else None, caption=section.note or None, title_justify="left",
                  **options)
    for i, column in enumerate(section.columns):
        widest = max((Text(row[i]).cell_len for row in section.rows), default=0) if compact else None
        table.add_column(column, overflow="fold", min_width=widest)
    for row in section.rows:
        table.add_row(*(Text(cell) for cell in row))  # Text: errors may contain [markup]
    return table


def _records(section: Section, headed: bool, width: int) -> Group:
    """A section as one block per row: the row's first cell, then `field value` pairs packed into lines of at
    most `width` columns, each pair kept whole (empty cells left out). What a narrow terminal shows when even
    a borderless table would wrap its cells."""
    lines: list[Any] = [Text(section.title, style="italic")] if headed else []
    for row in section.rows:
        line = Text(row[0], style="bold")
        for column, cell in zip(section.columns[1:], row[1:]):
            if not cell or cell == "—":
                continue
            pair = Text(f"{column} ", style="dim").append(cell)
            if line.cell_len + 3 + pair.cell_len > width:
                lines.append(line)
                line = Text("  ").append(pair)
            else:
                line.append(" · ").append(pair)
        lines.append(line)
    if section.note:
        lines.append(Text(section.note, style="dim"))
    return Group(*lines)


def _fitted(section: Section, headed: bool, width: int) -> Any:
    """The section's table at its natural size when it fits `width`, else borderless with whole cells, else
    as paragraphs (a table wider than the terminal would wrap every cell over several lines)."""
    wide = _table(section, headed)
    if _measure(wide).maximum <= width:
        return wide
    compact = _table(section, headed, compact=True)
    return compact if _measure(compact).minimum <= width else _records(section, headed, width)


def _measure(renderable: Any):
    console = Console(width=10_000)
    return console.measure(renderable, options=console.options)


def print_report(report: dict[str, Any], console: Console | None = None) -> None:
    """The terminal report: headline panel, per-axis tables, trials, best features, failures. Tables wider
    than the terminal (80 columns, say) are drawn compact (`_fitted`)."""
    console = console or Console()
    for i, section in enumerate(sections(report)):
        if i == 0:  # the headline, in a panel (4 columns of frame)
            console.print(Panel(_fitted(section, False, console.width - 4), title=section.title))
        else:
            console.print(_fitted(section, True, console.width))
        for remark in section.remarks:
            console.print(Text(remark))


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def to_markdown(report: dict[str, Any]) -> str:
    lines = [f"# dfc-ray sweep report{': ' + str(report['run']['name']) if report['run'].get('name') else ''}", ""]
    lines += [f"- {k}: {_md_cell(str(v))}" for k, v in report["run"].items()] + [""]
    for section in sections(report):
        lines += [f"## {section.title}", ""] + ([section.note, ""] if section.note else [])
        lines += ["| " + " | ".join(map(_md_cell, section.columns)) + " |", "|" + "---|" * len(section.columns)]
        lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in section.rows] + [""]
        lines += [f"- {remark}" for remark in section.remarks] + ([""] if section.remarks else [])
    if report.get("plots"):
        lines += ["## Plots", ""] + [f"![{Path(p).stem}]({p})" for p in report["plots"]] + [""]
    return "\n".join(lines)
