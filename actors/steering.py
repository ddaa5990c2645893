"""SteeringActor: does adding an A-exclusive feature's direction make a model call tools correctly?

Protocol (docs/evaluation.md), built to avoid the seed study's weakness 5 (selection and report on
the same 40 prompts, best grid cell reported):
1. rank the A-exclusive features on the DEV split three ways (`rankings`): Cohen's d at the last
   prompt token (ranking.py), |cos| of the A decoder direction with the reference direction, and the
   direct effect on the target's first reply token (log-prob of the tool-call opener); the top_n of
   each, united, are the candidates;
2. for each target model, sweep α over a grid for the candidates on DEV; pick the best cell;
3. report that single (feature, α) on the disjoint TEST split: clean vs steered, paired 95% CI;
4. controls on TEST at the same α: a random A-exclusive feature, and a random direction of the
   chosen vector's norm;
5. the minimal steerable set on DEV: the smallest set of top features whose joint steering closes a
   target share of the A–B clean gap (greedy forward selection);
6. the positive control: the reference direction v (mean A − B residual on dev tool prompts) goes
   through steps 2–4 itself, once per replica and setting (cached across checkpoints). If it does
   not move the target beyond its CI, the layer/position is labelled "no steerable direction".
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import ray
import torch
from rich.console import Console
from rich.table import Table

from actors.replica import CONCURRENCY_GROUPS, PairReplica
from dfc_ray import selfcheck
from dfc_ray.attribution import (Attribution, attribute, encode, largest_terms, mean_write, partition_names,
                                 patch_norms)
from dfc_ray.config import JudgeProtocol, SteerConfig
from dfc_ray.evaluate import (Rate, bootstrap_rate, eval_texts, load_crosscoder, paired_delta_pp,
                              score_all)
from dfc_ray.generation import Generation
from dfc_ray.harvest import plain_text_ids
from dfc_ray.interventions import (PairEdit, feature_direction, generate_edited, generate_steered, opening_logprobs,
                                   patch_edit, steering_vector)
from dfc_ray.pair import PairSpec
from dfc_ray.ranking import NO_SIGNAL, FeatureStats, encode_pairs, has_signal, rank_features, separates
from dfc_ray.reference import NO_STEERABLE_DIRECTION, cosines, mean_norm, scale_to_norm, share_of_reference
from dfc_ray.tooluse import Task, get_dialect
from dfc_ray.tooluse.tasks import dev_test_tasks


STEERED_CACHE = 256
"""Steered reply sets a replica keeps (a few MB on the organism): re-scoring, not re-generating."""


@dataclass
class GridCell:
    feature: int
    alpha: float
    dev_correct: float
    """Strict correctness on dev with this feature at this α."""


@dataclass
class ReferenceSteer:
    """The reference direction v (A − B mean residual on dev tool prompts) through the same protocol."""

    target: str
    alpha: float
    """The α chosen on dev (same grid and units as the features)."""
    reference_norm: float
    """‖v‖ in raw residual units."""
    residual_norm: float
    """The target's mean residual norm at the layer (dev tool prompts, last prompt token)."""
    vector_norm: float
    """Norm of the chosen vector added to the residual."""
    dev_clean: float
    grid: list[tuple[float, float]]
    """(α, dev strict correctness) per α."""
    test_clean: Rate
    test_steered: Rate
    delta_pp: Rate
    """TEST: steered − clean strict correctness, pp, paired CI."""
    random_direction_delta_pp: Rate
    """TEST control: a random direction with the chosen vector's norm."""
    significant: bool
    """The delta's 95% CI lies above 0."""
    label: str
    """NO_STEERABLE_DIRECTION when not `significant`, else empty."""
    test_clean_passed: list[bool] = field(default_factory=list)
    """Per test prompt, clean correct (the localisation curve's shares pair their prompts with these)."""
    test_steered_passed: list[bool] = field(default_factory=list)
    """Per test prompt, correct with the reference's chosen vector."""


@dataclass
class TargetSteer:
    """The protocol's outcome for one target model."""

    target: str
    feature: int
    """The feature chosen on dev."""
    alpha: float
    """The α chosen on dev."""
    scale: float
    """The chosen feature's scale (see SteerConfig.scale)."""
    vector_norm: float
    """‖α · scale · d_i‖ in raw residual units."""
    dev_clean: float
    dev_steered: float
    grid: list[GridCell]
    test_clean: Rate
    test_steered: Rate
    delta_pp: Rate
    """TEST: steered − clean strict correctness, pp, paired CI."""
    random_feature: int
    random_feature_delta_pp: Rate
    """TEST control: a random A-exclusive feature at the same α (its own scale)."""
    random_direction_delta_pp: Rate
    """TEST control: a random direction with the chosen vector's norm."""
    min_set: list[int]
    """Greedy minimal feature set (dev); empty when the goal is not reached."""
    min_set_goal_pp: float
    """Required dev gain: min_set_share × |A clean − B clean| on dev, in pp."""
    candidates: dict[str, list[int]] = field(default_factory=dict)
    """Each ranking's top_n features (their union, in `rankings` order, was the α grid's candidates)."""
    tool_logprob_gain: dict[int, float] = field(default_factory=dict)
    """Mean gain in log p(tool token first) on dev tool prompts of the best-scoring features (≤ 10)."""
    cos_reference: float = 0.0
    """Signed cosine of the chosen feature's A decoder direction with the reference direction."""
    reference: ReferenceSteer | None = None
    """The positive control on this target."""
    share_of_reference: float = 0.0
    """delta_pp / reference.delta_pp (reference.share_of_reference: 0 when the reference effect is ≤ 0)."""
    test_clean_passed: list[bool] = field(default_factory=list)
    """Per test prompt, clean correct under the protocol's metric (the ablation pools checkpoints with it)."""
    test_steered_passed: list[bool] = field(default_factory=list)
    """Per test prompt, correct with the chosen (feature, α)."""


