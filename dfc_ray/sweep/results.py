"""results.jsonl: one line per finished trial, written by a Tune callback that also feeds the live view."""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import tempfile
import threading
from pathlib import Path
from typing import Any

from ray.tune import Callback
from tensorboardX import SummaryWriter
from tensorboardX.summary import hparams

from dfc_ray.config import check_name
from dfc_ray.failures import lost_to_infrastructure, trial_error
from dfc_ray.fs import RunFolder, redact
from dfc_ray.metrics import find as find_metric
from dfc_ray.metrics import names as metric_names
from dfc_ray.metrics import number
from dfc_ray.spaces import SweepSpec
from dfc_ray.sweep.trial import TRIAL_KEY, dfc_trial_id
from dfc_ray.sweep.lease import still_held

STRUCTURED = ("top_features", "alpha_curve", "reference_alpha_curve", "diff_top", "loc_curve", "fast_path_fallbacks")
"""Trial metrics that are lists: reported to Tune as JSON text (TensorBoard skips text, but warns on
lists), decoded back into lists in results.jsonl."""

LIVE_VIEWS: dict[str, Any] = {}
"""Run URI → its LiveView. Tune pickles callbacks into its resume state and a view cannot be
pickled, so the callback finds the current process's view here."""
INTERRUPTED: set[str] = set()
"""Run URIs whose Tune experiment Ctrl-C (SIGINT) stopped in this process (`ResultsWriter.setup`)."""


