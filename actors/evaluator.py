"""EvaluatorActor: hosts model A and B and scores crosscoder checkpoints by splicing them in.

One replica loads the pair from its `PairSpec` (weights never go through the object store) and
serves many trials: a request is a checkpoint PATH and a layer. Clean replies, the prompts' prefill
and the other model's activations do not depend on the checkpoint, so they are computed once per
replica (actors/replica.py) — a 48-trial sweep generates clean replies once, not 48 times.
"""

from __future__ import annotations

import time
from dataclasses import asdict

import ray

from actors.replica import CONCURRENCY_GROUPS, PairReplica
from dfc_ray import selfcheck
from dfc_ray.config import METRICS
from dfc_ray.evaluate import (EvalConfig, EvalResult, SpliceLoss, bootstrap_rate, eval_tasks, eval_texts,
                              load_crosscoder, paired_delta_pp, score_all, splice_loss_per_text, tool_rates)
from dfc_ray.interventions import generate_spliced
from dfc_ray.pair import PairSpec
from dfc_ray.tooluse import Score


class Evaluator(PairReplica):
    """Tool correctness of A and B, clean and spliced, for crosscoder checkpoints (in-process class;
    `EvaluatorActor` is the Ray actor)."""

    def __init__(self, pair: PairSpec, cfg: EvalConfig | None = None, shared: PairReplica | None = None):
        super().__init__(pair, shared)
        self.cfg = cfg or EvalConfig()

    def clean_scores(self, cfg: EvalConfig) -> tuple[dict[str, list[Score]], bool]:
        """Scores of A's and B's clean replies to cfg's tasks, and whether they came from the cache."""
        misses = self.clean_misses
        tasks = eval_tasks(cfg)
        prompts = self.prompts(tasks, cfg.protocol.prompt_format)
        prefix = cfg.splice.leaves_prefix_alone  # the splices' path (actors/replica.py)
        scores = {t: score_all(tasks, self.clean_replies(t, prompts, cfg.generation(), prefix), self.dialect)
                  for t in ("a", "b")}
        return scores, self.clean_misses == misses

    def evaluate(self, checkpoint: str, layer: int, cfg: EvalConfig | None = None) -> EvalResult:
        """Splice `checkpoint` (a folder path) at `layer` into A and into B; rates with 95% CIs."""
        cfg = cfg or self.cfg
        started = time.perf_counter()
        shape = self.model_a.config.get_text_config()  # a multimodal wrapper's are its language model's
        n_layers = shape.num_hidden_layers
        if not 0 <= layer < n_layers:
            raise ValueError(f"layer {layer}: expected a block index in [0, {n_layers})")
        cc = load_crosscoder(checkpoint, self.device, cfg.protocol.normalization)
        if cc.cfg.d_model != shape.hidden_size:
            raise ValueError(f"{checkpoint}: d_model {cc.cfg.d_model}, but the pair has {shape.hidden_size}")
        clean, cached = self.clean_scores(cfg)
        tasks = eval_tasks(cfg)
        prompts = self.prompts(tasks, cfg.protocol.prompt_format)
        spliced = {target: score_all(tasks, self._spliced(cc, layer, target, prompts, cfg), self.dialect)
                   for target in ("a", "b")}
        boot = dict(n_boot=cfg.n_bootstrap, seed=cfg.seed)
        metric = cfg.protocol.metric
        passed = {m: {f"{t}_{when}": [s.passes(m) for s in scores[t]]
                      for when, scores in (("clean", clean), ("splice", spliced)) for t in ("a", "b")}
                  for m in METRICS}
        delta = {t: paired_delta_pp(passed[metric][f"{t}_clean"], passed[metric][f"{t}_splice"], **boot)
                 for t in ("a", "b")}
        losses = {t: self._loss(cc, layer, t, cfg) for t in ("a", "b")}
        return EvalResult(checkpoint=str(checkpoint), layer=layer, config=asdict(cfg),
                          a_clean=tool_rates(clean["a"], **boot), a_splice=tool_rates(spliced["a"], **boot),
                          b_clean=tool_rates(clean["b"], **boot), b_splice=tool_rates(spliced["b"], **boot),
                          delta_a_pp=delta["a"], delta_b_pp=delta["b"], loss_a=losses["a"], loss_b=losses["b"],
                          clean_cached=cached, seconds=time.perf_counter() - started, metric=metric, passed=passed,
                          fast_path_fallbacks=selfcheck.fallbacks())

    def _spliced(self, cc, layer: int, target: str, prompts: list[str], cfg: EvalConfig):
        """Replies of `target` with the reconstruction spliced in; at the last prompt token the other
        model's activations and the target's prefill come from the replica's caches, and the clean replies are
        the drafts (`generation.generate`: a good reconstruction leaves most replies as they were)."""
        other = None
        if cfg.splice.leaves_prefix_alone:
            other = self.last_residuals("b" if target == "a" else "a", prompts, layer, cfg.batch_size)[:, None]
        clean = self.clean_replies(target, prompts, cfg.generation(), cfg.splice.leaves_prefix_alone)
        return generate_spliced(self.model_a, self.model_b, self.tokenizer, prompts, self.generation(cfg.generation(),
                                prompts), cc, layer, target, cfg.splice_mode, other=other,
                                prefix_cache=self.prefix[target], drafts=[g.token_ids for g in clean])

    def _loss(self, cc, layer: int, target: str, cfg: EvalConfig) -> SpliceLoss | None:
        if not cfg.n_texts:
            return None
        texts = eval_texts(cfg.texts, cfg.n_texts, cfg.seed)
        models = (self.model_a, self.model_b) if target == "a" else (self.model_b, self.model_a)
        ce_clean, ce_splice, kl = splice_loss_per_text(*models, self.tokenizer, texts, cc, layer, target,
                                                       cfg.batch_size)
        return SpliceLoss(*(bootstrap_rate(v, cfg.n_bootstrap, cfg.seed) for v in (ce_clean, ce_splice, kl)))


EvaluatorActor = ray.remote(concurrency_groups=CONCURRENCY_GROUPS)(Evaluator)
"""The Ray actor: `EvaluatorActor.options(num_gpus=1).remote(pair, cfg)`; see actors/pool.py for named pools."""