@dataclass
class SteerResult:
    """JSON-able via `to_dict`; `metrics()` gives the steer_* trial metrics (docs/ARCHITECTURE.md)."""

    checkpoint: str
    layer: int
    config: dict
    skipped: str
    """Why no steering was done (e.g. a plain crosscoder has no A-exclusive feature); empty otherwise."""
    ranking: list[FeatureStats] = field(default_factory=list)
    """Top A-exclusive features on dev (at most 20), best first."""
    targets: dict[str, TargetSteer] = field(default_factory=dict)
    seconds: float = 0.0
    """Wall-clock seconds the steerer spent on this request (plan.py's measured rates use it)."""
    fast_path_fallbacks: list[str] = field(default_factory=list)
    """Fast paths the steerer's process replaced by their reference after a failed self-check (selfcheck)."""

    def metrics(self) -> dict[str, float | str]:
        """steer_feature, steer_alpha, steer_target, steer_delta_pp, steer_min_set (the primary target)
        plus CIs, controls, the reference's numbers (steer_reference_*, steer_cos_reference,
        steer_share_of_reference), the same per target as steer_<target>_*, and steer_compute_s."""
        out: dict[str, float | str] = {"steer_compute_s": self.seconds}
        primary = self.config.get("primary", "a")
        for name, t in self.targets.items():
            values: dict[str, float | str] = {"feature": t.feature, "alpha": t.alpha, "delta_pp": t.delta_pp.mean,
                      "delta_pp_lo": t.delta_pp.lo, "delta_pp_hi": t.delta_pp.hi,
                      "min_set": len(t.min_set) if t.min_set else -1,
                      "random_feature_pp": t.random_feature_delta_pp.mean,
                      "random_feature_pp_lo": t.random_feature_delta_pp.lo,
                      "random_feature_pp_hi": t.random_feature_delta_pp.hi,
                      "random_direction_pp": t.random_direction_delta_pp.mean,
                      "random_direction_pp_lo": t.random_direction_delta_pp.lo,
                      "random_direction_pp_hi": t.random_direction_delta_pp.hi,
                      "cos_reference": t.cos_reference, "share_of_reference": t.share_of_reference}
            if t.reference is not None:
                r = t.reference
                values |= {"reference_pp": r.delta_pp.mean, "reference_pp_lo": r.delta_pp.lo,
                           "reference_pp_hi": r.delta_pp.hi, "reference_alpha": r.alpha,
                           "reference_random_direction_pp": r.random_direction_delta_pp.mean,
                           "reference_random_direction_pp_lo": r.random_direction_delta_pp.lo,
                           "reference_random_direction_pp_hi": r.random_direction_delta_pp.hi,
                           "reference_sig": int(r.significant), "reference_label": r.label}
            out.update({f"steer_{name}_{k}": v for k, v in values.items()})
            if name == primary:
                out.update({f"steer_{k}": v for k, v in values.items()})
                out["steer_target"] = name
        return out

    def to_dict(self) -> dict:
        return {**asdict(self), "metrics": self.metrics()}


@dataclass
class CurvePoint:
    """The localisation curve at one n: B steered by the top n contributors' mean writes, α as the reference's."""

    n: int
    """The size asked for (SteerConfig.localize_sizes)."""
    features: list[int]
    """The top n terms' features (fewer when fewer terms are positive)."""
    alpha: float
    """The α chosen on dev for this n (the reference's when `localize_alphas` is empty)."""
    vector_norm: float
    dev_delta_pp: float
    """DEV: steered − clean correctness, pp."""
    delta_pp: Rate
    """TEST: steered − clean, pp, paired CI."""
    share: Rate
    """delta_pp / the reference's test effect on the same prompts (paired bootstrap); 0 when the reference's ≤ 0."""


@dataclass
class CausalTest:
    """One causal test of the localisation: the n chosen on dev, its test effect, and a random control of
    the same size and (mean) norm."""

    name: str
    """curve (steer B with mean writes), ablate_b or patch_a (SteerConfig.localize)."""
    target: str
    n: int
    """The size chosen on dev (`features` may hold fewer: the positive terms)."""
    features: list[int]
    dev_delta_pp: list[tuple[int, float]] = field(default_factory=list)
    """DEV: (n, steered/patched − clean, pp) per size tried."""
    delta_pp: Rate | None = None
    """TEST: intervened − clean, pp, paired CI."""
    random_features: list[int] = field(default_factory=list)
    random_delta_pp: Rate | None = None
    """TEST control: as many random features that fire on dev (same pool), resized to the chosen one's norm."""
    skipped: str = ""
    """Why the test did not run (e.g. no B-exclusive feature adds to the difference); empty otherwise."""


