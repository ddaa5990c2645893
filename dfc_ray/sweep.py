"""`dfc-ray sweep`: a spec → harvest (or reuse) → Ray Tune + Optuna trials → results.jsonl → report.

Run folder (local path or s3://), the contract in DESIGN.md:

    <run>/spec.yaml            the merged spec, as run
    <run>/results.jsonl        one line per finished trial: trial_id, config, metrics, status (+ error)
    <run>/checkpoints/<id>/    each trial's crosscoder (config.json + model.safetensors)
    <run>/tune/trials-N/       Ray Tune's experiments (per-trial TensorBoard event files), one per
                               start or resume
    <run>/optuna.journal       the Optuna study (optuna-dashboard reads it)
    <run>/report.json, report.md, plots/*.png

A trial: stream its layer's activations → train → checkpoint → evaluate → steer → `tune.report`.
Trials run as separate Tune trials (not trainer groups): on the organism a trial's data pass costs
less than its evaluation, so grouping would save little and would tie trials' failures together
(docs/sweep.md has the numbers).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import yaml
from ray.tune import Callback
from ray.tune.search.optuna import OptunaSearch

from dfc_ray import store
from dfc_ray.failures import sweep_exit_code, trial_error
from dfc_ray.fs import RunFolder, absolute, redact
from dfc_ray.spaces import DFC_FIELDS, TRAIN_FIELDS, SweepSpec, load_spec, parse_spec

DEFAULT_SPEC = "organism48"
TRAIN_REPORTS = 10  # intermediate reports per trial (what ASHA and the live view see)
STRUCTURED = ("top_features", "alpha_curve")
"""Trial metrics that are lists: reported to Tune as JSON text (TensorBoard skips text, but warns on
lists), decoded back into lists in results.jsonl."""


@dataclass(frozen=True)
class TrialContext:
    """What every trial needs besides its own parameters; small and picklable."""

    spec_raw: dict
    spec_source: str
    run_dir: str
    store_uri: str
    d_model: int
    models: tuple[str, str]
    pools: tuple | None
    """(evaluator PoolConfig, steering PoolConfig); None: evaluation off."""


# ---------------------------------------------------------------- one trial


def trial_batches(ctx: TrialContext, layer: int, batch_size: int, reader: str, seed: int) -> Iterator:
    """Endless shuffled `(batch, 2, d_model)` batches of the trial's layer."""
    if reader == "local":
        return store.iter_layer_batches(ctx.store_uri, layer, batch_size, shuffle=True, seed=seed, epochs=10**9,
                                        drop_last=True, d_model=ctx.d_model, models=ctx.models)
    return store.iter_ray_batches(ctx.store_uri, layer, batch_size, epochs=None, seed=seed, drop_last=True,
                                  local_shuffle_buffer_size=8 * batch_size, d_model=ctx.d_model, models=ctx.models)


