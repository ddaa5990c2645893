"""Reading a sweep's results.jsonl and computing the report.json content from it."""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dfc_ray.config import check_name, study_differences
from dfc_ray.fs import open_fs, redact
from dfc_ray.metrics import HEADLINE, number, shown_in

RESULTS = "results.jsonl"
# The seed study's PUBLISHED numbers, the only hard-coded figures here: Qwen2.5-3B vs its GRPO
# tool-use fine-tune, layer 13, 48 crosscoder variants, 40 prompts, lenient scoring.
SEED_STUDY: dict[str, Any] = {
    "source": "published numbers; Qwen2.5-3B vs a GRPO tool-use fine-tune, layer 13, "
              "48 variants, n = 40 prompts, lenient name-in-tool-list scoring",
    "a_correct": 0.19,
    "a_splice": 0.50,
    "delta_a_pp": {"mean": 31.1, "std": 9.7, "n": 48},
    "delta_b_pp": {"mean": 6.8, "std": 5.0, "n": 48},
    "steer_best_pp": {"mean": 65.0, "std": None, "n": 1},
}
BEST_FEATURES = 10
ABLATION = "ablation.json"
"""What `dfc-ray ablate` (dfc_ray/sweep/ablate.py) writes into a run folder; the report's "ours vs the
study's protocol" reads it."""
ABLATION_MEASURES = {"delta_a_pp": "Δ A", "delta_b_pp": "Δ B", "steer_pp": "steering"}
"""The numbers each ablation row reports (pp, with CIs) → their label: splice Δ A, splice Δ B, steering of
the run's steering target."""
ABLATION_PUBLISHED = {"delta_a_pp": "delta_a_pp", "delta_b_pp": "delta_b_pp", "steer_pp": "steer_best_pp"}
"""The ablation's measures → the SEED_STUDY number each one is read against."""


@dataclass
class TrialResult:
    """One line of results.jsonl."""

    trial_id: str
    """Ray Tune's trial id."""
    config: dict[str, Any]
    """The trial's hyper-parameters (dict_size, k, a_exclusive, l1_excl, layer, variant, …)."""
    metrics: dict[str, Any] = field(default_factory=dict)
    """Final metrics under the names of dfc_ray/metrics.py; optional ones may be missing."""
    status: str = "ok"
    """"ok" for a finished trial; anything else ("failed", "diverged", …) counts as failed."""
    error: str | None = None
    """Why a failed trial failed."""

    @property
    def ok(self) -> bool:
        return self.status == "ok"


# ---------------------------------------------------------------- reading results


def read_text(run_dir: str | Path, file: str) -> tuple[str | None, str]:
    """Text of `<run_dir>/<file>` (None when missing) and a credential-free name for messages."""
    fs, root = open_fs(str(run_dir))
    name = f"{redact(str(run_dir)).rstrip('/')}/{file}"
    try:
        with fs.open_input_stream(f"{root}/{file}") as f:
            return f.read().decode(), name
    except FileNotFoundError:
        return None, name


NUMBER = (int, float)


def _field(obj: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str, optional: bool = False) -> Any:
    """`obj[key]` when it is a `kind` (None for a missing or null optional one), else one line naming it."""
    value = obj.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, kind) or isinstance(value, bool):
        expected = "a number" if isinstance(kind, tuple) else f"a {kind.__name__}"
        raise ValueError(f"{where}field {key!r} is {str(value)[:40]!r}; expected {expected}")
    return value


def _parse_line(line: str, where: str) -> TrialResult:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
    row.setdefault("metrics", {})
    for name, kind in (("trial_id", str), ("config", dict), ("metrics", dict), ("status", str)):
        _field(row, name, kind, f"{where}: ")
    check_name(row["trial_id"], f"{where}: trial_id")  # trial ids name folders and plot labels
    return TrialResult(row["trial_id"], row["config"], row["metrics"], row["status"], row.get("error"))


def load_results(run_dir: str | Path) -> list[TrialResult]:
    """Trials of `<run_dir>/results.jsonl`, a line per trial; a trial reported twice (a resumed
    sweep) keeps its last line and its first position. `run_dir` may be a path, file:// or s3://
    prefix (credentials from the standard AWS environment, never printed)."""
    text, name = read_text(run_dir, RESULTS)
    if text is None:
        raise FileNotFoundError(f"{name}: no such file (expected a dfc-ray sweep run folder)")
    trials: dict[str, TrialResult] = {}
    for number_, line in enumerate(text.splitlines(), 1):
        if line.strip():
            trial = _parse_line(line, f"{name}: line {number_}")
            trials[trial.trial_id] = trial
    return list(trials.values())


