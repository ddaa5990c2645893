"""`dfc-ray sweep`: a spec → harvest (or reuse) → Ray Tune + Optuna trials → results.jsonl → report.

- driver.py: `run_sweep` and its steps (run folder, `check_fits`, harvest, judge pools, costs, report).
- trial.py: one trial (`run_trial`, the Tune trainable): stream its layer's activations → train →
  checkpoint → evaluate → steer → `tune.report`.
- search.py: Optuna search, resume bookkeeping (`remaining_work`), concurrency and ASHA.
- results.py: `ResultsWriter`, the Tune callback that writes results.jsonl and feeds the live view.
- lease.py: `RunLease`, one driver per run folder (lease.json, heartbeat, compare-and-swap writes).

Run folder (local path or s3://); `RunFolder` lives in dfc_ray/fs.py:

    <run>/spec.yaml            the merged spec, as run
    <run>/run.json             the run's id (names its judge pools), the folder it was made for, the spec it
                               started with, accepted edits
    <run>/lease.json           the driver running it now (host, pid, Ray job, heartbeat); absent when none
    <run>/.lease.lock          a local run's lease lock (flock, held only while lease.json is swapped)
    <run>/lease-takeovers.jsonl  leases taken over from drivers that had stopped
    <run>/results.jsonl        one line per finished trial: trial_id, config, metrics, status (+ error)
    <run>/retried.jsonl        records of trials the cluster lost (node, actor or judge died), each
                               replaced in results.jsonl by its grid point's re-run
    <run>/checkpoints/<id>/    each trial's crosscoder (config.json + model.safetensors)
    <run>/tune/trials-N/       Ray Tune's experiments (its CSV/JSON results), one per start or resume
    <run>/tensorboard/<id>/    each trial's TensorBoard run (`tensorboard --logdir <run>/tensorboard`)
    <run>/driver.log           Ray's and the libraries' stderr while the live view drew
    <run>/optuna.journal       the Optuna study (optuna-dashboard reads it)
    <run>/report.json, report.md, plots/*.png

Trials run as separate Tune trials (not trainer groups): on the organism a trial's data pass costs
less than its evaluation, so grouping would save little and would tie trials' failures together
(docs/sweep.md has the numbers). The CLI is dfc_ray/commands/sweep.py.
"""

from dfc_ray.sweep.driver import NothingToResume, SweepInterrupted, _write_costs, check_fits, run_sweep, start_pools
from dfc_ray.sweep.results import LIVE_VIEWS, STRUCTURED, ResultsWriter, read_results
from dfc_ray.sweep.search import ObjectiveAtTheEnd, SpaceSampler, remaining_work
from dfc_ray.sweep.trial import TRAIN_REPORTS, TrialContext, judge_checkpoint, judge_metrics, run_trial, trial_batches

__all__ = ["LIVE_VIEWS", "NothingToResume", "STRUCTURED", "TRAIN_REPORTS", "ObjectiveAtTheEnd", "ResultsWriter",
           "SpaceSampler", "SweepInterrupted",
           "TrialContext", "_write_costs", "check_fits", "judge_checkpoint", "judge_metrics", "read_results",
           "remaining_work", "run_sweep", "run_trial", "start_pools", "trial_batches"]