def run_trial(params: dict[str, Any], ctx: TrialContext) -> None:
    """The Tune trainable: train one crosscoder, then judge it, reporting as it goes."""
    import math as _math

    import torch
    from ray import tune

    from dfc_ray.crosscoder import DFCConfig
    from dfc_ray.plan import peak_memory_mb
    from dfc_ray.train import TrainConfig, train

    spec = parse_spec(ctx.spec_raw, ctx.spec_source)
    torch.set_num_threads(max(1, int(spec.resources.get("cpu", 1))))  # the trial's share, not every core
    if torch.cuda.is_available():  # trial actors are re-used: this trial's peak, not the actor's
        torch.cuda.reset_peak_memory_stats()
    settings = spec.trial_settings(params)
    layer = settings["layer"]
    dfc = DFCConfig(d_model=ctx.d_model, **{k: v for k, v in settings.items() if k in DFC_FIELDS})
    cfg = TrainConfig(**{k: v for k, v in settings.items() if k in TRAIN_FIELDS})
    every = max(1, cfg.steps // TRAIN_REPORTS)

    def on_metrics(name: str, step: int, m: dict[str, float]) -> None:
        if step % every == 0 and step < cfg.steps:
            tune.report({"phase": "train", "step": step, "loss": m["loss"], "fvu": (m["fvu_a"] + m["fvu_b"]) / 2,
                         "fvu_a": m["fvu_a"], "fvu_b": m["fvu_b"], "l0": m["l0"], "dead_frac": m["dead_frac"]})

    trial_id = tune.get_context().get_trial_id()
    local = Path(tune.get_context().get_trial_dir()) / "crosscoder"
    started = time.perf_counter()
    batches = trial_batches(ctx, layer, settings["batch_size"], settings["reader"], cfg.seed)
    result = train(dfc, cfg, batches, on_metrics=on_metrics, out_dir=local.parent)
    m = result.metrics
    metrics: dict[str, Any] = {"phase": "done", "status": result.status, "reason": result.reason, "steps": result.steps,
                               "train_s": time.perf_counter() - started}
    if m:
        metrics |= {"loss": m["loss"], "fvu": (m["fvu_a"] + m["fvu_b"]) / 2, "fvu_a": m["fvu_a"], "fvu_b": m["fvu_b"],
                    "l0": m["l0"], "dead_frac": m["dead_frac"]}
    metrics["train_peak_mem_mb"] = peak_memory_mb()
    if result.status == "ok":
        checkpoint = RunFolder(ctx.run_dir).upload_dir(local.parent / "dfc", f"checkpoints/{trial_id}")
        metrics["checkpoint"] = checkpoint
        if ctx.pools is not None:
            started = time.perf_counter()
            metrics |= judge_checkpoint(ctx.pools, checkpoint, layer)
            metrics["judge_s"] = time.perf_counter() - started
    for name in spec.metrics:  # an objective the trial could not produce is NaN, never a made-up number
        metrics.setdefault(name, _math.nan)
    tune.report(metrics)


def judge_checkpoint(pools: tuple, checkpoint: str, layer: int) -> dict[str, Any]:
    """Splice evaluation and steering of one checkpoint on the sweep's shared actor pools (both
    requests in flight at once), flattened into trial metrics."""
    import ray

    from actors.pool import ReplicaPool

    evaluator, steerer = (ReplicaPool.connect(cfg) for cfg in pools)
    started = time.perf_counter()
    refs = {"eval_s": evaluator.submit("evaluate", checkpoint, layer), "steer_s": steerer.submit("steer", checkpoint, layer)}
    seconds, pending = {}, list(refs.values())
    while pending:  # time each answer: how long a trial waits for each judge
        ready, pending = ray.wait(pending, num_returns=1)
        seconds |= {name: time.perf_counter() - started for name, ref in refs.items() if ref in ready}
    evaluation, steering = ray.get(list(refs.values()))
    ranking = [{"feature": f.feature, "cohens_d": f.cohens_d, "auroc": f.auroc} for f in steering.ranking[:5]]
    chosen = steering.targets.get(steering.config.get("primary", "a"))
    curve = [{"alpha": c.alpha, "delta_pp": 100 * (c.dev_correct - chosen.dev_clean)}  # dev α curve of the chosen feature
             for c in (chosen.grid if chosen else []) if c.feature == chosen.feature]
    return evaluation.metrics() | steering.metrics() | seconds | {"top_features": json.dumps(ranking),
                                                        "alpha_curve": json.dumps(curve),
                                                        "steer_skipped": steering.skipped}


def start_pools(spec: SweepSpec) -> list:
    """One evaluator and one steering pool per sweep, named after it, loaded once for all trials.
    The driver must hold the returned pools: replicas live as long as a handle does."""
    from actors.evaluator import EvaluatorActor
    from actors.pool import PoolConfig, ReplicaPool
    from actors.steering import SteeringActor

    gpus = spec.resources.get("evaluator_gpu", 0)
    cpus = spec.resources.get("evaluator_cpu", 1)
    replicas = spec.resources.get("evaluators", 1)
    configs = (PoolConfig(f"{spec.name}-evaluator", replicas=replicas, num_cpus=cpus, num_gpus=gpus),
               PoolConfig(f"{spec.name}-steering", replicas=replicas, num_cpus=cpus, num_gpus=gpus))
    return [ReplicaPool.create(EvaluatorActor, configs[0], spec.pair, spec.eval),
            ReplicaPool.create(SteeringActor, configs[1], spec.pair, spec.steering)]


# ---------------------------------------------------------------- the driver


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
    loss, the objective (a Δ from the evaluator) arrives only in a trial's final report."""

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        metrics = self.metric if isinstance(self.metric, list) else [self.metric]
        if all(m in result for m in metrics):
            super().on_trial_result(trial_id, result)


def _searcher(spec: SweepSpec, run: RunFolder, remaining: list[dict[str, Any]] | None):
    """OptunaSearch over the spec. `remaining`: the grid points still to run when resuming (None on a
    fresh run); the study (journal) is shared across resumes, so TPE keeps learning from every trial."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend
    from ray.tune.search import ConcurrencyLimiter

    journal = Path(run.path("optuna.journal")) if run.is_local else Path.home() / ".cache/dfc-ray/optuna" / \
        f"{redact(run.uri).replace('/', '_')}.journal"
    journal.parent.mkdir(parents=True, exist_ok=True)
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
    searcher = ObjectiveAtTheEnd(space=SpaceSampler(spec), metric=metric, mode=mode, sampler=sampler, storage=storage,
                            study_name=spec.name, points_to_evaluate=points, seed=0)
    return ConcurrencyLimiter(searcher, max_concurrent=_max_concurrent(spec))


def _close_interrupted_trials(storage, study_name: str) -> None:
    """Trials left RUNNING by a killed driver are marked FAIL, so the study's view is honest."""
    import optuna

    try:
        study_id = storage.get_study_id_from_name(study_name)
    except KeyError:
        return
    for trial in storage.get_all_trials(study_id, states=(optuna.trial.TrialState.RUNNING,)):
        storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)