def spec_hash(spec_dump: dict[str, Any]) -> str:
    """A short hash of a run's whole spec (the mapping spec.yaml holds), kept in each results.jsonl record as
    `spec_hash`: what a resume compares spec.yaml with when run.json, the spec's own record, is missing."""
    return hashlib.sha256(json.dumps(spec_dump, sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_results(run: RunFolder) -> list[dict[str, Any]]:
    """The recorded trials; a damaged line, or a trial id recorded twice (two lines would count as two
    finished grid points), is refused with the file and lines named."""
    records = []
    first_line: dict[str, int] = {}
    for line_no, line in enumerate((run.read_text("results.jsonl") or "").splitlines(), 1):
        where = f"{redact(run.uri)}/results.jsonl: line {line_no}"
        try:
            record = json.loads(line) if line.strip() else None
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: not valid JSON ({err.msg} at column {err.colno}); expected one trial per "
                             "line (remove that line to re-run the trial)") from None
        if record is None:
            continue
        if not (isinstance(record, dict) and isinstance(record.get("trial_id"), str)
                and isinstance(record.get("status"), str)
                and all(isinstance(record.get(key), dict) for key in ("config", "metrics"))):
            raise ValueError(f"{where}: expected a trial record (an object with trial_id, config, metrics and "
                             "status, as the sweep writes them; remove that line to re-run the trial)")
        check_name(record["trial_id"], f"{where}: trial_id")  # it names folders (checkpoints, ablation twins)
        if (earlier := first_line.setdefault(record["trial_id"], line_no)) != line_no:
            raise ValueError(f"{redact(run.uri)}/results.jsonl: lines {earlier} and {line_no} both record trial "
                             f"{record['trial_id']!r}; expected each trial once (remove the line that is wrong to "
                             "re-run its grid point)")
        records.append(record)
    return records


def recorded_ids(run: RunFolder) -> set[str]:
    """Trial ids results.jsonl and retried.jsonl hold: a new trial never takes one of them."""
    retried = [json.loads(line)["trial_id"] for line in (run.read_text("retried.jsonl") or "").splitlines()
               if line.strip()]
    return {record["trial_id"] for record in read_results(run)} | set(retried)


def set_aside_lost(run: RunFolder) -> list[dict[str, Any]]:
    """Move the records of trials the cluster lost (`lost_to_infrastructure`) out of results.jsonl into
    retried.jsonl, so the sweep can run those grid points again and results.jsonl ends with each
    once; returns the moved records. retried.jsonl is written first (a record already there is not
    added twice), then results.jsonl is rewritten whole without them: a crash in between leaves
    every record in results.jsonl, and the next call moves it."""
    records = read_results(run)
    lost = [record for record in records if lost_to_infrastructure(record)]
    if not lost:
        return []
    history = [line for line in (run.read_text("retried.jsonl") or "").splitlines() if line.strip()]
    kept = {json.loads(line)["trial_id"] for line in history}
    history += [json.dumps(record) for record in lost if record["trial_id"] not in kept]
    run.write_text("retried.jsonl", "\n".join(history) + "\n")
    rest = [json.dumps(record) for record in records if not lost_to_infrastructure(record)]
    run.write_text("results.jsonl", "".join(line + "\n" for line in rest))
    return lost


class ResultsWriter(Callback):
    """One results.jsonl line per finished trial (never twice, also across resumes), and
    live-view updates as results arrive. It also notes a Ctrl-C: Tune ends an experiment on SIGINT
    as if it had finished (its handler stops the loop and leaves no mark), so `setup` wraps that handler
    to add the run to INTERRUPTED first, and passes on a Ctrl-C that came while Tune was starting; the driver
    then names the trials that did not finish."""

    def __init__(self, spec: SweepSpec, run_uri: str) -> None:
        self.spec, self.run_uri = spec, run_uri

    def setup(self, **info) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers live in the main thread (where Tune put its own)
        tune_handler = signal.getsignal(signal.SIGINT)

        def interrupted(signum, frame) -> None:
            INTERRUPTED.add(self.run_uri)
            if callable(tune_handler):
                tune_handler(signum, frame)
            else:
                raise KeyboardInterrupt

        signal.signal(signal.SIGINT, interrupted)
        if self.run_uri in INTERRUPTED:  # Ctrl-C while Tune was starting (driver._sigint_handler_kept): stop now
            interrupted(signal.SIGINT, None)

    def config(self, params: dict[str, Any]) -> dict[str, Any]:
        """The trial's full settings (fixed + grid + sampled) with its grid labels."""
        return {k: v for k, v in params.items() if k != TRIAL_KEY} | self.spec.trial_settings(params)

    def show(self, trial, status: str, metrics: dict[str, Any]) -> None:
        if (view := LIVE_VIEWS.get(self.run_uri)) is not None:
            view.update(dfc_trial_id(trial.config, trial.trial_id), self.config(trial.config), status, metrics)

    def append(self, trial, status: str, metrics: dict[str, Any], error: str = "",
               details: dict | None = None) -> None:
        if not still_held(self.run_uri):  # this driver stalled and was taken over: the run is its successor's
            return
        run = RunFolder(self.run_uri)
        trial_id = dfc_trial_id(trial.config, trial.trial_id)
        lines = [line for line in (run.read_text("results.jsonl") or "").splitlines() if line.strip()]
        if any(json.loads(line)["trial_id"] == trial_id for line in lines):
            return
        metrics = {k: json.loads(v) if k in STRUCTURED and isinstance(v, str) else v for k, v in metrics.items()
                   if isinstance(v, (int, float, str, bool, list, dict))}
        record = {"trial_id": trial_id, "config": self.config(trial.config), "metrics": metrics,
                  "status": status, "spec_hash": spec_hash(self.spec.raw | {"name": self.spec.name})} | \
            ({"error": error} if error else {}) | (details or {})
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
        pointer = f"errors/{dfc_trial_id(trial.config, trial.trial_id)}.txt"
        RunFolder(self.run_uri).write_text(pointer, error.traceback or "no traceback was saved\n")
        self.append(trial, "failed", dict(trial.last_result or {}),
                    error=f"{error.type}: {error.message} (traceback: {redact(self.run_uri)}/{pointer})",
                    details={"error_type": error.type, "error_file": f"{redact(self.run_uri)}/{pointer}"})


TENSORBOARD = "tensorboard"
"""The run's one TensorBoard logdir (`tensorboard --logdir <run>/tensorboard`): a run per dfc trial id."""


def tensorboard_tag(name: str) -> str:
    """A metric's TensorBoard tag, grouped by what it is: train/…, eval/…, steer/…, localize/…, seconds/…,
    memory/…."""
    if name in metric_names("train"):
        return f"train/{name}"
    if name.startswith("steer_"):
        return f"steer/{name.removeprefix('steer_')}"
    if name.startswith(("diff_", "loc_")):
        return f"localize/{name}"
    if name.endswith("_s"):
        return f"seconds/{name}"
    return f"memory/{name}" if name.endswith("_mb") else f"eval/{name}"


class TensorBoardWriter(Callback):
    """TensorBoard event files per trial in `<run>/tensorboard/<dfc trial id>/`, written by the driver as
    results arrive: the training reports as `train/*` scalars against the optimizer step, the final report's
    one-off numbers (Δ's, steering, localisation, seconds) as the trial's HParams metrics at its last step, its
    grid and search values as its hyperparameters. Replaces Tune's own TBX logger (`ray/tune/<key>` against
    the report count, one run folder per Tune experiment). A trial that starts again (a resume re-runs an
    unfinished one from scratch) replaces its partial events; finished trials never run again, so a resume
    adds to the same runs. An S3 run writes locally and uploads each trial's files when it ends."""

    def __init__(self, spec: SweepSpec, run_uri: str) -> None:
        self.spec, self.run_uri = spec, run_uri
        self._writers: dict[str, SummaryWriter] = {}
        self._staging: str | None = None

    def __getstate__(self) -> dict[str, Any]:  # Tune pickles callbacks into its resume state: no open files
        return {"spec": self.spec, "run_uri": self.run_uri, "_writers": {}, "_staging": None}

    def _root(self) -> Path:
        run = RunFolder(self.run_uri)
        if run.is_local:
            return Path(run.path(TENSORBOARD))
        self._staging = self._staging or tempfile.mkdtemp(prefix="dfc-tensorboard-")
        return Path(self._staging)

    def _writer(self, trial_id: str) -> SummaryWriter:
        if trial_id not in self._writers:
            folder = self._root() / trial_id
            for stale in folder.glob("events.out.tfevents*"):  # an unfinished earlier attempt of this trial
                stale.unlink()
            self._writers[trial_id] = SummaryWriter(str(folder), flush_secs=10)
        return self._writers[trial_id]

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        if result.get("phase") != "train" or (step := number(result.get("step"))) is None:
            return
        writer = self._writer(dfc_trial_id(trial.config, trial.trial_id))
        for name in metric_names("train"):
            if (value := number(result.get(name))) is not None:
                writer.add_scalar(tensorboard_tag(name), value, int(step))

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._finish(trial, dict(trial.last_result or {}))

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._finish(trial, dict(trial.last_result or {}))

    def _finish(self, trial, result: dict[str, Any]) -> None:
        trial_id = dfc_trial_id(trial.config, trial.trial_id)
        writer = self._writer(trial_id)
        step = int(number(result.get("steps")) or number(result.get("step")) or 0)
        final = {tensorboard_tag(name): value for name, raw in result.items()
                 if find_metric(name) is not None and name not in ("step", "steps")
                 and (value := number(raw)) is not None}
        train = {tag: value for tag, value in final.items() if tag.startswith("train/")}
        for tag, value in train.items():  # the curve's last point: the trained crosscoder
            writer.add_scalar(tag, value, step)
        once = {tag: value for tag, value in final.items() if tag not in train}
        settings = self.spec.trial_settings(trial.config)
        axes = [a.name for a in self.spec.grid] + [d.name for d in self.spec.search]
        chosen = {axis: trial.config[axis] if axis in trial.config else settings.get(axis) for axis in axes}
        hparam_dict = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in chosen.items()}
        hparam_dict |= {"trial": trial_id, "status": str(result.get("status", "failed"))}
        file_writer = writer._get_file_writer()
        for summary in hparams(hparam_dict, once):  # the HParams tab's session: settings → metrics
            file_writer.add_summary(summary)
        for tag, value in once.items():  # HParams reads each metric's value from a scalar of its tag
            writer.add_scalar(tag, value, step)
        writer.close()
        del self._writers[trial_id]
        run = RunFolder(self.run_uri)
        if not run.is_local:
            run.upload_dir(self._root() / trial_id, f"{TENSORBOARD}/{trial_id}")

    def on_experiment_end(self, trials, **info) -> None:
        for trial_id, writer in self._writers.items():  # trials Ctrl-C stopped: their curves so far
            writer.close()
            if self._staging is not None:
                RunFolder(self.run_uri).upload_dir(Path(self._staging) / trial_id, f"{TENSORBOARD}/{trial_id}")
        self._writers.clear()
        if self._staging is not None:  # an S3 run's local copies, all uploaded
            shutil.rmtree(self._staging, ignore_errors=True)
            self._staging = None
