"""Evaluation numbers of a crosscoder checkpoint: tool correctness clean vs spliced, splice loss, CIs.

The actors (actors/evaluator.py, actors/steering.py) host the pair and call these functions; this
module also holds the `dfc-ray eval` and `dfc-ray steer` commands, which run them in-process or
through the actors on Ray (`--ray`).

Rates are fractions in [0, 1]; deltas are percentage points (pp). Every rate carries a 95% percentile
bootstrap CI over prompts; a delta's CI is a PAIRED bootstrap (the same resampled prompts before and
after), since clean and intervened replies come from the same prompts.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np
import torch

from dfc_ray.crosscoder import DedicatedFeatureCrosscoder
from dfc_ray.generation import Generation, GenerationConfig, HookContext, residual_hooks
from dfc_ray.interventions import (SPLICE_MODES, STEER_RANKINGS, STEER_SCALES, prefill_edit_hook, prompt_activations,
                                   splice_edit)
from dfc_ray.pair import PairSpec
from dfc_ray.tooluse import Score, Task, score


@dataclass(frozen=True)
class EvalConfig:
    """What an evaluation runs: tasks, text sample, splice mode, generation and bootstrap settings."""

    tasks: str = "organism:test"
    """`load_tasks` source of the tool-use tasks scored for correctness."""
    n_tasks: int = 0
    """Use the first n tasks (0 = all)."""
    texts: str = "organism"
    """Plain text for the splice loss/KL: ``organism`` (the organism's corpus), or a .txt file (one text a line)."""
    n_texts: int = 64
    """How many texts for the splice loss (0 = skip the loss)."""
    splice_mode: str = "last_prompt_token"
    """Where the reconstruction replaces the residual: last_prompt_token (the study's protocol),
    prompt (every prompt token) or lockstep (every position, generated ones too)."""
    max_new_tokens: int = 64
    """Reply length limit."""
    batch_size: int = 32
    """Prompts per generation batch (results do not depend on it)."""
    n_bootstrap: int = 1000
    """Bootstrap resamples for the 95% CIs."""
    seed: int = 0
    """Bootstrap seed (and the organism text seed offset)."""

    def __post_init__(self) -> None:
        if self.splice_mode not in SPLICE_MODES:
            raise ValueError(f"EvalConfig.splice_mode={self.splice_mode!r}: expected one of {list(SPLICE_MODES)}")
        for name in ("n_tasks", "n_texts"):
            if getattr(self, name) < 0:
                raise ValueError(f"EvalConfig.{name}={getattr(self, name)}: expected an integer >= 0")
        for name in ("max_new_tokens", "batch_size", "n_bootstrap"):
            if getattr(self, name) < 1:
                raise ValueError(f"EvalConfig.{name}={getattr(self, name)}: expected an integer >= 1")

    def generation(self) -> GenerationConfig:
        """Greedy decoding: a reply is a function of the prompt, so clean outputs can be cached."""
        return GenerationConfig(max_new_tokens=self.max_new_tokens, batch_size=self.batch_size)


@dataclass
class Rate:
    """A mean with its 95% bootstrap CI."""

    mean: float
    lo: float
    hi: float
    n: int
    """Number of prompts (or texts) it is computed over."""


@dataclass
class ToolRates:
    """Tool-use scores of one model under one condition (docs/tooluse.md for each criterion)."""

    correct: Rate
    """Strict: BFCL-AST semantics against the ground truth."""
    lenient: Rate
    """The seed study's rule (a called name is among the offered tools)."""
    format_ok: Rate
    """The reply parses as well-formed tool call(s) (or no call where none is expected)."""
    name_ok: Rate
    """The called names are the expected ones."""


@dataclass
class SpliceLoss:
    """Next-token loss on plain text with the target's residual replaced by the reconstruction
    at EVERY position; per-text means, in nats per token."""

    ce_clean: Rate
    ce_splice: Rate
    kl: Rate
    """KL(clean ‖ spliced) of the next-token distributions."""


@dataclass
class EvalResult:
    """Everything `Evaluator.evaluate` measures for one checkpoint; JSON-able via `to_dict`."""

    checkpoint: str
    layer: int
    config: dict[str, Any]
    a_clean: ToolRates
    a_splice: ToolRates
    b_clean: ToolRates
    b_splice: ToolRates
    delta_a_pp: Rate
    """Paired splice − clean strict correctness of A, in pp."""
    delta_b_pp: Rate
    """Paired splice − clean strict correctness of B, in pp."""
    loss_a: SpliceLoss | None
    loss_b: SpliceLoss | None
    clean_cached: bool
    """True when the clean replies came from the evaluator's cache (not regenerated)."""
    seconds: float = 0.0
    """Wall-clock seconds the evaluator spent on this request (plan.py's measured rates use it)."""

    def metrics(self) -> dict[str, float]:
        """DESIGN's trial metrics (strict correctness) plus lenient rates, CIs and splice loss."""
        out = {"a_clean": self.a_clean.correct.mean, "a_splice": self.a_splice.correct.mean,
               "delta_a_pp": self.delta_a_pp.mean, "b_clean": self.b_clean.correct.mean,
               "b_splice": self.b_splice.correct.mean, "delta_b_pp": self.delta_b_pp.mean, "eval_compute_s": self.seconds}
        for name in ("delta_a_pp", "delta_b_pp"):
            out[f"{name}_lo"], out[f"{name}_hi"] = getattr(self, name).lo, getattr(self, name).hi
        for name in ("a_clean", "a_splice", "b_clean", "b_splice"):
            out[f"{name}_lenient"] = getattr(self, name).lenient.mean
        for name in ("loss_a", "loss_b"):
            loss = getattr(self, name)
            if loss is not None:
                out[f"{name}_ce_clean"], out[f"{name}_ce_splice"] = loss.ce_clean.mean, loss.ce_splice.mean
                out[f"{name}_kl"] = loss.kl.mean
        return out

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "metrics": self.metrics()}


