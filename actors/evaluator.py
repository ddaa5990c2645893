"""EvaluatorActor: hosts model A and B and scores crosscoder checkpoints by splicing them in.

One replica loads the pair from its `PairSpec` (weights never go through the object store) and
serves many trials: a request is a checkpoint PATH and a layer. Clean replies do not depend on the
checkpoint, so they are generated once per (pair, tasks, generation settings) and cached in the
replica — a 48-trial sweep generates them once per replica, not 48 times.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict

import ray
import torch

from dfc_ray.evaluate import (EvalConfig, EvalResult, SpliceLoss, bootstrap_rate, eval_tasks, eval_texts,
                              load_crosscoder, paired_delta_pp, score_all, splice_loss_per_text, tool_rates)
from dfc_ray.generation import generate
from dfc_ray.interventions import generate_spliced
from dfc_ray.pair import PairSpec, load_pair, pair_fingerprint
from dfc_ray.tooluse import Score, render_prompt


class Evaluator:
    """Tool correctness of A and B, clean and spliced, for crosscoder checkpoints (in-process class;
    `EvaluatorActor` is the Ray actor)."""

    def __init__(self, pair: PairSpec, cfg: EvalConfig | None = None):
        self.pair, self.cfg = pair, cfg or EvalConfig()
        self.model_a, self.model_b, self.tokenizer = load_pair(pair)
        self.device = next(self.model_a.parameters()).device
        self.fingerprint = pair_fingerprint(pair)
        self._clean: dict[str, dict[str, list[Score]]] = {}
        self.clean_hits = self.clean_misses = 0

    def _clean_key(self, cfg: EvalConfig) -> str:
        return json.dumps([self.fingerprint, cfg.tasks, cfg.n_tasks, asdict(cfg.generation())], sort_keys=True)

    def clean_scores(self, cfg: EvalConfig) -> tuple[dict[str, list[Score]], bool]:
        """Scores of A's and B's clean replies to cfg's tasks, and whether they came from the cache."""
        key = self._clean_key(cfg)
        if key in self._clean:
            self.clean_hits += 1
            return self._clean[key], True
        self.clean_misses += 1
        tasks = eval_tasks(cfg)
        prompts = [render_prompt(self.tokenizer, t) for t in tasks]
        self._clean[key] = {name: score_all(tasks, generate(model, self.tokenizer, prompts, cfg.generation()))
                            for name, model in (("a", self.model_a), ("b", self.model_b))}
        return self._clean[key], False

    def evaluate(self, checkpoint: str, layer: int, cfg: EvalConfig | None = None) -> EvalResult:
        """Splice `checkpoint` (a folder path) at `layer` into A and into B; rates with 95% CIs."""
        cfg = cfg or self.cfg
        n_layers = self.model_a.config.num_hidden_layers
        if not 0 <= layer < n_layers:
            raise ValueError(f"layer {layer}: expected a block index in [0, {n_layers})")
        cc = load_crosscoder(checkpoint, self.device)
        if cc.cfg.d_model != self.model_a.config.hidden_size:
            raise ValueError(f"{checkpoint}: d_model {cc.cfg.d_model}, but the pair has {self.model_a.config.hidden_size}")
        clean, cached = self.clean_scores(cfg)
        tasks = eval_tasks(cfg)
        prompts = [render_prompt(self.tokenizer, t) for t in tasks]
        spliced = {target: score_all(tasks, generate_spliced(self.model_a, self.model_b, self.tokenizer, prompts,
                                                             cfg.generation(), cc, layer, target, cfg.splice_mode))
                   for target in ("a", "b")}
        boot = dict(n_boot=cfg.n_bootstrap, seed=cfg.seed)
        delta = {t: paired_delta_pp([s.correct for s in clean[t]], [s.correct for s in spliced[t]], **boot)
                 for t in ("a", "b")}
        losses = {t: self._loss(cc, layer, t, cfg) for t in ("a", "b")}
        return EvalResult(checkpoint=str(checkpoint), layer=layer, config=asdict(cfg),
                          a_clean=tool_rates(clean["a"], **boot), a_splice=tool_rates(spliced["a"], **boot),
                          b_clean=tool_rates(clean["b"], **boot), b_splice=tool_rates(spliced["b"], **boot),
                          delta_a_pp=delta["a"], delta_b_pp=delta["b"], loss_a=losses["a"], loss_b=losses["b"],
                          clean_cached=cached)

    def _loss(self, cc, layer: int, target: str, cfg: EvalConfig) -> SpliceLoss | None:
        if not cfg.n_texts:
            return None
        texts = eval_texts(cfg.texts, cfg.n_texts, cfg.seed)
        models = (self.model_a, self.model_b) if target == "a" else (self.model_b, self.model_a)
        ce_clean, ce_splice, kl = splice_loss_per_text(*models, self.tokenizer, texts, cc, layer, target, cfg.batch_size)
        return SpliceLoss(*(bootstrap_rate(v, cfg.n_bootstrap, cfg.seed) for v in (ce_clean, ce_splice, kl)))

    def stats(self) -> dict[str, object]:
        """Process id, device and clean-cache counters (for monitoring and tests)."""
        return {"pid": os.getpid(), "device": str(self.device), "clean_hits": self.clean_hits,
                "clean_misses": self.clean_misses, "cuda": torch.cuda.is_available()}


EvaluatorActor = ray.remote(Evaluator)
"""The Ray actor: `EvaluatorActor.options(num_gpus=1).remote(pair, cfg)`; see actors/pool.py for named pools."""
