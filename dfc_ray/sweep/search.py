"""What trials a sweep runs and how many at once: Optuna search (grid and TPE), resume bookkeeping,
the concurrency limit and the optional ASHA scheduler.

Tune pickles the searcher into its resume state: `SpaceSampler` and `ObjectiveAtTheEnd` are
module-level classes for that reason.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import optuna
import ray
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch

from dfc_ray.failures import lost_to_infrastructure
from dfc_ray.metrics import find as find_metric
from dfc_ray.metrics import number
from dfc_ray.spaces import SweepSpec
from dfc_ray.sweep.trial import TRAIN_REPORTS, TRIAL_KEY

TRIAL_ATTRIBUTES = ("fvu_a", "fvu_b", "delta_a_pp", "delta_b_pp", "steer_delta_pp", "steer_reference_pp",
                    "diff_n50", "diff_share_a_exclusive", "loc_n50")
"""Trial metrics every Optuna trial carries as user attributes (optuna-dashboard's trial table), beside its
dfc trial id: the reconstruction, both splices, the chosen feature's and the reference's steering effects,
how many features carry half the A − B difference, the A-exclusive partition's share of it, and (where
localisation ran) how many features carry half the reference's effect."""


@dataclass
class TrialIds:
    """dfc trial ids: 8 hex digits of a hash of the trial's grid point and its occurrence (the n-th trial of
    that point). The same point asks for the same id, so a trial that was running when its driver stopped comes
    back under its id on `--resume`; `taken` (ids in results.jsonl and retried.jsonl, and every id handed out)
    is skipped, so a finished trial's id is never reused and a lost trial's re-run gets a new one."""

    grid: tuple[str, ...]
    taken: set[str] = field(default_factory=set)

    def assign(self, params: dict[str, Any]) -> str:
        point = [params.get(name) for name in self.grid]
        for occurrence in itertools.count():
            trial_id = hashlib.sha1(json.dumps([point, occurrence], default=str).encode()).hexdigest()[:8]
            if trial_id not in self.taken:
                self.taken.add(trial_id)
                return trial_id
        raise AssertionError("unreachable")  # itertools.count never ends


@dataclass(frozen=True)
class SpaceSampler:
    """Optuna define-by-run space: grid axes as categoricals (GridSampler enumerates them), then the
    sampled axes. A class, not a closure, because Tune pickles the searcher into its resume state."""

    spec: SweepSpec

    def __call__(self, trial) -> None:
        for axis in self.spec.grid:
            trial.suggest_categorical(axis.name, list(axis.labels))
        for dist in self.spec.search:
            dist.suggest(trial)


class ObjectiveAtTheEnd(OptunaSearch):
    """OptunaSearch that ignores results without the objective: training reports carry FVU and
    loss, the objective (a Δ from the evaluator) arrives only in a trial's final report.
    `study_saved` (optional) runs after the study has recorded a finished trial: an S3 run copies
    its journal there, so the copy never lags the trials results.jsonl holds."""

    study_saved: Callable[[], None] | None = None
    trial_ids: TrialIds | None = None
    metric_names: list[str] | None = None

    def _setup_study(self, mode) -> None:
        super()._setup_study(mode)
        if self.metric_names:  # also on a re-setup
            name_objectives(self._ot_study, self.metric_names)

    def suggest(self, trial_id: str) -> dict | None:
        """Optuna's parameters plus the trial's dfc id (`TRIAL_KEY`), also kept as an Optuna user attribute."""
        config = super().suggest(trial_id)
        if isinstance(config, dict) and self.trial_ids is not None:
            config[TRIAL_KEY] = self.trial_ids.assign(config)
            self._ot_trials[trial_id].set_user_attr("dfc_trial_id", config[TRIAL_KEY])
        return config

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self._ot_trials and result:  # before `tell`: a finished Optuna trial cannot change
            for name in TRIAL_ATTRIBUTES:
                if (value := number(result.get(name))) is not None:
                    self._ot_trials[trial_id].set_user_attr(name, value)
            objectives = self.metric if isinstance(self.metric, list) else [self.metric]
            unmeasured = [m for m in objectives if number(result.get(m)) is None]
            if unmeasured:  # NaN (e.g. `--no-eval`): Optuna refuses it, so the trial is told as failed, and why
                why = f"{', '.join(unmeasured)} not measured ({result.get('reason') or 'no judges'})"
                self._ot_trials[trial_id].set_user_attr("objective_missing", why)
                result, error = {k: v for k, v in result.items() if k not in objectives}, True
        super().on_trial_complete(trial_id, result=result, error=error)
        if self._ot_study is not None:
            self._ot_study.set_user_attr("best", best_note(self._ot_study, self.metric_names))
        if self.study_saved is not None:
            self.study_saved()

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        metrics = self.metric if isinstance(self.metric, list) else [self.metric]
        if all(m in result for m in metrics):
            super().on_trial_result(trial_id, result)