# ---------------------------------------------------------------- statistics


def bootstrap_rate(values: Sequence[float], n_boot: int = 1000, seed: int = 0, scale: float = 1.0) -> Rate:
    """Mean of `values` × scale with a 95% percentile bootstrap CI (resampling the values)."""
    v = np.asarray(values, dtype=np.float64) * scale
    if len(v) == 0:
        raise ValueError("bootstrap: no values; expected at least one prompt")
    idx = np.random.default_rng(seed).integers(0, len(v), size=(n_boot, len(v)))
    means = v[idx].mean(1)
    return Rate(float(v.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5)), len(v))


def paired_delta_pp(before: Sequence[bool], after: Sequence[bool], n_boot: int = 1000, seed: int = 0) -> Rate:
    """after − before in percentage points, CI by resampling prompts (pairs stay together)."""
    if len(before) != len(after):
        raise ValueError(f"paired delta: {len(before)} vs {len(after)} scores; expected one pair per prompt")
    diff = np.asarray(after, dtype=np.float64) - np.asarray(before, dtype=np.float64)
    return bootstrap_rate(diff, n_boot, seed, scale=100.0)


def tool_rates(scores: Sequence[Score], n_boot: int = 1000, seed: int = 0) -> ToolRates:
    return ToolRates(*(bootstrap_rate([getattr(s, name) for s in scores], n_boot, seed)
                       for name in ("correct", "lenient", "format_ok", "name_ok")))


def score_all(tasks: Sequence[Task], generations: Sequence[Generation]) -> list[Score]:
    return [score(task, gen.text) for task, gen in zip(tasks, generations, strict=True)]


# ---------------------------------------------------------------- inputs


def load_crosscoder(path: str, device: str | torch.device) -> DedicatedFeatureCrosscoder:
    """A checkpoint in eval mode (BatchTopK uses its inference threshold) on `device`."""
    return DedicatedFeatureCrosscoder.load(path, device=device).eval()


def eval_tasks(cfg: EvalConfig) -> list[Task]:
    from dfc_ray.tooluse import load_tasks

    tasks = load_tasks(cfg.tasks)
    tasks = tasks[:cfg.n_tasks] if cfg.n_tasks else tasks
    if not tasks:
        raise ValueError(f"EvalConfig.tasks={cfg.tasks!r}: no tasks; expected at least one")
    return tasks