def remaining_work(spec: SweepSpec, done: list[dict[str, Any]]) -> tuple[int, list[dict[str, Any]] | None]:
    """(trials still to run, grid points to enqueue) given the results.jsonl records already written.

    Every recorded trial counts as done, failed ones too (they have their status and reason).
    With a grid, each point is owed `num_samples` trials minus those recorded for it."""
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


def read_results(run: RunFolder) -> list[dict[str, Any]]:
    records = []
    for number, line in enumerate((run.read_text("results.jsonl") or "").splitlines(), 1):
        try:
            records += [json.loads(line)] if line.strip() else []
        except json.JSONDecodeError as err:
            raise ValueError(f"{redact(run.uri)}/results.jsonl: line {number}: not valid JSON ({err.msg} at "
                             f"column {err.colno}); expected one trial per line (remove that line to re-run "
                             "the trial)") from None
    return records


def _max_concurrent(spec: SweepSpec) -> int:
    """Trials at once: what the cluster's CPUs allow after Ray Data and the evaluators take theirs."""
    import ray

    if "max_concurrent" in spec.resources:
        return spec.resources["max_concurrent"]
    cpus = ray.cluster_resources().get("CPU", 1)
    reserved = spec.resources.get("data_cpus", 1 if spec.train["reader"] == "ray" else 0)
    reserved += spec.resources.get("evaluators", 1) * (0 if spec.resources.get("evaluator_gpu") else 1)
    return max(1, int((cpus - reserved) // spec.resources.get("cpu", 1)))


def check_fits(spec: SweepSpec, evaluate: bool = True) -> None:
    """One trial plus the judge pools (plus Ray Data's CPUs for `reader: ray`) must fit the cluster as
    it is now, else their actors would wait for resources forever (a local cluster cannot grow)."""
    import ray

    have = ray.cluster_resources()
    res = spec.resources
    pools = 2 * res.get("evaluators", 1) if evaluate else 0
    data = res.get("data_cpus", 1 if spec.train["reader"] == "ray" else 0)  # Ray Data's read tasks, outside trials
    needs = {"GPU": [("resources.gpu", res.get("gpu", 0), 1), ("resources.evaluator_gpu", res.get("evaluator_gpu", 0), pools)],
             "CPU": [("resources.cpu", res.get("cpu", 1), 1), ("resources.evaluator_cpu", res.get("evaluator_cpu", 1), pools),
                     ("resources.data_cpus", data, 1)]}
    for kind, items in needs.items():
        total = sum(amount * count for _, amount, count in items)
        if total > have.get(kind, 0) + 1e-9:
            detail = ", ".join(f"{name}={amount:g} × {count}" for name, amount, count in items if amount and count)
            raise ValueError(f"{spec.source}: {detail} needs {total:g} {kind}s for one trial and the judge pools, but this "
                             f"Ray cluster has {have.get(kind, 0):g}; expected at most that (0 GPUs runs on CPU)")


def _harvest(spec: SweepSpec, store_root: str):
    from dfc_ray.harvest import CorpusSpec, HarvestConfig, harvest

    fields = dict(spec.harvest)
    corpus = {k: fields.pop(k) for k in list(fields) if k in CorpusSpec.__dataclass_fields__}
    cfg = HarvestConfig(store=store_root, layers=spec.layers, pair=spec.pair, corpus=CorpusSpec(**corpus), **fields)
    return harvest(cfg, use_ray=True)


def run_sweep(spec: SweepSpec | None, run_uri: str, *, store_root: str | None = None, resume: bool = False,
              address: str | None = None, evaluate: bool = True, live: bool = True) -> RunFolder:
    """Run (or resume) a sweep into `run_uri`; returns the run folder once the report is written.
    A resume continues the run's spec.yaml: `spec` is None, or must be that same spec."""
    import ray

    from dfc_ray.cluster import connect

    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")  # training reports carry no Δ yet
    run = RunFolder(absolute(run_uri), create=not resume)  # trials run in their own working directories
    store_root = absolute(store_root or f"{run.uri.rsplit('/', 1)[0]}/harvests")
    existing = run.read_text("spec.yaml")
    if existing is not None and not resume:
        raise ValueError(f"{redact(run.uri)}: already holds a sweep; pass --resume to continue it "
                         "or choose another --run-dir")
    if resume and existing is None:
        raise ValueError(f"{redact(run.uri)}: nothing to resume (no spec.yaml)")
    if resume:
        saved = yaml.safe_load(existing)
        if spec is not None and yaml.safe_dump(spec.raw | {"name": spec.name}, sort_keys=False) != existing:
            raise ValueError(f"{spec.source}: not the spec of {redact(run.uri)}/spec.yaml ({saved.get('name')}); "
                             "resume without SPEC, or with the spec the run was started with")
        spec = parse_spec(saved, f"{redact(run.uri)}/spec.yaml", saved.get("name", ""))
    else:
        run.write_text("spec.yaml", yaml.safe_dump(spec.raw | {"name": spec.name}, sort_keys=False))
    done = read_results(run) if resume else None  # a damaged results.jsonl is refused before any work
    local = not (address or os.environ.get("RAY_ADDRESS"))
    started_ray = not ray.is_initialized()
    connect(address)
    try:
        return _run_on_cluster(spec, run, store_root, done, local, evaluate, live)
    finally:
        if local and started_ray:  # a cluster this run started ends with it (agents and workers too)
            ray.shutdown()


def _run_on_cluster(spec: SweepSpec, run: RunFolder, store_root: str, done: list[dict[str, Any]] | None, local: bool,
                    evaluate: bool, live: bool) -> RunFolder:
    """The sweep once its run folder is checked; `done`: the recorded trials of a resume, else None."""
    from ray import tune

    from dfc_ray.report import LiveView, write_report

    if local:  # a cluster we started cannot grow: refuse what would wait forever
        check_fits(spec, evaluate)
    clock = time.perf_counter()
    harvested = _harvest(spec, store_root)
    seconds = {"harvest": time.perf_counter() - clock}
    clock = time.perf_counter()
    pools = start_pools(spec) if evaluate else []
    seconds["start_pools"] = time.perf_counter() - clock
    ctx = TrialContext(spec.raw | {"name": spec.name}, spec.source, run.uri, harvested.uri, harvested.d_model,
                       harvested.models, tuple(pool.cfg for pool in pools) or None)
    resources = {"cpu": spec.resources.get("cpu", 1), "gpu": spec.resources.get("gpu", 0)}
    trainable = tune.with_resources(tune.with_parameters(run_trial, ctx=ctx), resources)
    from rich.console import Console

    view = LiveView(total=spec.n_trials, console=None if live else Console(quiet=True),
                    axes=[a.name for a in spec.grid] + [d.name for d in spec.search],
                    title=f"{spec.name}: {spec.n_trials} trials")
    LIVE_VIEWS[run.uri] = view
    callbacks = [ResultsWriter(spec, run.uri)]
    # Resume: results.jsonl is the truth. A fresh Tune experiment runs only what is still owed, so no
    # finished trial is redone and none is lost (Tune's own restore can re-run a trial that finished
    # after its last experiment checkpoint, and then collides with the Optuna study).
    n_todo, remaining = remaining_work(spec, done) if done is not None else (spec.n_trials, None)
    for record in done or []:
        view.update(record["trial_id"], record["config"], record["status"], record["metrics"])
    attempt = len(list(Path(run.path("tune")).glob("trials-*"))) if run.is_local else time.strftime("%Y%m%d-%H%M%S")
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=_searcher(spec, run, remaining), scheduler=_scheduler(spec),
                                    num_samples=n_todo, reuse_actors=True),  # no torch import per trial
        run_config=tune.RunConfig(
            name=f"trials-{attempt}", storage_path=run.path("tune"), callbacks=callbacks, verbose=0,
            storage_filesystem=None if run.is_local else run.fs,  # on S3: our client, with its timeouts
            failure_config=tune.FailureConfig(max_failures=spec.resources.get("max_failures", 1)),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1)))
    clock = time.perf_counter()
    try:
        with view:
            if n_todo:
                tuner.fit()
        seconds["trials"] = time.perf_counter() - clock
        judge_memory = _judge_memory(pools)
    finally:
        LIVE_VIEWS.pop(run.uri, None)
        for pool in pools:
            pool.shutdown()
    info = {"spec": spec.name, "spec_file": spec.source, "run": redact(run.uri), "harvest": redact(harvested.uri),
            "harvest_rows": harvested.rows, "harvest_reused": harvested.reused, "layers": list(spec.layers),
            "pair": asdict(spec.pair), **_attempt_seconds(run, seconds),
            "judge_peak_mem_mb": {k: round(v) for k, v in judge_memory.items()}}
    _write_costs(spec, run, seconds, harvested.reused)
    if run.is_local:
        write_report(run.root, run_info=info)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            write_report(run.uri, run_info=info, out_dir=tmp)
            run.upload_dir(Path(tmp))
            if (Path(tmp) / "plots").is_dir():
                run.upload_dir(Path(tmp) / "plots", "plots")
    return run