def best_note(study: optuna.Study, names: list[str] | None) -> str:
    """What the study's best is, in words, for its `best` user attribute: the best trial's dfc id and value,
    or how many trials tie at the best value (then no trial is called best); several objectives: the
    size of the Pareto front."""
    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not done:
        return "no finished trial yet"
    label = (names or ["objective"])[0]
    if len(study.directions) > 1:
        return f"{len(study.best_trials)} of {len(done)} trials on the Pareto front of {', '.join(names or [])}"
    pick = max if study.direction == optuna.study.StudyDirection.MAXIMIZE else min
    best = pick(t.value for t in done if t.value is not None and math.isfinite(t.value))
    tied = [t for t in done if t.value == best]
    if len(tied) > 1:
        return f"{len(tied)} of {len(done)} trials tie at {label} = {best:g}: no single best trial"
    return f"trial {tied[0].user_attrs.get('dfc_trial_id', tied[0].number)} ({label} = {best:g})"


def name_objectives(study: optuna.Study, names: list[str]) -> None:
    """optuna-dashboard shows these names instead of "Objective 0" (Optuna marks the call experimental)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(names)


def metric_names(spec: SweepSpec) -> list[str]:
    """The objectives' names as optuna-dashboard shows them: the registry's label and unit, then the key."""
    return [f"{m.heading} [{name}]" if (m := find_metric(name)) else name for name in spec.metrics]


def searcher(spec: SweepSpec, journal: Path, remaining: list[dict[str, Any]] | None,
             study_saved: Callable[[], None] | None = None, taken: set[str] | None = None, judged: bool = True):
    """OptunaSearch over the spec. `remaining`: the grid points still to run when resuming (None on a
    fresh run); the study (`journal`) is shared across resumes, so TPE keeps learning from every trial.
    `taken`: the dfc trial ids already recorded (`TrialIds`). `judged`: judge pools run beside the trials
    (their CPUs are kept out of the concurrency, `max_concurrent`)."""
    storage = JournalStorage(JournalFileBackend(str(journal)))
    _close_interrupted_trials(storage, spec.name)
    if spec.grid and not spec.search and remaining is None:
        sampler = optuna.samplers.GridSampler({a.name: list(a.labels) for a in spec.grid}, seed=0)
        points = None
    else:  # sampled axes, or a resumed grid: enqueue the grid points (partial when TPE samples the rest)
        sampler = optuna.samplers.TPESampler(seed=0)
        points = remaining if remaining is not None else \
            [p for p in spec.grid_points() for _ in range(spec.num_samples)] if spec.grid else None
    metric = spec.metrics[0] if len(spec.metrics) == 1 else spec.metrics
    mode = spec.modes[0] if len(spec.modes) == 1 else spec.modes
    search = ObjectiveAtTheEnd(space=SpaceSampler(spec), metric=metric, mode=mode, sampler=sampler, storage=storage,
                               study_name=spec.name, points_to_evaluate=points, seed=0)
    search.study_saved = study_saved
    search.trial_ids = TrialIds(tuple(a.name for a in spec.grid), set(taken or ()))
    search.metric_names = metric_names(spec)
    name_objectives(search._ot_study, search.metric_names)  # the study exists once OptunaSearch is made
    return ConcurrencyLimiter(search, max_concurrent=max_concurrent(spec, judged))


def _close_interrupted_trials(storage, study_name: str) -> None:
    """Trials left RUNNING by a killed driver are marked FAIL, so the study's view is honest."""
    try:
        study_id = storage.get_study_id_from_name(study_name)
    except KeyError:
        return
    for trial in storage.get_all_trials(study_id, states=(optuna.trial.TrialState.RUNNING,)):
        storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)


def remaining_work(spec: SweepSpec, done: list[dict[str, Any]]) -> tuple[int, list[dict[str, Any]] | None]:
    """(trials still to run, grid points to enqueue) given the results.jsonl records already written.

    Every recorded trial counts as done, failed ones too (they have their status and reason), except
    a trial the cluster lost (its node or a judge died: `lost_to_infrastructure`), which is owed again.
    With a grid, each point is owed `num_samples` trials minus those recorded for it."""
    done = [record for record in done if not lost_to_infrastructure(record)]
    if not spec.grid:
        return max(0, spec.n_trials - len(done)), None
    names = [a.name for a in spec.grid]
    counts: dict[tuple, int] = {}
    for record in done:
        key = tuple(record["config"].get(name) for name in names)
        counts[key] = counts.get(key, 0) + 1
    points = [p for p in spec.grid_points()
              for _ in range(max(0, spec.num_samples - counts.get(tuple(p[n] for n in names), 0)))]
    return len(points), points


def max_concurrent(spec: SweepSpec, judged: bool = True, cpus: float | None = None) -> int:
    """Trials at once: what the cluster's CPUs (`cpus`, default: the connected cluster's) allow after Ray Data
    and (when the trials are `judged`) the judge pools' replicas take theirs. A judge replica on a GPU holds
    no CPU here."""
    res = spec.resources
    if res.max_concurrent is not None:
        return res.max_concurrent
    cpus = ray.cluster_resources().get("CPU", 1) if cpus is None else cpus
    reserved = res.reserved_data_cpus(spec.train["reader"])
    if judged and not res.evaluator_gpu:
        reserved += res.judge_cpus()
    return max(1, int((cpus - reserved) // res.cpu))


def scheduler(spec: SweepSpec):
    """ASHA over the training reports when the spec asks for it, else None (every trial runs to the end)."""
    if spec.scheduler is None:
        return None
    asha = spec.scheduler
    return ASHAScheduler(metric=asha.metric, mode=asha.mode, time_attr="training_iteration",
                         max_t=asha.max_t or TRAIN_REPORTS + 1, grace_period=asha.grace_period,
                         reduction_factor=asha.reduction_factor)
