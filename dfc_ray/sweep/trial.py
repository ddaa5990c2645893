"""One trial: stream its layer's activations → train → checkpoint → evaluate → steer → `tune.report`.

`run_trial` is the Tune trainable; Tune pickles it (with its `TrialContext`) by reference to this
module, so both stay importable at module level.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import ray
import torch
from ray import tune

from actors.pool import ReplicaPool, wait_any
from actors.steering import Localization, SteerResult
from dfc_ray import metrics as registry
from dfc_ray import selfcheck
from dfc_ray import store
from dfc_ray.crosscoder import DFCConfig
from dfc_ray.evaluate import EvalResult
from dfc_ray.fs import RunFolder, redact
from dfc_ray.plan import peak_memory_mb
from dfc_ray.spaces import DFC_FIELDS, TRAIN_FIELDS, parse_spec
from dfc_ray.train import TrainConfig, train

TRAIN_REPORTS = 10  # intermediate reports per trial (what ASHA and the live view see)
TRIAL_KEY = "dfc_trial_id"
"""The trial config key that carries the trial's dfc id (search.TrialIds): it names the trial in
results.jsonl, its checkpoint folder, its Tune trial and TensorBoard run, and keeps across a resume."""


def dfc_trial_id(config: dict[str, Any], tune_id: str) -> str:
    """The trial's dfc id: the one its searcher handed out, else Tune's own."""
    return str(config.get(TRIAL_KEY) or tune_id)


@dataclass(frozen=True)
class TrialContext:
    """What every trial needs besides its own parameters; small and picklable."""

    spec_raw: dict
    spec_source: str
    run_dir: str
    stores: dict[str, str]
    """Harvest positions → its store's URI: one per distinct `positions` the trials train on."""
    d_model: int
    models: tuple[str, str]
    pools: tuple | None
    """(evaluator PoolConfig, steering PoolConfig); None: evaluation off."""
    pair_fingerprint: str = ""
    """The spec's pair (`pair.pair_fingerprint`): a judge replica hosting another pair refuses the trial."""


def trial_batches(store_uri: str, layer: int, batch_size: int, reader: str, seed: int, d_model: int,
                  models: tuple[str, str]) -> Iterator:
    """Endless shuffled `(batch, 2, d_model)` batches of the trial's layer from its store."""
    if reader == "local":
        return store.iter_layer_batches(store_uri, layer, batch_size, shuffle=True, seed=seed, epochs=10**9,
                                        drop_last=True, d_model=d_model, models=models)
    return store.iter_ray_batches(store_uri, layer, batch_size, epochs=None, seed=seed, drop_last=True,
                                  local_shuffle_buffer_size=8 * batch_size, d_model=d_model, models=models)


def training_report(m: dict[str, float]) -> dict[str, float]:
    """The trainer's metrics that the registry marks "train"; `fvu` (ASHA's default metric) is the
    mean of A's and B's."""
    m = m | {"fvu": (m["fvu_a"] + m["fvu_b"]) / 2}
    return {name: m[name] for name in registry.names("train")}


def trial_configs(settings: dict[str, Any], d_model: int) -> tuple[DFCConfig, TrainConfig]:
    """The crosscoder and training configs of one trial's settings (`SweepSpec.trial_settings`)."""
    return (DFCConfig(d_model=d_model, **{k: v for k, v in settings.items() if k in DFC_FIELDS}),
            TrainConfig(**{k: v for k, v in settings.items() if k in TRAIN_FIELDS}))


