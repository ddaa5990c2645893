"""results.jsonl: one line per finished trial, written by a Tune callback that also feeds the live view."""

from __future__ import annotations

import json
import signal
import threading
from typing import Any

from ray.tune import Callback

from dfc_ray.config import check_name
from dfc_ray.failures import lost_to_infrastructure, trial_error
from dfc_ray.fs import RunFolder, redact
from dfc_ray.spaces import SweepSpec
from dfc_ray.sweep.lease import still_held

STRUCTURED = ("top_features", "alpha_curve", "reference_alpha_curve", "diff_top", "loc_curve")
"""Trial metrics that are lists: reported to Tune as JSON text (TensorBoard skips text, but warns on
lists), decoded back into lists in results.jsonl."""

LIVE_VIEWS: dict[str, Any] = {}
"""Run URI → its LiveView. Tune pickles callbacks into its resume state and a view cannot be
pickled, so the callback finds the current process's view here."""
INTERRUPTED: set[str] = set()
"""Run URIs whose Tune experiment Ctrl-C (SIGINT) stopped in this process (`ResultsWriter.setup`)."""


def read_results(run: RunFolder) -> list[dict[str, Any]]:
    """The recorded trials; a damaged line is refused with the file and line named."""
    records = []
    for number, line in enumerate((run.read_text("results.jsonl") or "").splitlines(), 1):
        where = f"{redact(run.uri)}/results.jsonl: line {number}"
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
        records.append(record)
    return records


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
    to add the run to INTERRUPTED first; the driver then names the trials that did not finish."""

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

    def config(self, params: dict[str, Any]) -> dict[str, Any]:
        """The trial's full settings (fixed + grid + sampled) with its grid labels."""
        return params | self.spec.trial_settings(params)

    def show(self, trial, status: str, metrics: dict[str, Any]) -> None:
        if (view := LIVE_VIEWS.get(self.run_uri)) is not None:
            view.update(trial.trial_id, self.config(trial.config), status, metrics)

    def append(self, trial, status: str, metrics: dict[str, Any], error: str = "",
               details: dict | None = None) -> None:
        if not still_held(self.run_uri):  # this driver stalled and was taken over: the run is its successor's
            return
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
