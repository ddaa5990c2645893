"""`dfc-ray ablate RUN`: re-judge a finished run's checkpoints under dfc-ray's protocol, the seed study's,
and each of the two with one of the six differences changed (docs/replication.md).

Rows: "ours"; "seed" (every JudgeProtocol switch on, and dictionaries trained on the study's data,
config.seed_training); then, per difference in the study's weakness order, "seed, X ours" (the study's
protocol with X turned back) and "ours, X seed" (ours with only X as the study had it). A difference's
effect from the seed side is seed − (seed, X ours): what reproducing it adds to the study's numbers; from
our side it is (ours, X seed) − ours: what it alone does to ours. The two disagree when differences
interact (one of them can hide every other, as the raw prompt does on the organism). Every row judges
the same checkpoints: the run's best `max_checkpoints` DFC trials by its objective and, for rows on the
study's training data, twins trained with the same settings on it. The judges run in this process, once
per distinct setting (an evaluation depends on the checkpoint, normalization and prompt format and is
scored under both metrics; steering on everything, re-scoring replies it has already generated).

Δ A, Δ B and the steering effect pool the checkpoints per prompt (each prompt's mean over checkpoints
of its paired difference) with a 95% bootstrap CI over prompts. The reference direction goes through
each row's steering protocol too, so a row also says whether its instrument could see an effect at all.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from actors.evaluator import Evaluator
from actors.steering import Steerer
from dfc_ray.config import SEED_TRAINING_POSITIONS, JudgeProtocol, seed_training, study_differences
from dfc_ray.evaluate import Rate, paired_delta_pp
from dfc_ray.fs import RunFolder, redact, within
from dfc_ray.harvest import harvest
from dfc_ray.report import write_report
from dfc_ray.report.build import ABLATION, ABLATION_MEASURES
from dfc_ray.spaces import SweepSpec, parse_spec
from dfc_ray.sweep.results import read_results
from dfc_ray.sweep.trial import trial_batches, trial_configs
from dfc_ray.train import train
from dfc_ray.yamlio import parse_yaml



@dataclass(frozen=True)
class Row:
    """One re-judging: a protocol and the training data of the judged dictionaries."""

    name: str
    base: str
    """"ours" or "seed": the protocol the row starts from."""
    switch: str
    """The one difference changed from `base` ("" for the two base rows; "positions" for the training data)."""
    protocol: JudgeProtocol
    study_training: bool
    """True: judge the twins trained on the study's data; False: the run's own checkpoints."""


def ablation_rows() -> list[Row]:
    """ours, seed, then per difference (weakness order) seed with it turned back and ours with it turned on."""
    ours, seed = JudgeProtocol(), JudgeProtocol(base="seed")
    rows = [Row("ours", "ours", "", ours, False), Row("seed", "seed", "", seed, True)]
    for name in study_differences():
        training = name == "positions"
        rows.append(Row(f"seed, {name} ours", "seed", name, seed if training else seed.reverted(name), not training))
    for name in study_differences():
        training = name == "positions"
        rows.append(Row(f"ours, {name} seed", "ours", name, ours if training else ours.reverted(name), training))
    return rows


def pooled_delta(before: Sequence[Sequence[bool]], after: Sequence[Sequence[bool]], n_boot: int, seed: int) -> Rate:
    """after − before in pp, per prompt averaged over checkpoints (rows of the inputs), CI over prompts."""
    return paired_delta_pp(np.mean(np.asarray(before, float), 0), np.mean(np.asarray(after, float), 0), n_boot,
                           seed)


def pick_trials(spec: SweepSpec, records: list[dict[str, Any]], max_checkpoints: int,
                trial_ids: Sequence[str] = (), source: str = "results.jsonl") -> list[dict[str, Any]]:
    """The judged trials: `trial_ids`, or the best `max_checkpoints` finished DFC trials (with A-exclusive
    features, which steering needs) by the run's first objective; `source` names the records in errors."""
    done = {r["trial_id"]: r for r in records if r.get("status") == "ok" and r["metrics"].get("checkpoint")}
    dfc = [r for r in done.values() if spec.trial_settings(r["config"]).get("a_exclusive", 0) > 0]
    if trial_ids:
        missing = [t for t in trial_ids if t not in done]
        if missing:
            raise ValueError(f"--trials {missing[0]}: not a finished trial with a checkpoint in {source}")
        plain = [t for t in trial_ids if done[t] not in dfc]
        if plain:  # steering and the reference row need A-exclusive features: refused, not left blank
            raise ValueError(f"--trials {plain[0]}: a plain crosscoder (a_exclusive 0); expected a DFC trial")
        return [done[t] for t in trial_ids]
    if not dfc:
        raise ValueError(f"{source} holds no finished DFC trial (a_exclusive > 0) with a checkpoint; expected "
                         "at least one to re-judge")
    metric, sign = spec.metrics[0], -1 if spec.modes[0] == "max" else 1

    def rank(i: int) -> tuple[bool, float, int]:  # best first; a missing or non-finite objective last
        value = dfc[i]["metrics"].get(metric)
        usable = isinstance(value, (int, float)) and np.isfinite(value)
        return (not usable, sign * float(value) if usable else 0.0, i)

    return [dfc[i] for i in sorted(range(len(dfc)), key=rank)[:max_checkpoints]]