@dataclass
class Localization:
    """Where the A − B difference lives in one checkpoint: the attribution and its causal tests."""

    checkpoint: str
    layer: int
    attribution: Attribution
    tests: dict[str, CausalTest] = field(default_factory=dict)
    curve: list[CurvePoint] = field(default_factory=list)
    n50: int = -1
    """The curve's smallest n whose dev effect reaches `localize_share` of the reference's; −1 when none does."""
    reference_pp: Rate | None = None
    """The reference direction's test effect on B (the curve's yardstick)."""
    seconds: float = 0.0

    def metrics(self) -> dict[str, Any]:
        """diff_* (the attribution) and loc_* (the causal tests) trial metrics; lists stay lists."""
        out: dict[str, Any] = self.attribution.metrics() | {"diff_top": self.attribution.top_rows(),
                                                            "loc_compute_s": self.seconds}
        if self.reference_pp is not None:
            out |= {**effect_metrics("loc_reference_pp", self.reference_pp), "loc_n50": self.n50,
                    "loc_curve": [{"n": p.n, "n_features": len(p.features), "alpha": p.alpha,
                                   "dev_pp": p.dev_delta_pp, "pp": p.delta_pp.mean,
                                   "lo": p.delta_pp.lo, "hi": p.delta_pp.hi, "share": p.share.mean,
                                   "share_lo": p.share.lo, "share_hi": p.share.hi} for p in self.curve]}
        for name, test in self.tests.items():
            if test.delta_pp is None or test.random_delta_pp is None:
                continue
            out |= {f"loc_{name}_n": test.n, **effect_metrics(f"loc_{name}_pp", test.delta_pp),
                    **effect_metrics(f"loc_{name}_random_pp", test.random_delta_pp)}
            if name == "curve":
                point = next(p for p in self.curve if p.n == test.n)
                out |= {"loc_curve_alpha": point.alpha, **effect_metrics("loc_curve_share", point.share)}
        return out


def effect_metrics(name: str, rate: Rate) -> dict[str, float]:
    """`name`, `name_lo`, `name_hi` of an effect with its CI."""
    return {name: rate.mean, f"{name}_lo": rate.lo, f"{name}_hi": rate.hi}


def paired_share(clean: Sequence[bool], steered: Sequence[bool], reference: Sequence[bool], n_boot: int = 1000,
                 seed: int = 0) -> Rate:
    """(steered − clean) / (reference − clean) as a share, with a 95% CI from resampling prompts (each keeps its
    three scores together). A resample whose reference effect is ≤ 0 counts 0 (share_of_reference's rule)."""
    if not len(clean) == len(steered) == len(reference) > 0:
        raise ValueError(f"paired share: {len(clean)}, {len(steered)} and {len(reference)} scores; expected one "
                         "triple per prompt")
    base = np.asarray(clean, dtype=np.float64)
    effect, yardstick = np.asarray(steered, dtype=np.float64) - base, np.asarray(reference, dtype=np.float64) - base
    idx = np.random.default_rng(seed).integers(0, len(base), size=(n_boot, len(base)))
    num, den = effect[idx].mean(1), yardstick[idx].mean(1)
    shares = np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)
    point = share_of_reference(float(effect.mean()), float(yardstick.mean()))
    return Rate(point, float(np.percentile(shares, 2.5)), float(np.percentile(shares, 97.5)), len(base))


def greedy_min_set(pool: Sequence[int], gain_of: Callable[[list[int]], float], goal: float, max_size: int) -> list[int]:
    """Smallest set (greedy forward selection) from `pool` whose `gain_of(set)` reaches `goal`; [] if none
    up to `max_size` does. Each round adds the feature that maximizes the gain of the grown set."""
    chosen: list[int] = []
    while len(chosen) < min(max_size, len(pool)):
        gains = {f: gain_of(chosen + [f]) for f in pool if f not in chosen}
        best = max(gains, key=lambda f: (gains[f], -list(pool).index(f)))
        chosen.append(best)
        if gains[best] >= goal:
            return chosen
    return []