def _attempt_seconds(run: RunFolder, seconds: dict[str, float]) -> dict[str, Any]:
    """report.json's `seconds` summed over every finished attempt (a resume adds to, never replaces,
    the earlier ones) and `attempts`: each attempt's own stage seconds."""
    try:
        earlier = json.loads(run.read_text("report.json") or "{}").get("run", {})
    except json.JSONDecodeError:
        earlier = {}
    attempts = earlier.get("attempts", [earlier["seconds"]] if "seconds" in earlier else [])
    attempts = attempts + [{k: round(v, 1) for k, v in seconds.items()}]
    total = {k: round(sum(a.get(k, 0) for a in attempts), 1) for a in attempts for k in a}
    return {"seconds": total, "attempts": attempts}


def _judge_memory(pools: list) -> dict[str, float]:
    """Peak memory (MB) of each judge pool's largest replica; a replica that cannot answer is skipped."""
    import ray

    peaks: dict[str, float] = {}
    for pool in pools:
        for handle in pool.handles:
            try:
                peak = ray.get(handle.stats.remote(), timeout=60)["peak_mem_mb"]
            except Exception:  # a report is worth more than one replica's memory figure
                continue
            peaks[pool.cfg.name] = max(peaks.get(pool.cfg.name, 0.0), peak)
    return peaks


