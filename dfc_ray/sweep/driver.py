"""The sweep driver: a spec → harvest (or reuse) → judge pools → Ray Tune trials → costs.json → report.

`run_sweep` runs these steps in order; each is a function below.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import ray
import yaml
from ray import tune
from rich.console import Console

from actors.evaluator import EvaluatorActor
from actors.pool import ReplicaPool
from actors.steering import SteeringActor
from dfc_ray.cluster import connect
from dfc_ray.config import PoolConfig
from dfc_ray.fs import RunFolder, absolute, redact
from dfc_ray.harvest import harvest
from dfc_ray.plan import device_name, measure_rates
from dfc_ray.placement import check_placeable, custom_requests
from dfc_ray.report import LiveView, write_report
from dfc_ray.spaces import SweepSpec, check_against_pair, parse_spec
from dfc_ray.sweep.results import LIVE_VIEWS, ResultsWriter, read_results, set_aside_lost
from dfc_ray.sweep.search import remaining_work, scheduler, searcher
from dfc_ray.sweep.trial import TrialContext, run_trial
from dfc_ray.tune_storage import JournalUploader, local_journal, tune_storage


def start_pools(spec: SweepSpec) -> list:
    """One evaluator and one steering pool per sweep, named after it, loaded once for all trials.
    The driver must hold the returned pools: replicas live as long as a handle does."""
    gpus = spec.resources.evaluator_gpu
    cpus = spec.resources.evaluator_cpu
    replicas = spec.resources.evaluators
    custom = tuple(custom_requests(spec).get("judge", {}).items())
    configs = (PoolConfig(f"{spec.name}-evaluator", replicas=replicas, num_cpus=cpus, num_gpus=gpus, resources=custom),
               PoolConfig(f"{spec.name}-steering", replicas=replicas, num_cpus=cpus, num_gpus=gpus, resources=custom))
    return [ReplicaPool.create(EvaluatorActor, configs[0], spec.pair, spec.eval),
            ReplicaPool.create(SteeringActor, configs[1], spec.pair, spec.steering)]


def check_fits(spec: SweepSpec, evaluate: bool = True) -> None:
    """One trial plus the judge pools (plus Ray Data's CPUs for `reader: ray`) must fit the cluster as
    it is now, else their actors would wait for resources forever (a local cluster cannot grow)."""
    have = ray.cluster_resources()
    res = spec.resources
    pools = 2 * res.evaluators if evaluate else 0
    data = res.reserved_data_cpus(spec.train["reader"])  # Ray Data's read tasks, outside trials
    needs = {"GPU": [("resources.gpu", res.gpu, 1), ("resources.evaluator_gpu", res.evaluator_gpu, pools)],
             "CPU": [("resources.cpu", res.cpu, 1), ("resources.evaluator_cpu", res.evaluator_cpu, pools),
                     ("resources.data_cpus", data, 1)]}
    for kind, items in needs.items():
        total = sum(amount * count for _, amount, count in items)
        if total > have.get(kind, 0) + 1e-9:
            detail = ", ".join(f"{name}={amount:g} × {count}" for name, amount, count in items if amount and count)
            raise ValueError(f"{spec.source}: {detail} needs {total:g} {kind}s for one trial and the judge pools, "
                             f"but this Ray cluster has {have.get(kind, 0):g}; "
                             "expected at most that (0 GPUs runs on CPU)")


def _open_run(spec: SweepSpec | None, run_uri: str, resume: bool) -> tuple[RunFolder, SweepSpec]:
    """The run folder, with spec.yaml written (fresh run) or read back (resume: the spec as first run;
    `spec` is None or must be that same spec)."""
    run = RunFolder(absolute(run_uri), create=not resume)  # trials run in their own working directories
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
    elif spec is not None:
        run.write_text("spec.yaml", yaml.safe_dump(spec.raw | {"name": spec.name}, sort_keys=False))
    return run, spec


def _harvest(spec: SweepSpec, store_root: str) -> dict[str, Any]:
    """Positions → its harvest, one per distinct `positions` the trials train on (a repeat of an
    earlier harvest is found by its content hash and re-used)."""
    resources = custom_requests(spec).get("harvest", {})
    return {positions: harvest(replace(spec.harvest, store=store_root, positions=positions, resources=resources),
                               use_ray=True)
            for positions in spec.positions_values()}


def _tuner(spec: SweepSpec, run: RunFolder, ctx: TrialContext, n_todo: int,
           remaining: list[dict[str, Any]] | None) -> tune.Tuner:
    """A fresh Tune experiment (tune/trials-N) that runs the `n_todo` trials still owed."""
    resources = {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu} | custom_requests(spec).get("trial", {})
    trainable = tune.with_resources(tune.with_parameters(run_trial, ctx=ctx), resources)
    attempt = len(list(Path(run.path("tune")).glob("trials-*"))) if run.is_local else time.strftime("%Y%m%d-%H%M%S")
    tune_root, tune_fs = tune_storage(f"{run.uri}/tune")
    journal = local_journal(run)
    uploader = None if run.is_local else JournalUploader(run.uri, journal)
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=searcher(spec, journal, remaining, uploader), scheduler=scheduler(spec),
                                    num_samples=n_todo, reuse_actors=True),  # no torch import per trial
        run_config=tune.RunConfig(
            name=f"trials-{attempt}", storage_path=tune_root, storage_filesystem=tune_fs,
            callbacks=[ResultsWriter(spec, run.uri)],
            verbose=0,
            failure_config=tune.FailureConfig(max_failures=spec.resources.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1)))


def _run_trials(spec: SweepSpec, run: RunFolder, ctx: TrialContext, done: list[dict[str, Any]] | None,
                live: bool, pools: list, seconds: dict[str, float]) -> dict[str, Any]:
    """Run the trials still owed under the live view; returns the judge pools' figures (`_judge_info`).
    The pools are shut down when this returns, also on failure.

    Resume: results.jsonl is the truth. A fresh Tune experiment runs only what is still owed, so no
    finished trial is redone and none is lost (Tune's own restore can re-run a trial that finished
    after its last experiment checkpoint, and then collides with the Optuna study).
    Lost trials: Tune retries a trial whose actor died (FailureConfig), but gives it up when a second
    failure event arrives while it restarts (a lost node sends several). So once an experiment ends,
    trials the cluster lost (`lost_to_infrastructure`) are set aside (results.jsonl → retried.jsonl)
    and their grid points run again in a further experiment, at most `max_failures` times."""
    view = LiveView(total=spec.n_trials, console=None if live else Console(quiet=True),
                    axes=[a.name for a in spec.grid] + [d.name for d in spec.search],
                    title=f"{spec.name}: {spec.n_trials} trials")
    LIVE_VIEWS[run.uri] = view
    for record in done or []:
        view.update(record["trial_id"], record["config"], record["status"], record["metrics"])
    clock = time.perf_counter()
    try:
        with view:
            for round_ in range(spec.resources.max_failures + 1):
                if round_ == 0 and done is None:  # a fresh run: the whole grid
                    n_todo, remaining = spec.n_trials, None
                else:
                    lost = set_aside_lost(run)
                    if round_ and not lost:
                        break
                    for record in lost:  # its retry takes its place in the view
                        view.trials.pop(record["trial_id"], None)
                    if lost:
                        kinds = ", ".join(sorted({record.get("error_type", "?") for record in lost}))
                        print(f"{len(lost)} trial(s) lost to the cluster ({kinds}): running them again "
                              f"(round {round_} of at most {spec.resources.max_failures})", flush=True)
                    n_todo, remaining = remaining_work(spec, read_results(run))
                if n_todo:
                    _tuner(spec, run, ctx, n_todo, remaining).fit()
        seconds["trials"] = time.perf_counter() - clock
        return _judge_info(pools)
    finally:
        LIVE_VIEWS.pop(run.uri, None)
        for pool in pools:
            pool.shutdown()


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


def _judge_info(pools: list) -> dict[str, Any]:
    """report.json's judge figures: peak memory (MB) of each pool's largest replica (a replica that cannot
    answer is skipped) and how often Ray restarted each pool's replicas."""
    peaks: dict[str, float] = {}
    for pool in pools:
        for handle in pool.handles:
            try:
                peak = ray.get(handle.stats.remote(), timeout=60)["peak_mem_mb"]
            except Exception:  # a report is worth more than one replica's memory figure
                continue
            peaks[pool.cfg.name] = max(peaks.get(pool.cfg.name, 0.0), peak)
    return {"judge_peak_mem_mb": {k: round(v) for k, v in peaks.items()},
            "judge_restarts": {pool.cfg.name: pool.restarts() for pool in pools}}


def _write_costs(spec: SweepSpec, run: RunFolder, seconds: dict[str, float], reused_harvest: bool) -> None:
    """costs.json: this run's measured FLOP/s per stage, for `dfc-ray sweep --plan --costs RUN`."""
    try:
        rates = measure_rates(spec, read_results(run), seconds, reused_harvest, device_name())
    except Exception as err:  # a plan-only aid: never fail a finished sweep over it
        print(f"costs.json not written: {type(err).__name__}: {err}")
        return
    if rates.harvest is None and (earlier := run.read_text("costs.json")):  # a resume re-uses the harvest
        rates.harvest = json.loads(earlier).get("harvest")  # the first attempt measured
    run.write_text("costs.json", json.dumps(asdict(rates), indent=1) + "\n")


def _publish_report(run: RunFolder, info: dict[str, Any]) -> None:
    """report.json, report.md and plots/ into the run folder (through a local folder for s3://)."""
    if run.is_local:
        write_report(run.root, run_info=info)
        return
    with tempfile.TemporaryDirectory() as tmp:
        write_report(run.uri, run_info=info, out_dir=tmp)
        run.upload_dir(Path(tmp))
        if (Path(tmp) / "plots").is_dir():
            run.upload_dir(Path(tmp) / "plots", "plots")


def run_sweep(spec: SweepSpec | None, run_uri: str, *, store_root: str | None = None, resume: bool = False,
              address: str | None = None, evaluate: bool = True, live: bool = True) -> RunFolder:
    """Run (or resume) a sweep into `run_uri`; returns the run folder once the report is written.
    A resume continues the run's spec.yaml: `spec` is None, or must be that same spec."""
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")  # training reports carry no Δ yet
    if spec is not None:  # before the run folder or Ray: a spec the pair or the data refuse costs nothing
        check_against_pair(spec)
    run, spec = _open_run(spec, run_uri, resume)
    done = read_results(run) if resume else None  # a damaged results.jsonl is refused before any work
    store_root = absolute(store_root or f"{run.uri.rsplit('/', 1)[0]}/harvests")
    local = not (address or os.environ.get("RAY_ADDRESS"))
    started_ray = not ray.is_initialized()
    connect(address)
    try:
        return _run_on_cluster(spec, run, store_root, done, local, evaluate, live)
    finally:
        if local and started_ray:  # a cluster this run started ends with it (agents and workers too)
            ray.shutdown()


def _run_on_cluster(spec: SweepSpec, run: RunFolder, store_root: str, done: list[dict[str, Any]] | None,
                    local: bool, evaluate: bool, live: bool) -> RunFolder:
    """The sweep once its run folder is checked and Ray is up; `done`: a resume's recorded trials."""
    if local:  # a cluster we started cannot grow: refuse what would wait forever
        check_fits(spec, evaluate)
    check_placeable(spec, evaluate)  # some node (or node type) must hold each kind of actor
    clock = time.perf_counter()
    harvests = _harvest(spec, store_root)
    harvested = next(iter(harvests.values()))  # d_model and models are the pair's, the same in every store
    reused = all(h.reused for h in harvests.values())
    seconds = {"harvest": time.perf_counter() - clock}
    clock = time.perf_counter()
    pools = start_pools(spec) if evaluate else []
    seconds["start_pools"] = time.perf_counter() - clock
    ctx = TrialContext(spec.raw | {"name": spec.name}, spec.source, run.uri,
                       {positions: h.uri for positions, h in harvests.items()}, harvested.d_model,
                       harvested.models, tuple(pool.cfg for pool in pools) or None)
    judges = _run_trials(spec, run, ctx, done, live, pools, seconds)
    info = {"spec": spec.name, "spec_file": spec.source, "run": redact(run.uri), "harvest": redact(harvested.uri),
            "harvest_rows": harvested.rows, "harvest_reused": reused,
            "harvest_nodes": sorted({node for h in harvests.values() for node in h.nodes}), "layers": list(spec.layers),
            **({"harvests": {positions: {"uri": redact(h.uri), "rows": h.rows, "reused": h.reused}
                             for positions, h in harvests.items()}} if len(harvests) > 1 else {}),
            "pair": asdict(spec.pair), "protocol": spec.eval.protocol.label(), **_attempt_seconds(run, seconds),
            **judges}
    _write_costs(spec, run, seconds, reused)
    _publish_report(run, info)
    return run
