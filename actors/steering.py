"""SteeringActor: does adding an A-exclusive feature's direction make a model call tools correctly?

Protocol (docs/evaluation.md), built to avoid the seed study's weakness 5 (selection and report on
the same 40 prompts, best grid cell reported):
1. rank the A-exclusive features on the DEV split (ranking.py: Cohen's d at the last prompt token);
2. for each target model, sweep α over a grid for the top-N features on DEV; pick the best cell;
3. report that single (feature, α) on the disjoint TEST split: clean vs steered, paired 95% CI;
4. controls on TEST at the same α: a random A-exclusive feature, and a random direction of the
   chosen vector's norm;
5. the minimal steerable set on DEV: the smallest set of top features whose joint steering closes a
   target share of the A–B clean gap (greedy forward selection).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import numpy as np
import ray
import torch
from rich.console import Console
from rich.table import Table

from actors.replica import PairReplica
from dfc_ray.config import SteerConfig
from dfc_ray.evaluate import Rate, bootstrap_rate, eval_texts, load_crosscoder, paired_delta_pp, score_all
from dfc_ray.interventions import generate_steered, steering_vector
from dfc_ray.pair import PairSpec
from dfc_ray.ranking import FeatureStats, encode_pairs, rank_features
from dfc_ray.tooluse import Task, load_tasks, render_prompt


@dataclass
class GridCell:
    feature: int
    alpha: float
    dev_correct: float
    """Strict correctness on dev with this feature at this α."""


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

    def metrics(self) -> dict[str, float | str]:
        """steer_feature, steer_alpha, steer_target, steer_delta_pp, steer_min_set (the primary target)
        plus CIs and controls, and the same per target as steer_<target>_*, and steer_compute_s."""
        out: dict[str, float | str] = {"steer_compute_s": self.seconds}
        primary = self.config.get("primary", "a")
        for name, t in self.targets.items():
            values = {"feature": t.feature, "alpha": t.alpha, "delta_pp": t.delta_pp.mean,
                      "delta_pp_lo": t.delta_pp.lo, "delta_pp_hi": t.delta_pp.hi,
                      "min_set": len(t.min_set) if t.min_set else -1,
                      "random_feature_pp": t.random_feature_delta_pp.mean,
                      "random_direction_pp": t.random_direction_delta_pp.mean}
            out.update({f"steer_{name}_{k}": v for k, v in values.items()})
            if name == primary:
                out.update({f"steer_{k}": v for k, v in values.items()})
                out["steer_target"] = name
        return out

    def to_dict(self) -> dict:
        return {**asdict(self), "metrics": self.metrics()}


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

    def __init__(self, pair: PairSpec, cfg: SteerConfig | None = None):
        super().__init__(pair)
        self.cfg = cfg or SteerConfig()

    def _tasks(self, cfg: SteerConfig) -> tuple[list[Task], list[Task]]:
        dev, test = load_tasks(cfg.dev_tasks), load_tasks(cfg.test_tasks)
        dev, test = dev[:cfg.n_dev] if cfg.n_dev else dev, test[:cfg.n_test] if cfg.n_test else test
        prompts = {json.dumps(t.messages, sort_keys=True) for t in dev}
        if not dev or not test or any(json.dumps(t.messages, sort_keys=True) in prompts for t in test):
            raise ValueError(f"steering: dev_tasks={cfg.dev_tasks!r} and test_tasks={cfg.test_tasks!r} must be "
                             "non-empty and share no prompt")
        return dev, test

    def correct(self, target: str, tasks: list[Task], cfg: SteerConfig, layer: int = 0,
                delta: torch.Tensor | None = None) -> list[bool]:
        """Strict correctness per task of `target`, steered by `delta` at `layer` (clean if None, cached)."""
        prompts = [render_prompt(self.tokenizer, t) for t in tasks]
        if delta is None:
            gens = self.clean_replies(target, prompts, cfg.generation(), cfg.site.leaves_prefix_alone)
        else:
            gens = generate_steered(self.model(target), self.tokenizer, prompts, cfg.generation(), layer, delta,
                                    cfg.positions, prefix_cache=self.prefix[target])
        return [s.correct for s in score_all(tasks, gens)]

    def rank(self, cc, layer: int, dev: list[Task], cfg: SteerConfig) -> list[FeatureStats]:
        """A-exclusive features by Cohen's d on dev: tool prompts vs no-tool prompts + plain text."""
        pos = [render_prompt(self.tokenizer, t) for t in dev if t.ground_truth]
        neg = [render_prompt(self.tokenizer, t) for t in dev if not t.ground_truth]
        neg += eval_texts("organism", cfg.n_plain, cfg.seed + 1) if cfg.n_plain else []
        x = torch.stack([self.last_residuals(t, pos + neg, layer, cfg.batch_size) for t in ("a", "b")], dim=1)
        codes = encode_pairs(cc, x)
        return rank_features(codes[:len(pos)], codes[len(pos):], cc.partition.a_exclusive.cpu())

    def steer(self, checkpoint: str, layer: int, cfg: SteerConfig | None = None) -> SteerResult:
        """Run the protocol for `checkpoint` (a folder path) at `layer`."""
        started = time.perf_counter()
        result = self._steer(checkpoint, layer, cfg or self.cfg)
        result.seconds = time.perf_counter() - started
        return result

    def _steer(self, checkpoint: str, layer: int, cfg: SteerConfig) -> SteerResult:
        cc = load_crosscoder(checkpoint, self.device)
        result = SteerResult(str(checkpoint), layer, asdict(cfg), skipped="")
        if cc.cfg.n_a_exclusive == 0:
            result.skipped = "the crosscoder has no A-exclusive features"
            return result
        dev, test = self._tasks(cfg)
        ranking = self.rank(cc, layer, dev, cfg)
        result.ranking = ranking[:20]
        fired = [s.typical for s in ranking if s.typical > 0]
        fallback = float(np.mean(fired)) if fired else 1.0
        scale = {s.feature: (s.typical or fallback) if cfg.scale == "activation" else 1.0 for s in ranking}
        boot = dict(n_boot=cfg.n_bootstrap, seed=cfg.seed)
        clean_gap = abs(np.mean(self.correct("a", dev, cfg)) - np.mean(self.correct("b", dev, cfg)))
        rng = np.random.default_rng(cfg.seed)
        for target in cfg.targets:
            def vector(features: list[int], alpha: float) -> torch.Tensor:
                return steering_vector(cc, features, target, alpha, [scale[f] for f in features])

            dev_clean = float(np.mean(self.correct(target, dev, cfg)))
            grid = [GridCell(s.feature, a, float(np.mean(self.correct(target, dev, cfg, layer, vector([s.feature],
                                                                                                      a)))))
                    for s in ranking[:cfg.top_n] for a in cfg.alphas]
            best = max(grid, key=lambda c: c.dev_correct)  # first best: higher-ranked feature, then smaller α
            chosen = vector([best.feature], best.alpha)
            test_clean = self.correct(target, test, cfg)
            steered = self.correct(target, test, cfg, layer, chosen)
            others = [s.feature for s in ranking if s.feature != best.feature] or [best.feature]
            random_feature = int(rng.choice(others))
            random_dir = torch.randn(cc.cfg.d_model, generator=torch.Generator().manual_seed(cfg.seed))
            random_dir = random_dir.to(chosen.device) * chosen.norm() / random_dir.norm()
            control_f = self.correct(target, test, cfg, layer, vector([random_feature], best.alpha))
            control_d = self.correct(target, test, cfg, layer, random_dir)
            pool = [s.feature for s in ranking[:cfg.min_set_pool]]
            goal = cfg.min_set_share * clean_gap
            min_set = greedy_min_set(
                pool, lambda fs: float(np.mean(self.correct(target, dev, cfg, layer, vector(fs,
                                                                                            best.alpha)))) - dev_clean,
                goal, cfg.min_set_max) if clean_gap > 0 else []
            result.targets[target] = TargetSteer(
                target=target, feature=best.feature, alpha=best.alpha, scale=scale[best.feature],
                vector_norm=float(chosen.norm()), dev_clean=dev_clean, dev_steered=best.dev_correct, grid=grid,
                test_clean=bootstrap_rate(test_clean, **boot), test_steered=bootstrap_rate(steered, **boot),
                delta_pp=paired_delta_pp(test_clean, steered, **boot), random_feature=random_feature,
                random_feature_delta_pp=paired_delta_pp(test_clean, control_f, **boot),
                random_direction_delta_pp=paired_delta_pp(test_clean, control_d, **boot),
                min_set=min_set, min_set_goal_pp=100 * goal)
        return result