def check_paths(run: RunFolder, trials: list[dict[str, Any]], store: str | None) -> None:
    """The paths the trials' records name are data, not instructions: each checkpoint must lie in the run
    folder, each harvest store in the sweep's store (`store`, else the default beside the run) or the run
    folder; else one line, before anything is read or written there."""
    default_store = f"{run.uri.rsplit('/', 1)[0]}/harvests"
    stores = [run.uri, store or default_store]
    for trial in trials:
        where = f"{redact(run.uri)}/results.jsonl: trial {trial['trial_id']}"
        checkpoint, harvested = trial["metrics"].get("checkpoint"), trial["metrics"].get("harvest_store")
        if not (isinstance(checkpoint, str) and within(checkpoint, run.uri)):
            raise ValueError(f"{where}: metrics.checkpoint = {redact(str(checkpoint))!r}: outside the run folder; "
                             f"expected its checkpoint under {redact(run.uri)}/checkpoints")
        if harvested is not None and not (isinstance(harvested, str)  # the twins' harvest goes to its parent
                                          and any(within(harvested.rsplit("/", 1)[0], r) for r in stores)):
            raise ValueError(f"{where}: metrics.harvest_store = {redact(str(harvested))!r}: outside the run's "
                             f"storage; expected a harvest under {redact(stores[1])} or the run folder (pass "
                             "--store ROOT when the sweep ran with another --store)")


def train_twins(spec: SweepSpec, run: RunFolder, trials: list[dict[str, Any]], progress: bool) -> dict[str, str]:
    """Trial id → checkpoint of a twin trained with the trial's settings on the study's training data
    (config.seed_training; the trial's own checkpoint when it already trained on that). The twins' harvest
    is cached beside the run's."""
    study = seed_training(spec.harvest)
    twins = {t["trial_id"]: t["metrics"]["checkpoint"] for t in trials if spec.harvest.corpus == study.corpus
             and spec.trial_positions(spec.trial_settings(t["config"])) == study.positions}
    todo = [t for t in trials if t["trial_id"] not in twins]
    if not todo:
        return twins
    used = todo[0]["metrics"].get("harvest_store")  # <store root>/<content hash> of the trial's harvest
    root = str(used).rsplit("/", 1)[0] if used else f"{run.uri.rsplit('/', 1)[0]}/harvests"  # the sweep's default
    harvested = harvest(replace(study, store=root), use_ray=False, progress=progress)
    for trial in todo:
        settings = spec.trial_settings(trial["config"])
        dfc, train_cfg = trial_configs(settings, harvested.d_model)
        batches = trial_batches(harvested.uri, settings["layer"], settings["batch_size"], "local", train_cfg.seed,
                                harvested.d_model, harvested.models)
        with tempfile.TemporaryDirectory(prefix="dfc-ray-twin-") as tmp:
            result = train(dfc, train_cfg, batches, out_dir=tmp)
            if result.status != "ok":
                raise ValueError(f"trial {trial['trial_id']}: its text_end twin did not train ({result.reason})")
            twins[trial["trial_id"]] = run.upload_dir(Path(tmp) / "dfc", f"ablation/twins/{trial['trial_id']}")
    return twins


def _rate(rate: Rate) -> dict[str, float]:
    return asdict(rate)