class Steerer(PairReplica):
    """In-process steering protocol on a pair (`SteeringActor` is the Ray actor). Clean replies, the
    prompts' prefill and the last-token activations are cached across requests (actors/replica.py)."""

    def __init__(self, pair: PairSpec, cfg: SteerConfig | None = None, shared: PairReplica | None = None):
        super().__init__(pair, shared)
        self.cfg = cfg or SteerConfig()
        self._reference_results: dict[str, ReferenceSteer] = {}
        self._steered: OrderedDict[str, list[Generation]] = OrderedDict()

    def _tasks(self, cfg: SteerConfig) -> tuple[list[Task], list[Task]]:
        """(dev, test); under `steering_selection: same_split` (the seed study's) selection runs on test too."""
        dev, test = dev_test_tasks(cfg.dev_tasks, cfg.test_tasks, cfg.n_dev, cfg.n_test)
        return (test, test) if cfg.protocol.steering_selection == "same_split" else (dev, test)

    def correct(self, target: str, tasks: list[Task], cfg: SteerConfig, layer: int = 0,
                delta: torch.Tensor | None = None) -> list[bool]:
        """Correctness (the protocol's metric) per task of `target`, steered by `delta` at `layer` (clean,
        cached, if None or zero: adding nothing is no intervention, e.g. B's own row of an A-exclusive feature)."""
        prompts = self.prompts(tasks, cfg.protocol.prompt_format)
        if delta is None or not bool(delta.any()):
            gens = self.clean_replies(target, prompts, cfg.generation(), cfg.site.leaves_prefix_alone)
        else:
            gens = self.steered_replies(target, prompts, cfg, layer, delta)
        return [s.passes(cfg.protocol.metric) for s in score_all(tasks, gens, self.dialect)]

    def steered_replies(self, target: str, prompts: list[str], cfg: SteerConfig, layer: int,
                        delta: torch.Tensor) -> list[Generation]:
        """Replies of `target` with `delta` added, kept for the last STEERED_CACHE requests: settings that
        differ only in how replies are scored (the protocol's metric) re-score them instead of re-generating.
        The clean replies are the drafts (`generation.generate`): most steered replies are the clean ones."""
        key = hashlib.sha1(json.dumps([target, layer, cfg.positions, asdict(cfg.generation()), prompts]).encode()
                           + delta.detach().float().cpu().numpy().tobytes()).hexdigest()
        if key in self._steered:
            self._steered.move_to_end(key)
        else:
            clean = self.clean_replies(target, prompts, cfg.generation(), cfg.site.leaves_prefix_alone)
            self._steered[key] = generate_steered(self.model(target), self.tokenizer, prompts,
                                                  self.generation(cfg.generation(), prompts), layer, delta,
                                                  cfg.positions, prefix_cache=self.prefix[target],
                                                  drafts=[g.token_ids for g in clean])
            while len(self._steered) > STEERED_CACHE:
                self._steered.popitem(last=False)
        return self._steered[key]

    def rank(self, cc, layer: int, dev: list[Task], cfg: SteerConfig) -> list[FeatureStats]:
        """A-exclusive features by Cohen's d on dev: tool prompts vs no-tool prompts + plain text."""
        positives, inputs = self.ranking_inputs(dev, cfg)
        x = torch.stack([self.last_residuals(t, inputs, layer, cfg.batch_size) for t in ("a", "b")], dim=1)
        codes = encode_pairs(cc, x)
        return rank_features(codes[:positives], codes[positives:], cc.partition.a_exclusive.cpu())

    def ranking_inputs(self, dev: list[Task], cfg: SteerConfig) -> tuple[int, list[list[int]]]:
        """(how many positives, the ranking's token ids): the dev tool prompts, then the no-tool prompts, rendered
        as the protocol says, then `n_plain` plain texts after the BOS their tokenizer adds (Llama, Gemma, Mistral:
        without it a plain text's last token is read off a sequence the model never saw, a difference from the
        prompts that is not about tools)."""
        positives = self.tool_prompts(dev, cfg)
        prompts = positives + self.prompts([t for t in dev if not t.ground_truth], cfg.protocol.prompt_format)
        texts = eval_texts("organism", cfg.n_plain, cfg.seed + 1) if cfg.n_plain else []
        ids = self.tokenizer(prompts, add_special_tokens=False)["input_ids"] if prompts else []
        return len(positives), ids + plain_text_ids(self.tokenizer, texts)

    def tool_prompts(self, dev: list[Task], cfg: SteerConfig | None = None) -> list[str]:
        """Rendered dev prompts that need a tool (non-empty ground truth): the reference's and the
        residual norm's prompt set, and the ranking's positives (rendered as `cfg`'s protocol says)."""
        return self.prompts([t for t in dev if t.ground_truth], (cfg or self.cfg).protocol.prompt_format)

    def residual_norm(self, target: str, layer: int, dev: list[Task], cfg: SteerConfig) -> float:
        """Mean ‖x_target‖ after block `layer` at the last prompt token of the dev tool prompts (cached inputs)."""
        return mean_norm(self.last_residuals(target, self.tool_prompts(dev, cfg), layer, cfg.batch_size))

    def feature_scales(self, cc, ranking: list[FeatureStats], target: str, layer: int, dev: list[Task],
                       cfg: SteerConfig) -> dict[int, float]:
        """Per feature, the factor `steering_vector` multiplies α × its raw direction by (SteerConfig.scale)."""
        if cfg.scale == "decoder":
            return {s.feature: 1.0 for s in ranking}
        if cfg.scale == "activation":
            fired = [s.typical for s in ranking if s.typical > 0]
            fallback = float(np.mean(fired)) if fired else 1.0
            return {s.feature: s.typical or fallback for s in ranking}
        norm = self.residual_norm(target, layer, dev, cfg)
        lengths = {s.feature: float(self.direction(cc, s.feature, target, cfg).norm()) for s in ranking}
        return {f: norm / length if length > 0 else 0.0 for f, length in lengths.items()}

    def direction(self, cc, feature: int, target: str, cfg: SteerConfig) -> torch.Tensor:
        """The feature's raw direction for `target` under the protocol's `steer_b_via`."""
        return feature_direction(cc, feature, target, cfg.protocol.own_decoder_only)

    def reference_vector(self, v: torch.Tensor, alpha: float, residual_norm: float, cfg: SteerConfig) -> torch.Tensor:
        """α in `scale` units applied to the reference v: α × residual_norm along v̂, or α × v."""
        return scale_to_norm(v, alpha * residual_norm) if cfg.scale == "residual_norm" else float(alpha) * v.float()

    def candidates(self, cc, ranking: list[FeatureStats], v: torch.Tensor, target: str, layer: int,
                   dev: list[Task], scales: dict[int, float],
                   cfg: SteerConfig) -> tuple[dict[str, list[int]], dict[int, float]]:
        """Each configured ranking's top_n features, and the tool_logprob gains of the best-scoring ones. A
        ranking whose statistic ties across its candidates picks none (ranking.has_signal)."""
        picks: dict[str, list[int]] = {}
        gains: dict[int, float] = {}
        if "cohens_d" in cfg.rankings:
            picks["cohens_d"] = [s.feature for s in ranking[:cfg.top_n]] if separates(ranking) else []
        if "cos_reference" in cfg.rankings:
            features = [s.feature for s in ranking]
            cos = cosines(torch.stack([feature_direction(cc, f, "a") for f in features]), v).abs().tolist()
            order = sorted(range(len(features)), key=lambda i: (-cos[i], features[i]))
            picks["cos_reference"] = [features[i] for i in order[:cfg.top_n]] if has_signal(cos, 0.0) else []
        if "tool_logprob" in cfg.rankings:
            pool = [s.feature for s in ranking[:cfg.effect_pool]]
            opening = cfg.tool_token or get_dialect(self.dialect).logprob_text
            tokens = self.tokenizer(opening, add_special_tokens=False)["input_ids"]
            if not tokens:
                raise ValueError(f"SteerConfig.tool_token={opening!r} encodes to no token; expected text the "
                                 "tokenizer maps to at least one token")
            alpha = cfg.scoring_alpha()
            vectors = {f: steering_vector(cc, [f], target, alpha, [scales[f]], cfg.protocol.own_decoder_only)
                       for f in pool}
            moving = [f for f in pool if bool(vectors[f].any())]  # a zero vector changes nothing: gain 0
            logp = opening_logprobs(self.model(target), self.tokenizer, self.tool_prompts(dev, cfg), layer,
                                    [torch.zeros(cc.cfg.d_model)] + [vectors[f] for f in moving], tokens,
                                    cfg.batch_size, self.prefix[target]).mean(1)
            gain = {f: 0.0 for f in pool} | {f: float(logp[i + 1] - logp[0]) for i, f in enumerate(moving)}
            best = sorted(pool, key=lambda f: (-gain[f], f))
            signal = has_signal([gain[f] for f in pool], 0.0)
            picks["tool_logprob"] = best[:cfg.top_n] if signal else []
            gains = {f: gain[f] for f in best[:10]} if signal else {}
        return picks, gains

    def reference(self, target: str, layer: int, dev: list[Task], test: list[Task], cfg: SteerConfig) -> ReferenceSteer:
        """The reference direction through the protocol on `target`: α on dev, report and control on test.
        It does not depend on the checkpoint, so it runs once per (target, layer, tasks, setting) and is cached."""
        setting = {k: v for k, v in asdict(cfg).items()  # the localisation settings do not change the reference
                   if not k.startswith(("localize", "attribution"))}
        for name in ("normalization", "steer_b_via"):  # the reference reads no checkpoint and no decoder row
            setting["protocol"].pop(name)
        key = json.dumps([target, layer, setting], sort_keys=True)
        if key in self._reference_results:
            return self._reference_results[key]
        v = self.reference_direction(self.tool_prompts(dev, cfg), layer, cfg.batch_size)
        norm = self.residual_norm(target, layer, dev, cfg)
        dev_clean = float(np.mean(self.correct(target, dev, cfg)))
        grid = [(a, float(np.mean(self.correct(target, dev, cfg, layer, self.reference_vector(v, a, norm, cfg)))))
                for a in cfg.alphas]
        alpha = max(grid, key=lambda cell: cell[1])[0]  # first best: the smaller α
        chosen = self.reference_vector(v, alpha, norm, cfg)
        test_clean = self.correct(target, test, cfg)
        steered = self.correct(target, test, cfg, layer, chosen)
        control = self.correct(target, test, cfg, layer, random_direction(chosen, cfg.seed))
        boot = dict(n_boot=cfg.n_bootstrap, seed=cfg.seed)
        delta = paired_delta_pp(test_clean, steered, **boot)
        result = ReferenceSteer(
            target=target, alpha=alpha, reference_norm=float(v.norm()), residual_norm=norm,
            vector_norm=float(chosen.norm()), dev_clean=dev_clean, grid=grid,
            test_clean=bootstrap_rate(test_clean, **boot), test_steered=bootstrap_rate(steered, **boot),
            delta_pp=delta, random_direction_delta_pp=paired_delta_pp(test_clean, control, **boot),
            significant=delta.lo > 0, label="" if delta.lo > 0 else NO_STEERABLE_DIRECTION,
            test_clean_passed=test_clean, test_steered_passed=steered)
        self._reference_results[key] = result
        return result

    def stats(self) -> dict[str, object]:
        """The replica's counters, plus how many reference runs it has cached."""
        return super().stats() | {"reference_runs": len(self._reference_results)}

    def steer(self, checkpoint: str, layer: int, cfg: SteerConfig | None = None) -> SteerResult:
        """Run the protocol for `checkpoint` (a folder path) at `layer`."""
        started = time.perf_counter()
        result = self._steer(checkpoint, layer, cfg or self.cfg)
        result.seconds, result.fast_path_fallbacks = time.perf_counter() - started, selfcheck.fallbacks()
        return result

    def _steer(self, checkpoint: str, layer: int, cfg: SteerConfig) -> SteerResult:
        cc = load_crosscoder(checkpoint, self.device, cfg.protocol.normalization)
        result = SteerResult(str(checkpoint), layer, asdict(cfg), skipped="")
        if cc.cfg.n_a_exclusive == 0:
            result.skipped = "the crosscoder has no A-exclusive features"
            return result
        dev, test = self._tasks(cfg)
        ranking = self.rank(cc, layer, dev, cfg)
        result.ranking = ranking[:20] if separates(ranking) else []  # a tie broken by index ranks nothing
        v = self.reference_direction(self.tool_prompts(dev, cfg), layer, cfg.batch_size)
        boot = dict(n_boot=cfg.n_bootstrap, seed=cfg.seed)
        clean_gap = abs(np.mean(self.correct("a", dev, cfg)) - np.mean(self.correct("b", dev, cfg)))
        rng = np.random.default_rng(cfg.seed)
        for target in cfg.targets:
            scale = self.feature_scales(cc, ranking, target, layer, dev, cfg)

            def vector(features: list[int], alpha: float) -> torch.Tensor:
                return steering_vector(cc, features, target, alpha, [scale[f] for f in features],
                                       cfg.protocol.own_decoder_only)

            picks, gains = self.candidates(cc, ranking, v, target, layer, dev, scale, cfg)
            union = list(dict.fromkeys(f for r in cfg.rankings for f in picks[r]))
            if not union:  # every ranking tied: no chosen feature, nothing steered on it
                result.skipped, result.targets = NO_SIGNAL, {}
                return result
            dev_clean = float(np.mean(self.correct(target, dev, cfg)))
            grid = [GridCell(f, a, float(np.mean(self.correct(target, dev, cfg, layer, vector([f], a)))))
                    for f in union for a in cfg.alphas]
            best = max(grid, key=lambda c: c.dev_correct)  # first best: earlier candidate, then smaller α
            chosen = vector([best.feature], best.alpha)
            test_clean = self.correct(target, test, cfg)
            steered = self.correct(target, test, cfg, layer, chosen)
            others = [s.feature for s in ranking if s.feature != best.feature] or [best.feature]
            random_feature = int(rng.choice(others))
            control_f = self.correct(target, test, cfg, layer, vector([random_feature], best.alpha))
            control_d = self.correct(target, test, cfg, layer, random_direction(chosen, cfg.seed))
            pool = [s.feature for s in ranking[:cfg.min_set_pool]]
            goal = cfg.min_set_share * clean_gap
            min_set = greedy_min_set(
                pool, lambda fs: float(np.mean(self.correct(target, dev, cfg, layer, vector(fs,
                                                                                            best.alpha)))) - dev_clean,
                goal, cfg.min_set_max) if clean_gap > 0 else []
            delta = paired_delta_pp(test_clean, steered, **boot)
            reference = self.reference(target, layer, dev, test, cfg)
            result.targets[target] = TargetSteer(
                target=target, feature=best.feature, alpha=best.alpha, scale=scale[best.feature],
                vector_norm=float(chosen.norm()), dev_clean=dev_clean, dev_steered=best.dev_correct, grid=grid,
                test_clean=bootstrap_rate(test_clean, **boot), test_steered=bootstrap_rate(steered, **boot),
                delta_pp=delta, random_feature=random_feature,
                random_feature_delta_pp=paired_delta_pp(test_clean, control_f, **boot),
                random_direction_delta_pp=paired_delta_pp(test_clean, control_d, **boot),
                min_set=min_set, min_set_goal_pp=100 * goal, candidates=picks, tool_logprob_gain=gains,
                cos_reference=float(cosines(feature_direction(cc, best.feature, "a")[None], v)[0]),
                reference=reference, share_of_reference=share_of_reference(delta.mean, reference.delta_pp.mean),
                test_clean_passed=test_clean, test_steered_passed=steered)
        return result

    # ---- where the difference lives (issue 21) -----------------------------------------------------------

    def localize(self, checkpoint: str, layer: int, cfg: SteerConfig | None = None) -> Localization:
        """Attribute the reference direction to the checkpoint's features on the dev tool prompts (at the
        last prompt token, where the reference and the steering live) and run `cfg.localize`'s causal tests
        (on DFCs that match `cfg.localize_when`)."""
        started = time.perf_counter()
        cfg = cfg or self.cfg
        cc = load_crosscoder(checkpoint, self.device)
        dev, test = self._tasks(cfg)
        prompts = self.tool_prompts(dev, cfg)
        x = torch.stack([self.last_residuals(t, prompts, layer, cfg.batch_size) for t in ("a", "b")], dim=1)
        attribution = attribute(cc, x, cfg.attribution_top)
        result = Localization(str(checkpoint), layer, attribution)
        exclusive = cc.cfg.n_a_exclusive + cc.cfg.n_b_exclusive > 0
        if not exclusive or any(getattr(cc.cfg, k) != v for k, v in cfg.localize_when.items()):
            result.seconds = time.perf_counter() - started
            return result  # the attribution only (SteerConfig.localize_when)
        if "curve" in cfg.localize:
            self._curve(cc, attribution, result, layer, dev, test, cfg)
        codes = encode(cc, x.to(self.device)).cpu()  # the patches' norms are matched on these prompts
        partitions = partition_names(cc)
        firing = [j for j, f in enumerate(attribution.mean_activations) if f > 0]
        largest = max(cfg.localize_sizes, default=0)
        if "ablate_b" in cfg.localize:
            pool = [j for j in firing if partitions[j] == "b_exclusive"]
            ranked = largest_terms(attribution, largest, pool)
            result.tests["ablate_b"] = self._patch_test("ablate_b", "b", cc, codes, ranked, pool, firing, max, layer,
                                                        dev, test, cfg)
        if "patch_a" in cfg.localize:
            ranked = largest_terms(attribution, largest)
            result.tests["patch_a"] = self._patch_test("patch_a", "a", cc, codes, ranked, firing, firing, min, layer,
                                                       dev, test, cfg)
        result.seconds = time.perf_counter() - started
        return result

    def _sized_sets(self, ranked: list[int], cfg: SteerConfig, distinct: bool = False) -> list[tuple[int, list[int]]]:
        """(n, the top n of `ranked`) for each n of localize_sizes (fewer terms than n: all of them); `distinct`
        drops a set equal to the one before (a repeated steering vector is free: its replies are cached)."""
        sets: list[tuple[int, list[int]]] = []
        for n in sorted(set(cfg.localize_sizes)):
            chosen = ranked[:n]
            if chosen and not (distinct and sets and sets[-1][1] == chosen):
                sets.append((n, chosen))
        return sets

    def _random_set(self, pool: list[int], chosen: list[int], firing: list[int], cfg: SteerConfig,
                    salt: int) -> list[int]:
        """As many features as `chosen`, drawn (seeded) from `pool` without the chosen ones, topped up from the
        other `firing` features when `pool` has too few."""
        rng = np.random.default_rng([cfg.seed, salt])
        drawn: list[int] = []
        for source in (pool, firing):
            others = [j for j in source if j not in chosen and j not in drawn]
            size = min(len(chosen) - len(drawn), len(others))
            drawn += [int(j) for j in rng.choice(others, size=size, replace=False)] if size > 0 else []
        return sorted(drawn)

    def _curve(self, cc, attribution: Attribution, result: Localization, layer: int, dev: list[Task],
               test: list[Task], cfg: SteerConfig) -> None:
        """B ← A: B steered by Σ_{top n} mean[f_j]·(d_j^A − d_j^B) at the reference's calibration, per n; the
        n reaching `localize_share` of the reference's dev effect (else the best on dev) gets the control."""
        reference = self.reference("b", layer, dev, test, cfg)
        result.reference_pp = reference.delta_pp
        sets = self._sized_sets(largest_terms(attribution, max(cfg.localize_sizes)), cfg)
        if not sets:
            result.tests["curve"] = CausalTest("curve", "b", 0, [], skipped="no feature adds to the difference")
            return
        norm = self.residual_norm("b", layer, dev, cfg)
        dev_clean = float(np.mean(self.correct("b", dev, cfg)))
        reference_dev = dict(reference.grid)[reference.alpha] - dev_clean
        boot = dict(n_boot=cfg.n_bootstrap, seed=cfg.seed)
        test_clean = reference.test_clean_passed
        vectors, points = [], []
        for n, features in sets:
            write = mean_write(cc, attribution, features)
            grid = [(a, float(np.mean(self.correct("b", dev, cfg, layer, self.reference_vector(write, a, norm, cfg)))))
                    for a in cfg.localize_alphas or (reference.alpha,)]
            alpha, dev_correct = max(grid, key=lambda cell: cell[1])  # first best: the smaller α
            vector = self.reference_vector(write, alpha, norm, cfg)
            steered = self.correct("b", test, cfg, layer, vector)
            vectors.append(vector)
            points.append(CurvePoint(n, features, alpha, float(vector.norm()),
                                     100 * (dev_correct - dev_clean), paired_delta_pp(test_clean, steered, **boot),
                                     paired_share(test_clean, steered, reference.test_steered_passed, **boot)))
        result.curve = points
        reached = [i for i, p in enumerate(points)
                   if reference_dev > 0 and p.dev_delta_pp >= 100 * cfg.localize_share * reference_dev]
        # none reached: the best on dev, ties to the larger set (its test then bounds what the whole set does)
        best = reached[0] if reached else max(range(len(points)), key=lambda i: (points[i].dev_delta_pp, i))
        result.n50 = points[reached[0]].n if reached else -1
        firing = [j for j, f in enumerate(attribution.mean_activations) if f > 0]
        random_features = self._random_set(firing, points[best].features, firing, cfg, salt=1)
        control = scale_to_norm(mean_write(cc, attribution, random_features), float(vectors[best].norm()))
        result.tests["curve"] = CausalTest(
            "curve", "b", points[best].n, points[best].features, [(p.n, p.dev_delta_pp) for p in points],
            points[best].delta_pp, random_features,
            paired_delta_pp(test_clean, self.correct("b", test, cfg, layer, control), **boot))

    def _patch_test(self, name: str, target: str, cc, codes: torch.Tensor, ranked: list[int], pool: list[int],
                    firing: list[int], pick: Callable, layer: int, dev: list[Task], test: list[Task],
                    cfg: SteerConfig) -> CausalTest:
        """Patch the top n of `ranked` in `target` (interventions.patch_edit) per size on dev, choose the n whose
        dev effect `pick` (max: the largest gain, min: the largest loss) prefers, report it and a random
        control from `pool` (topped up from `firing`) of the same size, resized to the same mean patch norm
        on the dev tool prompts."""
        sets = self._sized_sets(ranked, cfg, distinct=True)
        if not sets:
            return CausalTest(name, target, 0, [], skipped="no such feature adds to the difference")
        dev_clean = float(np.mean(self.edited_correct(target, dev, cfg, layer)))
        dev_deltas = [100 * (float(np.mean(self.edited_correct(target, dev, cfg, layer, patch_edit(cc, target, f))))
                             - dev_clean) for _, f in sets]
        best = pick(dev_deltas)
        n, chosen = sets[max(i for i, d in enumerate(dev_deltas) if d == best)]  # ties: the larger set
        random_features = self._random_set(pool, chosen, firing, cfg, salt=2 if target == "b" else 3)
        random_norm = float(patch_norms(cc, codes, random_features).mean()) if random_features else 0.0
        scale = float(patch_norms(cc, codes, chosen).mean()) / random_norm if random_norm > 0 else 0.0
        boot = dict(n_boot=cfg.n_bootstrap, seed=cfg.seed)
        clean = self.edited_correct(target, test, cfg, layer)
        patched = self.edited_correct(target, test, cfg, layer, patch_edit(cc, target, chosen))
        control = self.edited_correct(target, test, cfg, layer, patch_edit(cc, target, random_features, scale))
        return CausalTest(name, target, n, chosen, [(size, d) for (size, _), d in zip(sets, dev_deltas)],
                          paired_delta_pp(clean, patched, **boot), random_features,
                          paired_delta_pp(clean, control, **boot))

    def edited_correct(self, target: str, tasks: list[Task], cfg: SteerConfig, layer: int,
                       edit: PairEdit | None = None) -> list[bool]:
        """Correctness per task of `target` with a pair edit (interventions.patch_edit) at the last prompt token
        of block `layer`; clean (cached, through the prefix cache as the edited replies are) when `edit` is None,
        and the edited replies' drafts otherwise."""
        prompts = self.prompts(tasks, cfg.protocol.prompt_format)
        gens = self.clean_replies(target, prompts, cfg.generation(), True)
        if edit is not None:
            other = "b" if target == "a" else "a"
            last = list(self.last_residuals(other, prompts, layer, cfg.batch_size)[:, None])  # (1, d) per prompt
            gens = generate_edited(self.model(target), self.model(other), self.tokenizer, prompts, cfg.generation(),
                                   layer, edit, target, other=last, prefix_cache=self.prefix[target],
                                   drafts=[g.token_ids for g in gens])
        return [s.passes(cfg.protocol.metric) for s in score_all(tasks, gens, self.dialect)]