def stored_run_info(run_dir: str | Path) -> dict[str, Any]:
    """The run block of an earlier report.json in `run_dir` (the sweep's settings), else the run's location."""
    text, name = read_text(run_dir, "report.json")
    try:
        return json.loads(text)["run"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return {"run_dir": name.removesuffix("/report.json")}


def _interval(row: dict[str, Any], key: str, where: str, optional: bool = False) -> dict[str, Any] | None:
    """An ablation measure `{mean, lo, hi, n}` as the report's effects are kept: `{pp, lo, hi}`."""
    rate = _field(row, key, dict, where, optional)
    if rate is None:
        return None
    mean, lo, hi = (_field(rate, name, NUMBER, f"{where}{key}: ") for name in ("mean", "lo", "hi"))
    return {"pp": mean, "lo": lo, "hi": hi}


def _ablation_row(row: Any, where: str) -> dict[str, Any]:
    if not isinstance(row, dict):
        raise ValueError(f"{where}expected a JSON object, got {type(row).__name__}")
    return {"name": _field(row, "name", str, where), "base": _field(row, "base", str, where),
            "switch": _field(row, "switch", str, where),
            "training_positions": _field(row, "training_positions", str, where),
            "n_prompts": _field(_field(row, "delta_a_pp", dict, where), "n", int, f"{where}delta_a_pp: "),
            **{key: _field(row, key, NUMBER, where) for key in ("a_clean", "b_clean")},
            **{key: _interval(row, key, where, optional=key != "delta_a_pp")
               for key in (*ABLATION_MEASURES, "reference_pp")}}


def _protocol_ablation(data: Any) -> dict[str, Any]:
    """The parts of ablation.json the report shows, each switch's effect with its weakness number and
    the seed row next to the published numbers; a field that is not as `dfc-ray ablate` writes it
    raises one line naming it."""
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object, got {type(data).__name__}")
    rows = [_ablation_row(row, f"rows[{i}]: ") for i, row in enumerate(_field(data, "rows", list, ""))]
    by_name = {row["name"]: row for row in rows}
    if missing := [name for name in ("ours", "seed") if name not in by_name]:
        raise ValueError(f"no {missing[0]!r} row; expected the rows 'ours', 'seed' and one per switch")
    weakness = {name: meta["weakness"] for name, meta in study_differences().items()}
    effects = []
    for i, effect in enumerate(_field(data, "effects", list, "")):
        where = f"effects[{i}]: "
        if not isinstance(effect, dict):
            raise ValueError(f"{where}expected a JSON object, got {type(effect).__name__}")
        switch = _field(effect, "switch", str, where)
        effects.append({"switch": switch, "weakness": weakness.get(switch), "from": _field(effect, "from", str, where),
                        **{m: _field(effect, m, NUMBER, where, optional=True) for m in ABLATION_MEASURES}})
    verdict = _field(data, "verdict", list, "")
    if not all(isinstance(line, str) for line in verdict):
        raise ValueError("field 'verdict' holds a non-text line; expected a list of sentences")
    positions = _field(data, "training_positions", dict, "")
    seed = by_name["seed"]
    published = {m: {"seed_protocol": seed[m]["pp"], "published": SEED_STUDY[key]["mean"],
                     "difference_pp": seed[m]["pp"] - SEED_STUDY[key]["mean"]}
                 for m, key in ABLATION_PUBLISHED.items() if seed[m] is not None}
    return {"spec": _field(data, "spec", str, ""), "trials": [str(t) for t in _field(data, "trials", list, "")],
            "steer_target": _field(data, "steer_target", str, ""),
            "training_positions": {"run": [str(p) for p in _field(positions, "run", list, "training_positions: ")],
                                   "seed": _field(positions, "seed", str, "training_positions: ")},
            "rows": rows, "effects": effects, "verdict": verdict, "published": published,
            "seconds": _field(data, "seconds", NUMBER, "", optional=True)}


def ablation_label(measure: str, target: str) -> str:
    """"Δ A", "Δ B", or "steering B" for a run that steers B."""
    return ABLATION_MEASURES[measure] + (f" {target.upper()}" if measure == "steer_pp" else "")


def load_ablation(run_dir: str | Path) -> dict[str, Any] | None:
    """The report's part of `<run_dir>/ablation.json` (`dfc-ray ablate`), None when the run has none."""
    text, name = read_text(run_dir, ABLATION)
    if text is None:
        return None
    try:
        return _protocol_ablation(json.loads(text))
    except json.JSONDecodeError as err:
        raise ValueError(f"{name}: not valid JSON ({err.msg} at line {err.lineno})") from None
    except ValueError as err:
        raise ValueError(f"{name}: {err}") from None


# ---------------------------------------------------------------- the report dict


def summarize(values: Iterable[Any]) -> dict[str, Any]:
    """`{mean, std, n}` of the finite numbers in `values`; std is the sample std (n − 1), None below n = 2."""
    xs = [x for x in map(number, values) if x is not None]
    return {"mean": statistics.fmean(xs) if xs else None,
            "std": statistics.stdev(xs) if len(xs) > 1 else None, "n": len(xs)}


def descending(value: Any) -> tuple[bool, float]:
    """Sort key: larger numbers first, missing values last."""
    x = number(value)
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


def value_key(value: Any) -> str:
    """A config value as a hashable, comparable key (a list or dict too)."""
    return json.dumps(value, sort_keys=True)


def varying_axes(configs: Sequence[dict[str, Any]]) -> list[str]:
    """Config keys whose value differs between trials (a missing key counts as null)."""
    keys = list(dict.fromkeys(k for c in configs for k in c))
    return [k for k in keys if len({value_key(c.get(k)) for c in configs}) > 1]


def _sort_key(value: Any) -> tuple:
    if number(value) is not None:
        return (0, float(value), "")
    return (1 if isinstance(value, str) else 2, 0.0, value_key(value))


def _per_axis(results: Sequence[TrialResult], axis: str) -> list[dict[str, Any]]:
    groups: dict[str, list[TrialResult]] = {}
    for t in results:
        groups.setdefault(value_key(t.config.get(axis)), []).append(t)
    rows = []
    for trials in groups.values():
        ok = [t for t in trials if t.ok]
        rows.append({"value": trials[0].config.get(axis), "n_trials": len(trials), "n_failed": len(trials) - len(ok),
                     **{m.name: summarize(t.metrics.get(m.name) for t in ok) for m in shown_in("axis")}})
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
    rows.sort(key=lambda r: descending(r.get("cohens_d")))
    return rows[:BEST_FEATURES]


def min_set_size(metrics: dict[str, Any]) -> int | None:
    """The trial's minimal steerable set size; None when not measured or not reached (recorded as -1)."""
    size = number(metrics.get("steer_min_set"))
    return int(size) if size is not None and size > 0 else None


def _min_sets(ok: Sequence[TrialResult]) -> dict[str, Any]:
    """How often a minimal steerable set was found, and its sizes, over trials that ran steering."""
    steered = [t for t in ok if number(t.metrics.get("steer_min_set")) is not None]
    sizes = [size for t in steered if (size := min_set_size(t.metrics)) is not None]
    return {"n_steered": len(steered), "n_reached": len(sizes), "sizes": summarize(sizes)}


LOCALIZE_TESTS = {"curve": "steer B by the top n mean writes (B ← A)", "ablate_b": "ablate top B-exclusive in B",
                  "patch_a": "patch top n in A to B's rows (A → B)"}
"""The causal tests of the localisation (SteerConfig.localize) → their row label."""
PARTITION_SHARES = ("a_exclusive", "b_exclusive", "shared")
"""The partitions whose shares of the difference the report shows (diff_share_<partition>)."""
LARGEST_TERMS = 10
"""Rows of report.json's `largest_terms` (and its table)."""


def _groups(trials: Sequence[TrialResult]) -> tuple[bool, list[list[TrialResult]]]:
    """Trials per layer, and per positions when it varies (whether it does, and the groups in order)."""
    by_positions = len({value_key(t.config.get("positions")) for t in trials}) > 1
    groups: dict[tuple[Any, ...], list[TrialResult]] = {}
    for t in trials:
        key = (_sort_key(t.config.get("layer")), _sort_key(t.config.get("positions")) if by_positions else ())
        groups.setdefault(key, []).append(t)
    return by_positions, [groups[key] for key in sorted(groups)]


def _sizes(values: Iterable[Any]) -> dict[str, Any]:
    """Feature counts where −1 means "none": how many trials measured one, how many had one, and their
    `{mean, std, n}` with the range."""
    measured = [int(x) for x in map(number, values) if x is not None]
    sizes = [x for x in measured if x > 0]
    return {"n_measured": len(measured), "n_reached": len(sizes), "sizes": summarize(sizes),
            "range": [min(sizes), max(sizes)] if sizes else None}


def _effect_summary(trials: Sequence[TrialResult], name: str) -> dict[str, Any] | None:
    """One causal test over the trials that ran it: its n and effects over trials, and the trial with the
    largest |effect| with its CI and its control's."""
    ran = [t for t in trials if number(t.metrics.get(f"loc_{name}_pp")) is not None]
    if not ran:
        return None
    best = max(ran, key=lambda t: abs(t.metrics[f"loc_{name}_pp"]))
    return {"n_trials": len(ran), "n": summarize(t.metrics.get(f"loc_{name}_n") for t in ran),
            "pp": summarize(t.metrics.get(f"loc_{name}_pp") for t in ran),
            "random": summarize(t.metrics.get(f"loc_{name}_random_pp") for t in ran),
            "best": {"trial_id": best.trial_id, "n": best.metrics.get(f"loc_{name}_n"),
                     "effect": _with_ci(best.metrics, f"loc_{name}_pp"),
                     "random": _with_ci(best.metrics, f"loc_{name}_random_pp")}}


def _curve(trials: Sequence[TrialResult]) -> list[dict[str, Any]]:
    """The localisation curve over trials: per n, the test effect and share of the reference `{mean, std, n}`."""
    points: dict[int, list[dict[str, Any]]] = {}
    for t in trials:
        for point in t.metrics.get("loc_curve") or []:
            points.setdefault(int(point["n"]), []).append(point)
    return [{"n": n, "pp": summarize(p.get("pp") for p in group), "share": summarize(p.get("share") for p in group)}
            for n, group in sorted(points.items())]


def _difference(ok: Sequence[TrialResult]) -> list[dict[str, Any]]:
    """Where the A − B difference lives, per layer (and positions when it varies): the attribution over trials
    (n50/n90, partition shares, the top contributor's partition), the localisation curve against the reference
    and each causal test with its control."""
    located = [t for t in ok if number(t.metrics.get("diff_reference_norm")) is not None]
    by_positions, groups = _groups(located)
    rows = []
    for trials in groups:
        first = trials[0].metrics
        tested = [t for t in trials if number(t.metrics.get("loc_reference_pp")) is not None]  # ran the causal tests
        tops = [t.metrics["diff_top"][0]["partition"] for t in trials if t.metrics.get("diff_top")]
        norm = number(first.get("diff_reference_norm")) or 0.0
        rows.append({
            "layer": trials[0].config.get("layer"),
            **({"positions": trials[0].config.get("positions")} if by_positions else {}),
            "n_trials": len(trials), "reference_norm": norm,
            "features_of_reference": summarize(t.metrics.get("diff_features", 0.0) / norm if norm else None
                                               for t in trials),
            "cos_reconstruction": summarize(t.metrics.get("diff_cos_reconstruction") for t in trials),
            "cos_norm_means": first.get("diff_cos_norm_means"),
            "n50": _sizes(t.metrics.get("diff_n50") for t in trials),
            "n90": _sizes(t.metrics.get("diff_n90") for t in trials),
            "shares": {p: summarize(t.metrics.get(f"diff_share_{p}") for t in trials) for p in PARTITION_SHARES},
            "top_partition": {p: tops.count(p) for p in PARTITION_SHARES},
            **({"reference": _with_ci(tested[0].metrics, "loc_reference_pp")} if tested else {}),
            "curve": _curve(trials),
            "effect_n50": _sizes(t.metrics.get("loc_n50") for t in trials),
            "tests": {name: summary for name in LOCALIZE_TESTS
                      if (summary := _effect_summary(trials, name)) is not None}})
    return rows


def _largest_terms(ok: Sequence[TrialResult]) -> list[dict[str, Any]]:
    """The largest terms of the difference over all trials, by their share of their trial's Σ c_j."""
    rows = [{"trial_id": t.trial_id, **term} for t in ok for term in t.metrics.get("diff_top") or []]
    rows.sort(key=lambda r: descending(r.get("share")))
    return rows[:LARGEST_TERMS]


STEER_CIS = ("steer_delta_pp", "steer_random_feature_pp", "steer_random_direction_pp")
"""Steering effects of one trial reported with a paired 95% CI (`<name>_lo`, `<name>_hi`)."""


def _with_ci(metrics: dict[str, Any], name: str) -> dict[str, Any]:
    """{pp, lo, hi} of a steering effect (lo/hi None when the trial did not report a CI)."""
    return {"pp": metrics.get(name), "lo": metrics.get(f"{name}_lo"), "hi": metrics.get(f"{name}_hi")}


def _steering_reference(ok: Sequence[TrialResult]) -> list[dict[str, Any]]:
    """Per layer (and positions, when it varies): the reference direction's test effect with its CI
    and verdict (one per steering replica and layer, so the first trial's), the best trial's feature
    and controls with their CIs, and cos / share of the reference over trials."""
    by_positions, groups = _groups([t for t in ok if number(t.metrics.get("steer_reference_pp")) is not None])
    rows = []
    for trials in groups:
        first, best = trials[0].metrics, min(trials, key=lambda t: descending(t.metrics.get("steer_delta_pp")))
        rows.append({
            "layer": trials[0].config.get("layer"),
            **({"positions": trials[0].config.get("positions")} if by_positions else {}),
            "target": first.get("steer_target"), "n_trials": len(trials),
            "reference": _with_ci(first, "steer_reference_pp") | {
                "alpha": first.get("steer_reference_alpha"), "sig": first.get("steer_reference_sig"),
                "label": first.get("steer_reference_label") or "",
                "random_direction": _with_ci(first, "steer_reference_random_direction_pp")},
            "best_trial": {"trial_id": best.trial_id, "feature": best.metrics.get("steer_feature"),
                           "alpha": best.metrics.get("steer_alpha"),
                           **{name.removeprefix("steer_").removesuffix("_pp"): _with_ci(best.metrics, name)
                              for name in STEER_CIS}},
            "cos_reference": summarize(t.metrics.get("steer_cos_reference") for t in trials),
            "share_of_reference": summarize(t.metrics.get("steer_share_of_reference") for t in trials)})
    return rows


def _feature_count(values: Iterable[Any]) -> dict[str, Any]:
    """`{mean, std, n}` of the counts reached (−1: none reached), and `n_measured`: the trials that measured one."""
    sizes = _sizes(values)
    return sizes["sizes"] | {"n_measured": sizes["n_measured"]}


def _headline(ok: Sequence[TrialResult]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(headline, baseline, comparison with the seed study) over successful trials."""
    summaries = [h for h in HEADLINE if not h.baseline]
    summaries.sort(key=lambda h: (h.control, h.fraction))  # report.json's order: Δs, spliced rates, controls
    headline = {h.key: _feature_count(t.metrics.get(h.metric) for t in ok) if h.feature_count
                else summarize(t.metrics.get(h.metric) for t in ok) for h in summaries}
    baseline = {h.key: summarize(t.metrics.get(h.metric) for t in ok)["mean"] for h in HEADLINE if h.baseline}
    ours = {**{k: v["mean"] for k, v in headline.items()}, **baseline}
    comparison = {}
    for h in HEADLINE:
        if h.key in SEED_STUDY:
            seed = SEED_STUDY[h.key]["mean"] if isinstance(SEED_STUDY[h.key], dict) else SEED_STUDY[h.key]
            diff = None if ours[h.key] is None else (ours[h.key] - seed) * (100 if h.fraction else 1)
            comparison[h.key] = {"ours": ours[h.key], "seed": seed, "difference_pp": diff}
    return headline, baseline, comparison


def build_report(results: Sequence[TrialResult], run_info: dict[str, Any] | None = None,
                 protocol_ablation: dict[str, Any] | None = None) -> dict[str, Any]:
    """The report.json content. Every statistic is over successful trials (status "ok");
    `protocol_ablation` is `load_ablation`'s part of the run's ablation.json."""
    ok = [t for t in results if t.ok]
    headline, baseline, comparison = _headline(ok)
    return _json_safe({
        "run": dict(run_info or {}),
        **({"dialect": run_info["dialect"]} if run_info and "dialect" in run_info else {}),  # judged runs
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
        "seconds_per_trial": {m.name: summarize(t.metrics.get(m.name) for t in ok) for m in shown_in("time")},
        **({"steering_reference": rows} if (rows := _steering_reference(ok)) else {}),  # runs with a reference
        **({"difference": rows, "largest_terms": _largest_terms(ok)}  # runs that attributed the difference
           if (rows := _difference(ok)) else {}),
        **({"protocol_ablation": protocol_ablation} if protocol_ablation else {}),  # runs `dfc-ray ablate` judged
    })


def run_report(run_dir: str | Path, results: Sequence[TrialResult] | None = None,
               run_info: dict[str, Any] | None = None) -> dict[str, Any]:
    """The report of a run folder: `results` (default: its results.jsonl), `run_info` (default: its
    earlier report.json's) and its ablation.json when `dfc-ray ablate` has written one."""
    results = load_results(run_dir) if results is None else results
    return build_report(results, stored_run_info(run_dir) if run_info is None else run_info, load_ablation(run_dir))