def _write_costs(spec: SweepSpec, run: RunFolder, seconds: dict[str, float], reused_harvest: bool) -> None:
    """costs.json: this run's measured FLOP/s per stage, for `dfc-ray sweep --plan --costs RUN`."""
    from dfc_ray.plan import device_name, measure_rates

    try:
        rates = measure_rates(spec, read_results(run), seconds, reused_harvest, device_name())
    except Exception as err:  # a plan-only aid: never fail a finished sweep over it
        print(f"costs.json not written: {type(err).__name__}: {err}")
        return
    if rates.harvest is None and (earlier := run.read_text("costs.json")):  # a resume re-uses the harvest
        rates.harvest = json.loads(earlier).get("harvest")  # the first attempt measured
    run.write_text("costs.json", json.dumps(asdict(rates), indent=1) + "\n")


def _scheduler(spec: SweepSpec):
    if spec.scheduler is None:
        return None
    from ray.tune.schedulers import ASHAScheduler

    asha = dict(spec.scheduler)
    return ASHAScheduler(metric=asha.pop("metric", "fvu"), mode=asha.pop("mode", "min"),
                         time_attr="training_iteration", max_t=asha.pop("max_t", TRAIN_REPORTS + 1), **asha)


# ---------------------------------------------------------------- results.jsonl and the live view

LIVE_VIEWS: dict[str, Any] = {}
"""Run URI → its LiveView. Tune pickles callbacks into its resume state and a view cannot be
pickled, so the callback finds the current process's view here."""