def eval_texts(source: str, n: int, seed: int) -> list[str]:
    """Plain texts for the splice loss; the organism's are drawn with a seed the harvest does not use."""
    from dfc_ray.harvest import plain_texts

    return plain_texts(source, n, seed + 10_007)


# ---------------------------------------------------------------- splice loss


def splice_loss_per_text(target_model: torch.nn.Module, other_model: torch.nn.Module, tokenizer,
                         texts: Sequence[str], cc: DedicatedFeatureCrosscoder, layer: int, target: str,
                         batch_size: int = 32) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(clean CE, spliced CE, KL(clean ‖ spliced)) per text, averaged over its next-token predictions."""
    from dfc_ray.harvest import Record, left_pad

    device = next(target_model.parameters()).device
    encoded = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    edit = splice_edit(cc, target)
    ce_clean, ce_splice, kl = [], [], []
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start:start + batch_size]
        ids, mask = (t.to(device) for t in left_pad([Record(list(e)) for e in chunk], pad))
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        other = prompt_activations(other_model, tokenizer, [texts[start + i] for i in range(len(chunk))], layer,
                                   batch_size)
        ctx = HookContext.for_forward(mask)
        with torch.inference_mode():
            clean = target_model(input_ids=ids, attention_mask=mask, position_ids=positions).logits.float()
            with residual_hooks(target_model, {layer: prefill_edit_hook(edit, target, other, "prompt")}, ctx):
                spliced = target_model(input_ids=ids, attention_mask=mask, position_ids=positions).logits.float()
        logp_c, logp_s = clean[:, :-1].log_softmax(-1), spliced[:, :-1].log_softmax(-1)
        nxt = ids[:, 1:, None]
        valid = (mask[:, :-1] * mask[:, 1:]).float()  # a real token predicting a real token
        per_tok = [-logp_c.gather(-1, nxt)[..., 0], -logp_s.gather(-1, nxt)[..., 0],
                   (logp_c.exp() * (logp_c - logp_s)).sum(-1)]
        count = valid.sum(1).clamp_min(1)
        for store, values in zip((ce_clean, ce_splice, kl), per_tok):
            store += ((values * valid).sum(1) / count).cpu().tolist()
    return np.array(ce_clean), np.array(ce_splice), np.array(kl)


# ---------------------------------------------------------------- CLI


def _pair_from(args: argparse.Namespace) -> PairSpec:
    return PairSpec(a=args.pair_a, b=args.pair_b, tokenizer=args.tokenizer, device=args.device)


def _rate(r: Rate, scale: float = 100.0) -> str:
    return f"{r.mean * scale:.1f} [{r.lo * scale:.1f}, {r.hi * scale:.1f}]"


def print_eval(result: EvalResult) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{result.checkpoint} @ layer {result.layer}: tool use, % [95% CI]")
    for col in ("condition", "correct (strict)", "lenient", "format ok", "name ok"):
        table.add_column(col, justify="right" if col != "condition" else "left")
    for name in ("a_clean", "a_splice", "b_clean", "b_splice"):
        r: ToolRates = getattr(result, name)
        table.add_row(name, _rate(r.correct), _rate(r.lenient), _rate(r.format_ok), _rate(r.name_ok))
    console = Console()
    console.print(table)
    console.print(f"Δ A (splice − clean): [bold]{_rate(result.delta_a_pp, 1)}[/] pp   "
                  f"Δ B: [bold]{_rate(result.delta_b_pp, 1)}[/] pp   (n = {result.delta_a_pp.n})")
    for name, loss in (("A", result.loss_a), ("B", result.loss_b)):
        if loss is not None:
            console.print(f"splice into {name}: CE {loss.ce_clean.mean:.3f} → {loss.ce_splice.mean:.3f} nats/token, "
                          f"KL {_rate(loss.kl, 1)}")


def _run_on_pair(args: argparse.Namespace, local_class, actor_class, method: str, cfg):
    """`method(checkpoint, layer)` of a fresh replica: in this process, or in a Ray actor with --ray."""
    if not args.ray:
        return getattr(local_class(_pair_from(args), cfg), method)(args.checkpoint, args.layer)
    import ray

    from dfc_ray.cluster import connect

    connect(args.address)
    actor = actor_class.options(num_gpus=args.num_gpus).remote(_pair_from(args), cfg)
    return ray.get(getattr(actor, method).remote(args.checkpoint, args.layer))


def _eval_command(args: argparse.Namespace) -> int:
    from actors.evaluator import Evaluator, EvaluatorActor

    cfg = EvalConfig(tasks=args.tasks, n_tasks=args.n_tasks, n_texts=args.n_texts, splice_mode=args.mode,
                     max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    print_eval(_run_on_pair(args, Evaluator, EvaluatorActor, "evaluate", cfg))
    return 0


def _steer_command(args: argparse.Namespace) -> int:
    from actors.steering import SteerConfig, Steerer, SteeringActor, print_steer

    cfg = SteerConfig(n_dev=args.n_dev, n_test=args.n_test, top_n=args.top_n, alphas=tuple(args.alphas),
                      max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, scale=args.scale,
                      targets=tuple(args.targets), primary=args.primary or args.targets[0],
                      rankings=tuple(args.rankings), min_set_pool=args.min_set_pool, min_set_max=args.min_set_max)
    print_steer(_run_on_pair(args, Steerer, SteeringActor, "steer", cfg))
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="crosscoder checkpoint folder (config.json + model.safetensors)")
    p.add_argument("--layer", type=int, required=True, help="the block whose output the crosscoder was trained on")
    p.add_argument("--pair-a", default="organism", help="model A: organism | path | s3://… | hub id")
    p.add_argument("--pair-b", default="organism", help="model B: organism | path | s3://… | hub id")
    p.add_argument("--tokenizer", default="", help="tokenizer reference (default: model B's)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--ray", action="store_true", help="run in a Ray actor instead of in this process")
    p.add_argument("--num-gpus", type=float, default=0, help="GPUs for the actor (with --ray)")
    p.add_argument("--address", default=None, help="Ray address (with --ray; default: start a local cluster)")


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="tool correctness of A and B, clean vs crosscoder splice, with CIs")
    _common(p)
    p.add_argument("--tasks", default="organism:test", help="load_tasks source")
    p.add_argument("--n-tasks", type=int, default=0, help="first n tasks (0 = all)")
    p.add_argument("--n-texts", type=int, default=64, help="plain texts for the splice loss (0 = skip)")
    p.add_argument("--mode", choices=SPLICE_MODES, default="last_prompt_token", help="splice positions")
    p.set_defaults(func=_eval_command)

    p = subparsers.add_parser("steer", help="rank A-exclusive features, pick feature/α on dev, report on test")
    _common(p)
    p.add_argument("--n-dev", type=int, default=100, help="dev prompts for ranking and the α grid")
    p.add_argument("--n-test", type=int, default=200, help="test prompts for the reported effect")
    p.add_argument("--top-n", type=int, default=3, help="candidate features from each ranking")
    p.add_argument("--rankings", nargs="+", choices=STEER_RANKINGS, default=list(STEER_RANKINGS),
                   help="candidate rankings")
    p.add_argument("--alphas", type=float, nargs="+", default=[0.4, 0.8, 1.2], help="α grid, in --scale units")
    p.add_argument("--scale", choices=STEER_SCALES, default="residual_norm", help="unit of α (docs/evaluation.md)")
    p.add_argument("--targets", nargs="+", choices=("a", "b"), default=["b", "a"], help="models to steer")
    p.add_argument("--primary", choices=("a", "b"), default="", help="target of the unprefixed metrics "
                   "(default: the first of --targets)")
    p.add_argument("--min-set-pool", type=int, default=6, help="features the minimal set draws from")
    p.add_argument("--min-set-max", type=int, default=3, help="largest minimal set tried")
    p.set_defaults(func=_steer_command)