class Judges:
    """In-process evaluator and steerer, with each distinct judging cached (rows share most of them)."""

    def __init__(self, spec: SweepSpec, device: str):
        pair = replace(spec.pair, device=device)
        self.steerer = Steerer(pair)
        self.evaluator = Evaluator(pair, shared=self.steerer)  # one copy of the pair, each clean reply once
        self.eval_cfg = replace(spec.eval, n_texts=0)  # the splice loss is not what the protocols disagree on
        self.steer_cfg = spec.steering
        self._done: dict[str, Any] = {}

    def _cached(self, key: list[Any], compute):
        text = json.dumps(key, sort_keys=True)
        if text not in self._done:
            self._done[text] = compute()
        return self._done[text]

    def evaluate(self, checkpoint: str, layer: int, protocol: JudgeProtocol):
        """The evaluation depends on the checkpoint's reading and the prompts; it scores both metrics."""
        judged = {k: v for k, v in protocol.switches().items() if k in ("normalization", "prompt_format")}
        return self._cached(["eval", checkpoint, layer, judged], lambda: self.evaluator.evaluate(
            checkpoint, layer, replace(self.eval_cfg, protocol=protocol)))

    def steer(self, checkpoint: str, layer: int, protocol: JudgeProtocol):
        return self._cached(["steer", checkpoint, layer, protocol.switches()], lambda: self.steerer.steer(
            checkpoint, layer, replace(self.steer_cfg, protocol=protocol)))


def judge_row(row: Row, judges: Judges, checkpoints: list[tuple[str, int]], target: str, n_boot: int,
              seed: int) -> dict[str, Any]:
    """One row's pooled numbers over `checkpoints` ((path, layer) pairs)."""
    started = time.perf_counter()
    evals = [judges.evaluate(path, layer, row.protocol) for path, layer in checkpoints]
    steers = [judges.steer(path, layer, row.protocol).targets.get(target) for path, layer in checkpoints]
    out: dict[str, Any] = {"name": row.name, "base": row.base, "switch": row.switch,
                           "protocol": row.protocol.switches(),
                           "training_positions": SEED_TRAINING_POSITIONS if row.study_training else "run"}
    passed = [e.passed[row.protocol.metric] for e in evals]
    for model in "ab":
        out[f"{model}_clean"] = float(np.mean([p[f"{model}_clean"] for p in passed]))
        out[f"delta_{model}_pp"] = _rate(pooled_delta([p[f"{model}_clean"] for p in passed],
                                                      [p[f"{model}_splice"] for p in passed], n_boot, seed))
    steered = [s for s in steers if s is not None]
    if steered:
        out["steer_pp"] = _rate(pooled_delta([s.test_clean_passed for s in steered],
                                             [s.test_steered_passed for s in steered], n_boot, seed))
        out["steer_features"] = [s.feature for s in steered]
        reference = steered[0].reference
        out["reference_pp"] = _rate(reference.delta_pp) if reference is not None else None
    out["seconds"] = time.perf_counter() - started
    return out