class ResultsWriter(Callback):
    """One results.jsonl line per finished trial (never twice, also across resumes), and
    live-view updates as results arrive."""

    def __init__(self, spec: SweepSpec, run_uri: str) -> None:
        self.spec, self.run_uri = spec, run_uri

    def config(self, params: dict[str, Any]) -> dict[str, Any]:
        """The trial's full settings (fixed + grid + sampled) with its grid labels."""
        return params | self.spec.trial_settings(params)

    def show(self, trial, status: str, metrics: dict[str, Any]) -> None:
        if (view := LIVE_VIEWS.get(self.run_uri)) is not None:
            view.update(trial.trial_id, self.config(trial.config), status, metrics)

    def append(self, trial, status: str, metrics: dict[str, Any], error: str = "", details: dict | None = None) -> None:
        run = RunFolder(self.run_uri)
        lines = [line for line in (run.read_text("results.jsonl") or "").splitlines() if line.strip()]
        if any(json.loads(line)["trial_id"] == trial.trial_id for line in lines):
            return
        metrics = {k: json.loads(v) if k in STRUCTURED and isinstance(v, str) else v for k, v in metrics.items()
                   if isinstance(v, (int, float, str, bool, list, dict))}
        record = {"trial_id": trial.trial_id, "config": self.config(trial.config), "metrics": metrics,
                  "status": status} | ({"error": error} if error else {}) | (details or {})
        run.write_text("results.jsonl", "\n".join(lines + [json.dumps(record)]) + "\n")
        self.show(trial, status, metrics)

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self.show(trial, "running", {})

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        self.show(trial, "running", result)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        result = dict(trial.last_result or {})
        status = result.get("status") or "failed"
        self.append(trial, status, result, error="" if status == "ok" else result.get("reason", "no result"))

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        error = trial_error(trial)  # Tune 2.60 keeps the reason only in the trial's error file
        pointer = f"errors/{trial.trial_id}.txt"
        RunFolder(self.run_uri).write_text(pointer, error.traceback or "no traceback was saved\n")
        self.append(trial, "failed", dict(trial.last_result or {}),
                    error=f"{error.type}: {error.message} (traceback: {redact(self.run_uri)}/{pointer})",
                    details={"error_type": error.type, "error_file": f"{redact(self.run_uri)}/{pointer}"})


# ---------------------------------------------------------------- CLI


def _sweep_command(args: argparse.Namespace) -> int:
    from rich.console import Console

    if args.resume and not args.run_dir:
        raise ValueError("--resume needs --run-dir (the run folder to continue)")
    # --resume without SPEC continues the run's own spec.yaml; with one, it must be that spec
    spec = None if args.resume and args.spec is None and not args.plan else load_spec(args.spec or DEFAULT_SPEC)
    if args.plan:
        from dfc_ray.plan import load_rates, print_plan

        print_plan(spec, load_rates(args.costs) if args.costs else None)
        return 0
    run_uri = args.run_dir or f"{args.storage.rstrip('/')}/{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    start = time.time()
    run = run_sweep(spec, run_uri, store_root=args.store, resume=args.resume, address=args.address,
                    evaluate=not args.no_eval, live=not args.quiet)
    Console().print(f"sweep finished in {time.time() - start:.0f} s: {redact(run.uri)}")
    from dfc_ray.report import print_report

    report = json.loads(run.read_text("report.json") or "{}")
    if report:
        print_report(report, Console())
    statuses = [record["status"] for record in read_results(run)]
    if code := sweep_exit_code(statuses):
        Console().print(f"[bold red]{len(statuses) - statuses.count('ok')} of {len(statuses)} trials failed[/] "
                        f"(exit code {code}; reasons in results.jsonl and the report's Failed trials)")
    return code


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("sweep", help="Run a sweep spec end to end: harvest, Tune trials, report.")
    p.add_argument("spec", nargs="?", default=None,
                   help=f"shipped spec name or YAML path (default: {DEFAULT_SPEC}; with --resume: the run's own)")
    p.add_argument("--storage", default="runs", help="where run folders go: a path or s3://bucket/prefix")
    p.add_argument("--run-dir", default=None, help="this run's folder (default: <storage>/<spec>-<time>)")
    p.add_argument("--store", default=None, help="activation store root (default: <storage>/harvests)")
    p.add_argument("--resume", action="store_true", help="continue the sweep in --run-dir")
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or a new local one)")
    p.add_argument("--no-eval", action="store_true", help="train only: skip evaluation and steering")
    p.add_argument("--quiet", action="store_true", help="no live table")
    p.add_argument("--plan", action="store_true",
                   help="run nothing: print the sweep's work (rows, bytes, FLOPs per stage, actors, memory) and cost")
    p.add_argument("--costs", default=None, metavar="RUN_OR_JSON",
                   help="with --plan: measured rates from a finished run folder (its costs.json) or a costs JSON")
    p.set_defaults(func=_sweep_command)
