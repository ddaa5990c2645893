"""The sweep driver: a spec → harvest (or reuse) → judge pools → Ray Tune trials → costs.json → report.

`run_sweep` runs these steps in order; each is a function below. A run folder has one driver at a time
(`dfc_ray.sweep.lease.RunLease`) and an identity (run.json's `run_id`) that names its judge pools, so sweeps
sharing a cluster, or a spec name, never share judges.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import ray
import torch
import yaml
from ray import tune
from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
from rich.console import Console

from actors.evaluator import EvaluatorActor
from actors.pool import ReplicaPool
from actors.steering import SteeringActor
from dfc_ray.cluster import check_address, cluster_identity, connect, job_ended
from dfc_ray.config import MAX_NAME_LENGTH, PoolConfig, check_name
from dfc_ray.failures import lost_to_infrastructure
from dfc_ray.fs import RunFolder, absolute, redact
from dfc_ray.harvest import harvest
from dfc_ray.pair import pair_fingerprint
from dfc_ray.plan import device_name, measure_rates
from dfc_ray.placement import check_placeable, custom_requests
from dfc_ray.report import LiveView, write_report
from dfc_ray.spaces import SweepSpec, check_against_pair, check_trial_memory, parse_spec
from dfc_ray.sweep.results import (INTERRUPTED, LIVE_VIEWS, ResultsWriter, TensorBoardWriter, read_results,
                                   recorded_ids, set_aside_lost, spec_hash)
from dfc_ray.sweep.lease import LeaseHolder, RunLease
from dfc_ray.sweep.search import remaining_work, scheduler, searcher
from dfc_ray.sweep.trial import TrialContext, dfc_trial_id, run_trial
from dfc_ray.tune_storage import JournalUploader, local_journal, tune_storage
from dfc_ray.yamlio import parse_yaml


RUN_ID_LENGTH = MAX_NAME_LENGTH + 9
"""A run id's longest: the spec's name, '-' and 8 hex digits."""


def start_pools(spec: SweepSpec, run_id: str, lease_token: str = "") -> list:
    """One evaluator and one steering pool per run, named after the run's id (run.json), loaded once for all
    trials, never found by another sweep of the same spec. Their namespace carries the driver's lease token:
    a driver that took the run over from a stalled one starts its own judges, which the stalled driver can
    neither use nor end (its own die with it). The driver must hold the returned pools: replicas live as
    long as a handle does."""
    gpus = spec.resources.evaluator_gpu
    cpus = spec.resources.evaluator_cpu
    replicas = spec.resources.evaluators
    custom = tuple(custom_requests(spec).get("judge", {}).items())
    namespace = f"dfc-ray-{lease_token[:12]}" if lease_token else PoolConfig.namespace
    configs = [PoolConfig(check_name(f"{run_id}-{role}", "judge pool name", RUN_ID_LENGTH + 10), namespace=namespace,
                          replicas=replicas, num_cpus=cpus, num_gpus=gpus, resources=custom)
               for role in ("evaluator", "steering")]
    return [ReplicaPool.create(EvaluatorActor, configs[0], spec.pair, spec.eval),
            ReplicaPool.create(SteeringActor, configs[1], spec.pair, spec.steering)]


def check_fits(spec: SweepSpec, evaluate: bool = True) -> None:
    """One trial plus the judge pools (plus Ray Data's CPUs for `reader: ray`) must fit the cluster as
    it is now, else their actors would wait for resources forever (a local cluster cannot grow)."""
    have = ray.cluster_resources()
    res = spec.resources
    pools = res.judge_replicas() if evaluate else 0
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


DRIVER_LOG = "driver.log"
"""What Ray and the libraries print to the driver's stderr while the live view draws (core worker lines,
deprecation warnings, Ray Data's notices): kept in the run folder instead of torn through the view."""


@contextlib.contextmanager
def stderr_to_log(run: RunFolder, on: bool):
    """While `on`, this process's stderr (file descriptor 2, which Ray's C++ core worker writes to directly, and
    Python's warnings and log handlers through it) is appended to `<run>/driver.log` (through a local file for
    s3://); the terminal gets it back afterwards, so a one-line error still reaches the user."""
    if not on:
        yield
        return
    local = Path(run.path(DRIVER_LOG)) if run.is_local else Path(tempfile.mkdtemp(prefix="dfc-driver-")) / DRIVER_LOG
    print(f"Ray's own messages: {redact(run.uri)}/{DRIVER_LOG}", flush=True)
    sys.stderr.flush()
    saved, python_stderr = os.dup(2), sys.stderr
    log = open(local, "a", buffering=1)  # line-buffered: the log keeps up with a sweep that is still running
    os.dup2(log.fileno(), 2)
    sys.stderr = log  # also where sys.stderr is not file descriptor 2 (a wrapped or captured stream)
    try:
        yield
    finally:
        log.flush()
        sys.stderr = python_stderr
        os.dup2(saved, 2)
        os.close(saved)
        log.close()
        if not run.is_local:
            run.write_text(DRIVER_LOG, local.read_bytes())
            shutil.rmtree(local.parent, ignore_errors=True)


def check_devices(spec: SweepSpec, gpus: float, where: str) -> None:
    """Refuse, in one line, a CUDA device the spec names (pair.device for the judges and the harvest,
    train.device for trials) when the cluster (`where`) has no GPU: each trial would fail on torch's
    RuntimeError, each judge replica die in a traceback."""
    named = [("pair.device", spec.pair.device)] + \
        [("train.device", device) for device in dict.fromkeys(settings.get("device", "auto")
                                                             for _, settings in spec.corner_trials())]
    for field, device in named:
        if device.startswith("cuda") and gpus <= 0:
            raise ValueError(f"{spec.source}: field {field} = {device!r}: {where} has no GPU; expected 'cpu' or "
                             "'auto' (CUDA where there is one), or a cluster with GPUs")


RUN_RECORD = "run.json"
"""The run's identity and the spec it started with: `run_id` (`<spec name>-<8 hex>`, unique per sweep and
kept across resumes; the judge pools are named after it), `run_dir` (the folder it was made for: a copy
gets a new run id, `_placed`), `created`, `spec` (the merged spec as first written) and `spec_changes` (edits
of spec.yaml a resume accepted with --accept-spec-changes)."""


class NothingToResume(Exception):
    """`--resume` on a run whose trials are all recorded and whose report covers them: nothing to run."""

    def __init__(self, run: RunFolder, message: str):
        super().__init__(message)
        self.run = run


def resume_line(spec: SweepSpec, run: RunFolder, done: list[dict[str, Any]]) -> tuple[str, int]:
    """What a resume finds: `RUN: 3 of 4 trials done (3 ok), running 1` and how many trials it runs."""
    kept = [record for record in done if not lost_to_infrastructure(record)]
    ok = sum(record["status"] == "ok" for record in kept)
    n_todo = remaining_work(spec, done)[0]
    lost = len(done) - len(kept)
    detail = f"{ok} ok" + (f", {len(kept) - ok} failed" if len(kept) > ok else "")
    again = f" ({lost} lost to the cluster, run again)" if lost else ""
    return f"{redact(run.uri)}: {len(kept)} of {spec.n_trials} trials done ({detail}), running {n_todo}{again}", n_todo


def _finished(spec: SweepSpec, run: RunFolder, done: list[dict[str, Any]]) -> str | None:
    """Why a resume has nothing to do (every trial recorded and report.json counts them all), else None."""
    n_todo = remaining_work(spec, done)[0]
    try:
        reported = json.loads(run.read_text("report.json") or "{}").get("n_trials")
    except json.JSONDecodeError:
        reported = None
    if n_todo or reported != len(done):
        return None
    ok = sum(record["status"] == "ok" for record in done)
    return (f"{redact(run.uri)}: finished, all {len(done)} trials done ({ok} ok): nothing to resume; "
            f"report: {redact(run.uri)}/report.md")


class SweepInterrupted(Exception):
    """Ctrl-C (SIGINT) stopped the trials; the report was written with `unfinished` in its run block."""

    def __init__(self, run: RunFolder, unfinished: dict[str, Any]):
        super().__init__(f"{redact(run.uri)}: interrupted")
        self.run, self.unfinished = run, unfinished


def spec_changes(before: Any, after: Any, path: str = "") -> list[str]:
    """`field old → new` for every field that differs between two specs (nested sections as dotted paths)."""
    if isinstance(before, dict) and isinstance(after, dict):
        return [change for key in dict.fromkeys([*before, *after])
                for change in spec_changes(before.get(key), after.get(key), f"{path}.{key}" if path else str(key))]
    return [] if before == after else [f"{path} {before!r} → {after!r}"]


def _new_record(spec_dump: dict[str, Any]) -> dict[str, Any]:
    return {"run_id": check_name(f"{spec_dump.get('name')}-{uuid.uuid4().hex[:8]}", "run id", RUN_ID_LENGTH),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "spec": spec_dump}


def _read_record(run: RunFolder, saved: dict[str, Any]) -> dict[str, Any]:
    """run.json as written, its run_id checked (it names actors); a run from before run.json gets a new one."""
    text = run.read_text(RUN_RECORD)
    if text is None:
        return _new_record(saved)
    where = f"{redact(run.uri)}/{RUN_RECORD}"
    try:
        record = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: not valid JSON ({err.msg}); expected the run record the sweep writes") from None
    if not isinstance(record, dict) or not isinstance(record.get("spec"), dict):
        raise ValueError(f"{where}: expected an object with run_id and spec, as the sweep writes it")
    check_name(record.get("run_id"), f"{where}: run_id", RUN_ID_LENGTH)
    return record


def _placed(run: RunFolder, record: dict[str, Any]) -> dict[str, Any]:
    """The record with this folder as its `run_dir`. A run.json made for another folder (a `cp -a` of a running
    run, then resumed) gets a new run id, recorded with `copied_from`: two runs never share one id."""
    here, made_for = redact(run.uri), record.get("run_dir")
    if made_for in (None, here):
        return record | {"run_dir": here}
    run_id = _new_record(record["spec"])["run_id"]
    print(f"{here}/{RUN_RECORD}: made for {made_for}; this folder is a copy of that run, so it resumes as run "
          f"{run_id} (recorded in {RUN_RECORD})", flush=True)
    return record | {"run_id": run_id, "run_dir": here,
                     "copied_from": [*record.get("copied_from", []), {"run_id": record["run_id"], "run_dir": made_for}]}


def _open_run(spec: SweepSpec | None, run_uri: str, resume: bool,
              accept_spec_changes: bool = False) -> tuple[RunFolder, SweepSpec, dict[str, Any]]:
    """The run folder, its spec and its run record (run.json), read and checked; nothing is written yet (the
    lease comes first). A fresh run: `spec`. A resume: the run's spec.yaml (`spec` is None or must be that
    same spec), refused when it was edited since the run started unless `accept_spec_changes`."""
    run = RunFolder(absolute(run_uri), create=not resume)  # trials run in their own working directories
    existing = run.read_text("spec.yaml")
    if existing is not None and not resume:
        raise ValueError(f"{redact(run.uri)}: already holds a sweep; pass --resume to continue it "
                         "or choose another --run-dir")
    if resume and existing is None:
        raise ValueError(f"{redact(run.uri)}: nothing to resume (no spec.yaml)")
    if not resume:
        assert spec is not None
        return run, spec, _placed(run, _new_record(spec.raw | {"name": spec.name}))
    where = f"{redact(run.uri)}/spec.yaml"
    saved = parse_yaml(existing, where)
    if not isinstance(saved, dict):
        raise ValueError(f"{where}: expected the run's spec (a mapping), got {type(saved).__name__}")
    if spec is not None and yaml.safe_dump(spec.raw | {"name": spec.name}, sort_keys=False) != existing:
        raise ValueError(f"{spec.source}: not the spec of {where} ({saved.get('name')}); "
                         "resume without SPEC, or with the spec the run was started with")
    record = _read_record(run, saved)
    if run.read_text(RUN_RECORD) is None:  # a run from before run.json: its results say what spec they ran under
        record = _without_run_record(run, saved, record, accept_spec_changes)
    record = _placed(run, record)
    if changes := spec_changes(record["spec"], saved):
        listed = "; ".join(changes[:4]) + (f"; and {len(changes) - 4} more" if len(changes) > 4 else "")
        if not accept_spec_changes:
            raise ValueError(f"{where}: changed since the run started ({listed}); expected the spec its first trials "
                             "ran with: restore it, or pass --accept-spec-changes to resume under the edited one")
        record = record | {"spec": saved, "spec_changes": [*record.get("spec_changes", []),
                                                           {"at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                                            "changes": changes}]}
        print(f"{where}: resuming under the edited spec ({listed}); recorded in {RUN_RECORD} and the report")
    return run, parse_spec(saved, where, saved.get("name", "")), record


def _without_run_record(run: RunFolder, saved: dict[str, Any], record: dict[str, Any],
                        accept_spec_changes: bool) -> dict[str, Any]:
    """A resume of a run folder that has no run.json: its recorded trials must carry the `spec_hash` of spec.yaml
    as it is now, else spec.yaml may have been edited since they ran and is refused unless
    `accept_spec_changes` (then the unknown start is recorded as a spec change)."""
    where = f"{redact(run.uri)}/spec.yaml"
    current = spec_hash(saved)
    records = read_results(run)
    other = [r["trial_id"] for r in records if r.get("spec_hash") != current]
    if not other:
        return record
    why = f"{len(other)} of its {len(records)} recorded trials " + \
        ("carry no spec hash" if all("spec_hash" not in r for r in records) else "ran under another spec")
    if not accept_spec_changes:
        raise ValueError(f"{where}: no {RUN_RECORD} beside it, and {why} (e.g. {other[0]}), so it may have been "
                         "edited since they ran; expected run.json as the sweep writes it, or pass "
                         "--accept-spec-changes to resume under spec.yaml as it is")
    print(f"{where}: resuming without {RUN_RECORD} ({why}); recorded in {RUN_RECORD} and the report")
    return record | {"spec_changes": [{"at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                       "changes": [f"unknown: no {RUN_RECORD}, and {why}"]}]}


def _record_run(run: RunFolder, record: dict[str, Any], fresh: bool) -> None:
    """Write run.json (and a fresh run's spec.yaml): once the lease is held, before any other write."""
    if fresh:  # results.jsonl from the start: a report (Ctrl-C before any trial ends) always has its file
        run.write_text("spec.yaml", yaml.safe_dump(record["spec"], sort_keys=False))
        run.write_text("results.jsonl", "")
    run.write_text(RUN_RECORD, json.dumps(record, indent=1) + "\n")


def _holder_gone(held: LeaseHolder, address: str | None) -> str | None:
    """Why a lease holder whose heartbeat is still fresh has ended anyway: its Ray job has ended on the cluster
    this sweep joins (a stopped job, or a job Ray retries). None when that cannot be told (no cluster to ask,
    or another cluster): then only the heartbeat's age decides."""
    if not (address and held.job_id and held.cluster_id):
        return None
    connect(address)
    if cluster_identity()[1] != held.cluster_id or not job_ended(held.job_id):
        return None
    return f"its Ray job {held.job_id} has ended"


def _harvest(spec: SweepSpec, store_root: str) -> dict[str, Any]:
    """Positions → its harvest, one per distinct `positions` the trials train on (a repeat of an
    earlier harvest is found by its content hash and re-used)."""
    resources = custom_requests(spec).get("harvest", {})
    return {positions: harvest(replace(spec.harvest, store=store_root, positions=positions, resources=resources),
                               use_ray=spec.harvest.executor == "ray")
            for positions in spec.positions_values()}


def _tuner(spec: SweepSpec, run: RunFolder, ctx: TrialContext, n_todo: int,
           remaining: list[dict[str, Any]] | None) -> tune.Tuner:
    """A fresh Tune experiment (tune/trials-N) that runs the `n_todo` trials still owed."""
    resources = {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu} | custom_requests(spec).get("trial", {})
    named = tune.with_parameters(run_trial, ctx=ctx)
    named.__name__ = f"{spec.name}-trial"  # the trial actors' name in the Ray dashboard (their repr)
    trainable = tune.with_resources(named, resources)
    attempt = len(list(Path(run.path("tune")).glob("trials-*"))) if run.is_local else time.strftime("%Y%m%d-%H%M%S")
    tune_root, tune_fs = tune_storage(f"{run.uri}/tune")
    journal = local_journal(run)
    uploader = None if run.is_local else JournalUploader(run.uri, journal)
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=searcher(spec, journal, remaining, uploader, recorded_ids(run),
                                                                ctx.pools is not None),
                                    scheduler=scheduler(spec), num_samples=n_todo,
                                    trial_name_creator=TrialName(spec.name), trial_dirname_creator=TrialName(spec.name),
                                    reuse_actors=True),  # no torch import per trial
        run_config=tune.RunConfig(
            name=f"trials-{attempt}", storage_path=tune_root, storage_filesystem=tune_fs,
            # Tune's own loggers minus its TBX one (TUNE_DISABLE_AUTO_CALLBACK_LOGGERS, set by run_sweep): the
            # trials' TensorBoard runs are TensorBoardWriter's, and Tune prints no `tensorboard --logdir` hint
            callbacks=[ResultsWriter(spec, run.uri), TensorBoardWriter(spec, run.uri), CSVLoggerCallback(),
                       JsonLoggerCallback()],
            verbose=0,
            failure_config=tune.FailureConfig(max_failures=spec.resources.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1)))


@dataclass(frozen=True)
class TrialName:
    """Tune's name and folder of a trial: `<spec name>-<dfc trial id>` (a class: Tune pickles it)."""

    spec_name: str

    def __call__(self, trial) -> str:
        return f"{self.spec_name}-{dfc_trial_id(trial.config, trial.trial_id)}"


def _run_trials(spec: SweepSpec, run: RunFolder, ctx: TrialContext, done: list[dict[str, Any]] | None,
                live: bool, pools: list, seconds: dict[str, float]) -> dict[str, Any]:
    """Run the trials still owed under the live view; returns the judge pools' figures (`_judge_info`), and
    `unfinished` when Ctrl-C stopped the trials (`_unfinished`). The pools are shut down when this returns,
    also on failure.

    Resume: results.jsonl is the truth. A fresh Tune experiment runs only what is still owed, so no
    finished trial is redone and none is lost (Tune's own restore can re-run a trial that finished
    after its last experiment checkpoint, and then collides with the Optuna study).
    Lost trials: Tune retries a trial whose actor died (FailureConfig), but gives it up when a second
    failure event arrives while it restarts (a lost node sends several). So once an experiment ends,
    trials the cluster lost (`lost_to_infrastructure`) are set aside (results.jsonl → retried.jsonl)
    and their grid points run again in a further experiment, at most `max_failures` times."""
    view = LiveView(total=spec.n_trials, console=None if live else Console(quiet=True),
                    axes=[a.name for a in spec.grid] + [d.name for d in spec.search],
                    title=spec.name)
    LIVE_VIEWS[run.uri] = view
    for record in done or []:
        view.update(record["trial_id"], record["config"], record["status"], record["metrics"])
    clock = time.perf_counter()
    INTERRUPTED.discard(run.uri)
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
                        view.forget(record["trial_id"])
                    if lost:
                        kinds = ", ".join(sorted({record.get("error_type", "?") for record in lost}))
                        print(f"{len(lost)} trial(s) lost to the cluster ({kinds}): running them again "
                              f"(round {round_} of at most {spec.resources.max_failures})", flush=True)
                    n_todo, remaining = remaining_work(spec, read_results(run))
                if n_todo:
                    with _sigint_handler_kept(run.uri):
                        _tuner(spec, run, ctx, n_todo, remaining).fit()
                if run.uri in INTERRUPTED:
                    break
        seconds["trials"] = time.perf_counter() - clock
        info = _judge_info(pools)
        return info | ({"unfinished": _unfinished(spec, run, view)} if run.uri in INTERRUPTED else {})
    finally:
        INTERRUPTED.discard(run.uri)
        LIVE_VIEWS.pop(run.uri, None)
        for pool in pools:
            pool.shutdown()


@contextlib.contextmanager
def _sigint_handler_kept(run_uri: str):
    """Put back this process's SIGINT handler after a Tune experiment: Tune installs its own (and ResultsWriter
    wraps it) and leaves it in place when the experiment ends normally, which would swallow a later Ctrl-C.
    Until Tune's is in place, a Ctrl-C is only noted (INTERRUPTED) and `ResultsWriter.setup` passes it on to
    Tune: raised while Tune was starting, a KeyboardInterrupt could be lost there and the sweep ran on. A
    second Ctrl-C still raises (Tune puts this handler back after the first)."""
    main = threading.current_thread() is threading.main_thread()
    handler = signal.getsignal(signal.SIGINT) if main else None

    def noted(signum: int, frame: Any) -> None:
        if run_uri in INTERRUPTED:
            raise KeyboardInterrupt
        INTERRUPTED.add(run_uri)

    if main:
        signal.signal(signal.SIGINT, noted)
    try:
        yield
    finally:
        if main and handler is not None:
            signal.signal(signal.SIGINT, handler)


def _unfinished(spec: SweepSpec, run: RunFolder, view: LiveView) -> dict[str, Any]:
    """The trials an interruption left unfinished: those running (Tune id and their grid and search axes) and
    how many more the spec still owes that had not started; `--resume` runs all of them."""
    recorded = {record["trial_id"] for record in read_results(run)}
    axes = [axis.name for axis in spec.grid] + [dist.name for dist in spec.search]
    running = [{"trial_id": trial_id, "config": {axis: trial["config"].get(axis) for axis in axes}}
               for trial_id, trial in view.trials.items() if trial_id not in recorded]
    owed = remaining_work(spec, read_results(run))[0]
    return {"running": running, "not_started": max(0, owed - len(running))}


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
    """report.json's judge figures, by pool name: peak memory (MB) of each pool's largest replica (a replica
    that cannot answer is skipped), how often Ray restarted each pool's replicas, and the tool-call dialect
    the judges read replies in (`dialect`, resolved from pair.dialect on the replicas)."""
    peaks: dict[str, float] = {}
    dialects: set[str] = set()
    for pool in pools:
        for handle in pool.handles:
            try:
                stats = ray.get(handle.stats.remote(), timeout=60)
            except Exception:  # a report is worth more than one replica's memory figure
                continue
            peaks[pool.cfg.name] = max(peaks.get(pool.cfg.name, 0.0), stats["peak_mem_mb"])
            dialects.add(stats["dialect"])
    return {**({"dialect": ", ".join(sorted(dialects))} if dialects else {}),
            "judge_peak_mem_mb": {k: round(v) for k, v in peaks.items()},
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
              address: str | None = None, evaluate: bool = True, live: bool = True,
              accept_spec_changes: bool = False) -> RunFolder:
    """Run (or resume) a sweep into `run_uri`; returns the run folder once the report is written.
    A resume continues the run's spec.yaml: `spec` is None, or must be that same spec; an edited spec.yaml is
    refused unless `accept_spec_changes`. Raises SweepInterrupted (after writing the report) when Ctrl-C
    stopped the trials, and refuses a run folder another driver holds (`RunLease`)."""
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")  # training reports carry no Δ yet
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"  # TensorBoardWriter instead of Tune's TBX logger
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"  # Tune's newer reporter prints its config box over the live view
    if spec is not None:  # before the run folder or Ray: a spec the pair or the data refuse costs nothing
        check_against_pair(spec)
    source = "--address" if address else "RAY_ADDRESS"
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:  # an address where no Ray cluster answers is refused in seconds, before the run folder exists
        check_address(address, source)
    if spec is not None and not address:  # a local cluster has this machine's devices: refused before any write
        check_devices(spec, torch.cuda.device_count(), "this machine (a local cluster)")
    run, spec, record = _open_run(spec, run_uri, resume, accept_spec_changes)
    done = read_results(run) if resume else None  # a damaged results.jsonl is refused before any work
    if done is not None:  # before the lease and Ray: a finished run starts nothing
        if finished := _finished(spec, run, done):
            raise NothingToResume(run, finished)
    store_root = absolute(store_root or f"{run.uri.rsplit('/', 1)[0]}/harvests")
    started_ray = not ray.is_initialized()
    lease = RunLease(run)
    try:
        if taken := lease.acquire(lambda held: _holder_gone(held, address)):
            print(f"{redact(run.uri)}: took over the lease of a driver that had stopped ({taken}); "
                  f"recorded in {redact(run.uri)}/lease-takeovers.jsonl", flush=True)
        if done is not None:  # once the run is this driver's: a refused resume prints only its one line
            print(resume_line(spec, run, done)[0], flush=True)
        _record_run(run, record, fresh=not resume)
        with stderr_to_log(run, live and Console().is_terminal):
            connect(address, metadata={"job_name": f"dfc-ray sweep {spec.name}", "spec": spec.name,
                                        "run_id": record["run_id"], "run": redact(run.uri)})
            lease.set_job(*cluster_identity())
            return _run_on_cluster(spec, run, record, store_root, done, not address, evaluate, live, lease)
    finally:
        lease.release()
        if not address and started_ray:  # a cluster this run started ends with it (agents and workers too)
            ray.shutdown()


def _largest_node_memory() -> tuple[float, str]:
    """The most memory Ray offers tasks on one live node of the cluster (its `memory` resource), and how to name
    it: a trial larger than that fits on no node and would fail there (or wait forever)."""
    memory = max((node["Resources"].get("memory", 0.0) for node in ray.nodes() if node.get("Alive")), default=0.0)
    return (memory or float("inf")), "memory Ray offers on the largest node of this cluster"


def _interrupted_before_trials(spec: SweepSpec, run: RunFolder, record: dict[str, Any]) -> SweepInterrupted:
    """Ctrl-C during the harvest or while the judges start: the report (no trial finished in this attempt) is
    written with every trial still owed as not started, as the CLI's exit 130 line then says."""
    unfinished = {"running": [], "not_started": remaining_work(spec, read_results(run))[0]}
    _publish_report(run, {"spec": spec.name, "spec_file": spec.source, "run": redact(run.uri),
                          "run_id": record["run_id"], "unfinished": unfinished})
    return SweepInterrupted(run, unfinished)


def _run_on_cluster(spec: SweepSpec, run: RunFolder, record: dict[str, Any], store_root: str,
                    done: list[dict[str, Any]] | None, local: bool, evaluate: bool, live: bool,
                    lease: RunLease) -> RunFolder:
    """The sweep once its run folder is checked, its lease held and Ray is up; `done`: a resume's recorded
    trials."""
    check_devices(spec, ray.cluster_resources().get("GPU", 0), "this Ray cluster")
    if local:  # a cluster we started cannot grow: refuse what would wait forever
        check_fits(spec, evaluate)
    check_placeable(spec, evaluate)  # some node (or node type) must hold each kind of actor
    clock = time.perf_counter()
    try:
        harvests = _harvest(spec, store_root)
        harvested = next(iter(harvests.values()))  # d_model and models are the pair's, the same in every store
        reused = all(h.reused for h in harvests.values())
        seconds = {"harvest": time.perf_counter() - clock}
        check_trial_memory(spec, harvested.d_model, *_largest_node_memory())
        clock = time.perf_counter()
        pools = start_pools(spec, record["run_id"], lease.holder.token if lease.holder else "") if evaluate else []
        seconds["start_pools"] = time.perf_counter() - clock
    except KeyboardInterrupt:  # Ctrl-C before any trial: still a report, and the trials owed named
        raise _interrupted_before_trials(spec, run, record) from None
    ctx = TrialContext(spec.raw | {"name": spec.name}, spec.source, run.uri,
                       {positions: h.uri for positions, h in harvests.items()}, harvested.d_model,
                       harvested.models, tuple(pool.cfg for pool in pools) or None, pair_fingerprint(spec.pair))
    judges = _run_trials(spec, run, ctx, done, live, pools, seconds)
    if not lease.check():  # another driver runs this folder now: leave its files to it
        raise ValueError(f"{redact(run.uri)}: its lease went to {lease.lost} while this driver ran (its heartbeat "
                         "had stalled); this driver stopped without writing its report")
    info = {"spec": spec.name, "spec_file": spec.source, "run": redact(run.uri), "run_id": record["run_id"],
            "harvest": redact(harvested.uri), "harvest_rows": harvested.rows, "harvest_reused": reused,
            "harvest_nodes": sorted({node for h in harvests.values() for node in h.nodes}), "layers": list(spec.layers),
            **({"harvests": {positions: {"uri": redact(h.uri), "rows": h.rows, "reused": h.reused}
                             for positions, h in harvests.items()}} if len(harvests) > 1 else {}),
            "pair": asdict(spec.pair), "protocol": spec.eval.protocol.label(), **_attempt_seconds(run, seconds),
            **({"spec_changes": record["spec_changes"]} if record.get("spec_changes") else {}), **judges}
    if "unfinished" not in judges:  # an interrupted attempt's rates would undercount
        _write_costs(spec, run, seconds, reused)
    _publish_report(run, info)
    if "unfinished" in judges:
        raise SweepInterrupted(run, judges["unfinished"])
    return run