def random_direction(like: torch.Tensor, seed: int) -> torch.Tensor:
    """A seeded Gaussian direction with `like`'s norm, device and dtype (the random-direction control)."""
    direction = torch.randn(like.shape[-1], generator=torch.Generator().manual_seed(seed))
    return (direction * like.float().norm().cpu() / direction.norm()).to(like.device, like.dtype)

SteeringActor = ray.remote(concurrency_groups=CONCURRENCY_GROUPS)(Steerer)  # type: ignore[call-overload]  # ray stubs lack the kwarg form
"""The Ray actor: `SteeringActor.options(num_gpus=1).remote(pair, cfg)`; see actors/pool.py for named pools."""


def print_steer(result: SteerResult) -> None:

    console = Console()
    if result.skipped:
        console.print(f"steering skipped: {result.skipped}")
        return
    protocol = JudgeProtocol(**result.config["protocol"])
    chosen_on = "test" if protocol.steering_selection == "same_split" else "dev"
    ranking = Table(title=f"A-exclusive features on {chosen_on} (last prompt token): tool vs no-tool prompts "
                          f"(protocol: {protocol.label()})")
    for col in ("feature", "Cohen's d", "AUROC", "fires on tool", "fires on other", "typical act"):
        ranking.add_column(col, justify="right")
    for s in result.ranking[:10]:
        ranking.add_row(str(s.feature), f"{s.cohens_d:.2f}", f"{s.auroc:.3f}", f"{s.fire_pos:.0%}",
                        f"{s.fire_neg:.0%}", f"{s.typical:.3g}")
    console.print(ranking)
    table = Table(title=f"steering on test (feature and α chosen on {chosen_on}), pp [95% CI]")
    for col in ("target", "feature", "α", "clean %", "steered %", "Δ pp", "random feature Δ", "random dir Δ",
                "min set", "cos to ref", "share of ref"):
        table.add_column(col, justify="right")
    for t in result.targets.values():
        table.add_row(t.target, str(t.feature), f"{t.alpha:g}", f"{100 * t.test_clean.mean:.1f}",
                      f"{100 * t.test_steered.mean:.1f}",
                      f"{t.delta_pp.mean:+.1f} [{t.delta_pp.lo:+.1f}, {t.delta_pp.hi:+.1f}]",
                      f"{t.random_feature_delta_pp.mean:+.1f}", f"{t.random_direction_delta_pp.mean:+.1f}",
                      str(t.min_set) if t.min_set else f"not reached (goal +{t.min_set_goal_pp:.1f} pp)",
                      f"{t.cos_reference:+.2f}", f"{t.share_of_reference:.2f}")
    console.print(table)
    reference = Table(title=f"reference direction v = mean(x_A − x_B) on {chosen_on} tool prompts, same protocol, "
                            "pp [95% CI]")
    for col in ("target", "‖v‖", "mean ‖x‖", "α", "‖α v‖", "clean %", "steered %", "Δ pp", "random dir Δ", "label"):
        reference.add_column(col, justify="right")
    for t in result.targets.values():
        r = t.reference
        if r is not None:
            reference.add_row(t.target, f"{r.reference_norm:.1f}", f"{r.residual_norm:.1f}", f"{r.alpha:g}",
                              f"{r.vector_norm:.1f}", f"{100 * r.test_clean.mean:.1f}",
                              f"{100 * r.test_steered.mean:.1f}",
                              f"{r.delta_pp.mean:+.1f} [{r.delta_pp.lo:+.1f}, {r.delta_pp.hi:+.1f}]",
                              f"{r.random_direction_delta_pp.mean:+.1f}", r.label or "steerable")
    console.print(reference)
    for t in result.targets.values():
        console.print(f"candidates for {t.target}: " + "; ".join(f"{k}: {v}" for k, v in t.candidates.items()))
    console.print(f"{result.seconds:.1f} s")
