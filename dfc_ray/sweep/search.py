"""What trials a sweep runs and how many at once: Optuna search (grid and TPE), resume bookkeeping,
the concurrency limit and the optional ASHA scheduler.

Tune pickles the searcher into its resume state: `SpaceSampler` and `ObjectiveAtTheEnd` are
module-level classes for that reason.
"""

from __future__ import annotations

from dataclasses import dataclass
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
from dfc_ray.spaces import SweepSpec
from dfc_ray.sweep.trial import TRAIN_REPORTS


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

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        super().on_trial_complete(trial_id, result=result, error=error)
        if self.study_saved is not None:
            self.study_saved()

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        metrics = self.metric if isinstance(self.metric, list) else [self.metric]
        if all(m in result for m in metrics):
            super().on_trial_result(trial_id, result)


def searcher(spec: SweepSpec, journal: Path, remaining: list[dict[str, Any]] | None,
             study_saved: Callable[[], None] | None = None):
    """OptunaSearch over the spec. `remaining`: the grid points still to run when resuming (None on a
    fresh run); the study (`journal`) is shared across resumes, so TPE keeps learning from every trial."""
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
    return ConcurrencyLimiter(search, max_concurrent=max_concurrent(spec))


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


def max_concurrent(spec: SweepSpec) -> int:
    """Trials at once: what the cluster's CPUs allow after Ray Data and the evaluators take theirs."""
    if spec.resources.max_concurrent is not None:
        return spec.resources.max_concurrent
    cpus = ray.cluster_resources().get("CPU", 1)
    reserved = spec.resources.reserved_data_cpus(spec.train["reader"])
    reserved += spec.resources.evaluators * (0 if spec.resources.evaluator_gpu else 1)
    return max(1, int((cpus - reserved) // spec.resources.cpu))


def scheduler(spec: SweepSpec):
    """ASHA over the training reports when the spec asks for it, else None (every trial runs to the end)."""
    if spec.scheduler is None:
        return None
    asha = spec.scheduler
    return ASHAScheduler(metric=asha.metric, mode=asha.mode, time_attr="training_iteration",
                         max_t=asha.max_t or TRAIN_REPORTS + 1, grace_period=asha.grace_period,
                         reduction_factor=asha.reduction_factor)