def switch_effects(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per changed row, its difference's effect on each measure, from its base: seed − (seed, X ours), or
    (ours, X seed) − ours; positive means the study's way of doing X raises the number."""
    bases = {r["name"]: r for r in rows if not r["switch"]}
    effects = []
    for row in rows:
        if row["switch"]:
            base, sign = bases[row["base"]], 1 if row["base"] == "seed" else -1
            effects.append({"switch": row["switch"], "from": row["base"]} |
                           {m: sign * (base[m]["mean"] - row[m]["mean"]) + 0.0 for m in ABLATION_MEASURES
                            if base.get(m) and row.get(m)})
    return effects


def verdict(effects: list[dict[str, Any]], rows: list[dict[str, Any]]) -> list[str]:
    """Per measure: how far the seed protocol is from ours and, from each side, the difference that moves it
    most; then the rows where the reference direction is blind."""
    by_name = {r["name"]: r for r in rows}
    lines = []
    for measure in ABLATION_MEASURES:
        if not by_name["seed"].get(measure) or not by_name["ours"].get(measure):
            continue
        gap = by_name["seed"][measure]["mean"] - by_name["ours"][measure]["mean"]
        sides = []
        for side in ("seed", "ours"):
            moved = [e for e in effects if e["from"] == side and measure in e]
            top = max(moved, key=lambda e: abs(e[measure]), default=None)
            sides.append(f"from {side}, {top['switch']} moves it most ({top[measure]:+.1f} pp)"
                         if top and abs(top[measure]) > 0 else f"from {side}, no single difference moves it")
        lines.append(f"{measure}: seed protocol {by_name['seed'][measure]['mean']:+.1f} pp vs ours "
                     f"{by_name['ours'][measure]['mean']:+.1f} pp (gap {gap:+.1f}); " + "; ".join(sides))
    blind = [r["name"] for r in rows if r.get("reference_pp") and r["reference_pp"]["lo"] <= 0]
    if blind:  # a null there is no evidence: the positive control did not move the target either
        lines.append(f"the reference direction does not move the target beyond its CI in {len(blind)} of "
                     f"{len(rows)} rows ({'; '.join(blind)}): a null there cannot tell a missing effect from a "
                     f"blind instrument")
    return lines


def ablate(run_uri: str, *, max_checkpoints: int = 3, trial_ids: Sequence[str] = (), device: str = "auto",
           progress: bool = True, store: str | None = None) -> dict[str, Any]:
    """Re-judge the run's checkpoints under every row of `ablation_rows`; writes RUN/ablation.json. `store`: the
    sweep's harvest store root, when it was not the default beside the run (`check_paths`)."""
    started = time.perf_counter()
    run = RunFolder(run_uri, create=False)
    spec_text = run.read_text("spec.yaml")
    if spec_text is None:
        raise FileNotFoundError(f"{redact(run.uri)}: no spec.yaml; expected a sweep's run folder")
    where = f"{redact(run.uri)}/spec.yaml"
    spec = parse_spec(parse_yaml(spec_text, where), where)
    trials = pick_trials(spec, read_results(run), max_checkpoints, trial_ids, f"{redact(run.uri)}/results.jsonl")
    check_paths(run, trials, store)
    twins = train_twins(spec, run, trials, progress)
    layers = {t["trial_id"]: int(spec.trial_settings(t["config"])["layer"]) for t in trials}
    judges = Judges(spec, device)
    target, boot = spec.steering.primary, (spec.eval.n_bootstrap, spec.eval.seed)
    rows = []
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task(f"re-judging {len(trials)} checkpoints under {len(ablation_rows())} protocols",
                            total=len(ablation_rows()))
        for row in ablation_rows():
            checkpoints = [(twins[t["trial_id"]] if row.study_training else t["metrics"]["checkpoint"],
                            layers[t["trial_id"]]) for t in trials]
            rows.append(judge_row(row, judges, checkpoints, target, *boot))
            bar.advance(task)
    effects = switch_effects(rows)
    result = {"run": redact(run.uri), "spec": spec.name, "trials": [t["trial_id"] for t in trials],
              "twins": {k: redact(v) for k, v in twins.items()}, "steer_target": target,
              "training_positions": {"run": sorted({spec.trial_positions(spec.trial_settings(t["config"]))
                                                    for t in trials}), "seed": SEED_TRAINING_POSITIONS},
              "rows": rows, "effects": effects, "verdict": verdict(effects, rows),
              "seconds": time.perf_counter() - started}
    run.write_text(ABLATION, json.dumps(result, indent=1))
    if run.is_local:  # the report's "ours vs the study's protocol" reads the file just written
        write_report(run.root)
    return result


def print_ablation(result: dict[str, Any], console: Console | None = None) -> None:
    """The rows as a table (pp [95% CI]), then the verdict."""
    console = console or Console()
    table = Table(title=f"{result['spec']}: ours vs the seed study's protocol, {len(result['trials'])} checkpoints, "
                        f"pp [95% CI over prompts]")
    for col in ("protocol", "A clean %", "B clean %", "Δ A", "Δ B", f"steering {result['steer_target'].upper()}",
                "reference"):
        table.add_column(col, justify="left" if col == "protocol" else "right", no_wrap=col == "protocol")

    def cell(rate: dict[str, float] | None) -> str:
        return "—" if rate is None else f"{rate['mean']:+.1f} [{rate['lo']:+.0f}, {rate['hi']:+.0f}]"

    for row in result["rows"]:
        table.add_row(row["name"], f"{100 * row['a_clean']:.0f}", f"{100 * row['b_clean']:.0f}",
                      cell(row["delta_a_pp"]), cell(row["delta_b_pp"]), cell(row.get("steer_pp")),
                      cell(row.get("reference_pp")))
    console.print(table)
    for line in result["verdict"]:
        console.print(line)
    console.print(f"{result['seconds']:.0f} s; written to {result['run']}/{ABLATION}")