SteeringActor = ray.remote(Steerer)
"""The Ray actor: `SteeringActor.options(num_gpus=1).remote(pair, cfg)`; see actors/pool.py for named pools."""


def print_steer(result: SteerResult) -> None:

    console = Console()
    if result.skipped:
        console.print(f"steering skipped: {result.skipped}")
        return
    ranking = Table(title="A-exclusive features on dev (last prompt token): tool vs no-tool prompts")
    for col in ("feature", "Cohen's d", "AUROC", "fires on tool", "fires on other", "typical act"):
        ranking.add_column(col, justify="right")
    for s in result.ranking[:10]:
        ranking.add_row(str(s.feature), f"{s.cohens_d:.2f}", f"{s.auroc:.3f}", f"{s.fire_pos:.0%}",
                        f"{s.fire_neg:.0%}", f"{s.typical:.3g}")
    console.print(ranking)
    table = Table(title="steering on test (feature and α chosen on dev), pp [95% CI]")
    for col in ("target", "feature", "α", "clean %", "steered %", "Δ pp", "random feature Δ", "random dir Δ",
                "min set"):
        table.add_column(col, justify="right")
    for t in result.targets.values():
        table.add_row(t.target, str(t.feature), f"{t.alpha:g}", f"{100 * t.test_clean.mean:.1f}",
                      f"{100 * t.test_steered.mean:.1f}",
                      f"{t.delta_pp.mean:+.1f} [{t.delta_pp.lo:+.1f}, {t.delta_pp.hi:+.1f}]",
                      f"{t.random_feature_delta_pp.mean:+.1f}", f"{t.random_direction_delta_pp.mean:+.1f}",
                      str(t.min_set) if t.min_set else f"not reached (goal +{t.min_set_goal_pp:.1f} pp)")
    console.print(table)