def run_trial(params: dict[str, Any], ctx: TrialContext) -> None:
    """The Tune trainable: train one crosscoder, then judge it, reporting as it goes."""
    spec = parse_spec(ctx.spec_raw, ctx.spec_source)
    torch.set_num_threads(max(1, int(spec.resources.cpu)))  # the trial's share, not every core
    if torch.cuda.is_available():  # trial actors are re-used: this trial's peak, not the actor's
        torch.cuda.reset_peak_memory_stats()
    settings = spec.trial_settings(params)
    layer = settings["layer"]
    dfc, cfg = trial_configs(settings, ctx.d_model)
    every = max(1, cfg.steps // TRAIN_REPORTS)

    def on_metrics(name: str, step: int, m: dict[str, float]) -> None:
        if step % every == 0 and step < cfg.steps:
            tune.report({"phase": "train", "step": step, **training_report(m)})

    trial_id = dfc_trial_id(params, tune.get_context().get_trial_id())
    local = Path(tune.get_context().get_trial_dir()) / "crosscoder"
    started = time.perf_counter()
    store_uri = ctx.stores[spec.trial_positions(settings)]
    batches = trial_batches(store_uri, layer, settings["batch_size"], settings["reader"], cfg.seed, ctx.d_model,
                            ctx.models)
    result = train(dfc, cfg, batches, on_metrics=on_metrics, out_dir=local.parent)
    metrics: dict[str, Any] = {"phase": "done", "status": result.status, "reason": result.reason, "steps": result.steps,
                               "train_s": time.perf_counter() - started,
                               "harvest_store": redact(store_uri)}
    if result.metrics:
        metrics |= training_report(result.metrics)
    metrics["train_peak_mem_mb"] = peak_memory_mb()
    metrics["node_id"] = ray.get_runtime_context().get_node_id()  # where it ran (multi-node tests check the spread)
    if result.status == "ok":
        checkpoint = RunFolder(ctx.run_dir).upload_dir(local.parent / "dfc", f"checkpoints/{trial_id}")
        metrics["checkpoint"] = checkpoint
        if ctx.pools is not None:
            started = time.perf_counter()
            metrics |= judge_checkpoint(ctx.pools, checkpoint, layer, ctx.pair_fingerprint)
            metrics["judge_s"] = time.perf_counter() - started
    judged = metrics.pop("fast_path_fallbacks", [])
    metrics["fast_path_fallbacks"] = json.dumps(sorted(set(selfcheck.fallbacks()) | set(judged)))
    for name in spec.metrics:  # an objective the trial could not produce is NaN, never a made-up number
        metrics.setdefault(name, math.nan)
    tune.report(metrics)


def judge_checkpoint(pools: tuple, checkpoint: str, layer: int, fingerprint: str) -> dict[str, Any]:
    """Splice evaluation and steering of one checkpoint on the sweep's shared actor pools (the evaluation in
    flight beside the steering; the localisation after the steering, on the same replica), flattened into trial
    metrics. Each request carries the pair `fingerprint` the trial's spec names; a replica hosting another pair
    refuses it (`PairReplica.for_pair`)."""
    evaluator, steerer = (ReplicaPool.connect(cfg) for cfg in pools)
    started = time.perf_counter()
    steer_ref, loc_ref = steerer.submit_in_turn([("for_pair", (fingerprint, "steer", checkpoint, layer)),
                                                 ("for_pair", (fingerprint, "localize", checkpoint, layer))])
    refs = {"eval_s": evaluator.submit("for_pair", fingerprint, "evaluate", checkpoint, layer),
            "steer_s": steer_ref, "loc_s": loc_ref}
    seconds, pending = {}, list(refs.values())
    while pending:  # time each answer: how long a trial waits for each judge
        ready, pending = wait_any((evaluator, steerer), pending)
        seconds |= {name: time.perf_counter() - started for name, ref in refs.items() if ref in ready}
    evaluation, steering, localization = ray.get(list(refs.values()))
    return judge_metrics(evaluation, steering, seconds, localization)


def judge_metrics(evaluation: EvalResult, steering: SteerResult, seconds: dict[str, float],
                  localization: Localization | None = None) -> dict[str, Any]:
    """The judges' results as trial metrics; lists go as JSON text (results.STRUCTURED)."""
    ranking = [{"feature": f.feature, "cohens_d": f.cohens_d, "auroc": f.auroc} for f in steering.ranking[:5]]
    chosen = steering.targets.get(steering.config.get("primary", "a"))
    curve = [{"alpha": c.alpha, "delta_pp": 100 * (c.dev_correct - chosen.dev_clean)}  # the chosen feature's
             for c in (chosen.grid if chosen else []) if c.feature == chosen.feature]  # dev α curve
    reference = chosen.reference if chosen else None  # the same dev α grid for the reference direction
    reference_curve = [{"alpha": alpha, "delta_pp": 100 * (correct - reference.dev_clean)}
                       for alpha, correct in (reference.grid if reference else [])]
    located = {k: json.dumps(v) if isinstance(v, list) else v
               for k, v in (localization.metrics() if localization else {}).items()}
    return evaluation.metrics() | steering.metrics() | located | seconds | {
        "top_features": json.dumps(ranking), "alpha_curve": json.dumps(curve),
        "reference_alpha_curve": json.dumps(reference_curve), "steer_skipped": steering.skipped,
        "fast_path_fallbacks": evaluation.fast_path_fallbacks + steering.fast_path_fallbacks}
