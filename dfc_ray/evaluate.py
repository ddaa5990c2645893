"""Evaluation numbers of a crosscoder checkpoint: tool correctness clean vs spliced, splice loss, CIs.

The actors (actors/evaluator.py, actors/steering.py) host the pair and call these functions; the
`dfc-ray eval` and `dfc-ray steer` commands (dfc_ray/commands/evaluate.py) run them in-process or
through the actors on Ray (`--ray`).

Rates are fractions in [0, 1]; deltas are percentage points (pp). Every rate carries a 95% percentile
bootstrap CI over prompts; a delta's CI is a PAIRED bootstrap (the same resampled prompts before and
after), since clean and intervened replies come from the same prompts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from dfc_ray.config import EvalConfig
from dfc_ray.crosscoder import CHECKPOINT_FILES, DedicatedFeatureCrosscoder
from dfc_ray.fs import open_fs, redact
from dfc_ray.generation import Generation, HookContext, residual_hooks
from dfc_ray.harvest import Record, left_pad, plain_text_ids, plain_texts
from dfc_ray.interventions import prefill_edit_hook, prompt_activations, splice_edit
from dfc_ray.seed import require_known_normalization
from dfc_ray.tooluse import Score, Task, load_tasks, score


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
    """A called name is exactly one of the offered tools."""
    seed_lenient: Rate
    """The seed study's rule: a called name fuzzy-matches an offered tool (scoring.seed_lenient)."""
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
    """Paired splice − clean correctness of A under `metric`, in pp."""
    delta_b_pp: Rate
    """Paired splice − clean correctness of B under `metric`, in pp."""
    loss_a: SpliceLoss | None
    loss_b: SpliceLoss | None
    clean_cached: bool
    """True when the clean replies came from the evaluator's cache (not regenerated)."""
    seconds: float = 0.0
    """Wall-clock seconds the evaluator spent on this request (plan.py's measured rates use it)."""
    metric: str = "strict"
    """The protocol's correctness metric (JudgeProtocol.metric) that the deltas and the contract's rates use."""
    passed: dict[str, dict[str, list[bool]]] = field(default_factory=dict)
    """Metric (strict, seed_lenient) → condition (a_clean, a_splice, b_clean, b_splice) → per prompt, correct
    or not (the ablation pools checkpoints per prompt, under either metric, from one evaluation)."""
    fast_path_fallbacks: list[str] = field(default_factory=list)
    """Fast paths the evaluator's process replaced by their reference after a failed self-check (selfcheck)."""

    def rate(self, name: str) -> Rate:
        """`a_clean` / `a_splice` / `b_clean` / `b_splice` under the protocol's metric."""
        rates = getattr(self, name)
        return rates.correct if self.metric == "strict" else rates.seed_lenient

    def metrics(self) -> dict[str, float]:
        """The contract's trial metrics (correctness under the protocol's metric: strict by default) plus
        lenient rates, CIs and splice loss."""
        out = {name: self.rate(name).mean for name in ("a_clean", "a_splice", "b_clean", "b_splice")}
        out |= {"delta_a_pp": self.delta_a_pp.mean, "delta_b_pp": self.delta_b_pp.mean,
                "eval_compute_s": self.seconds}
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
                       for name in ("correct", "lenient", "seed_lenient", "format_ok", "name_ok")))


def score_all(tasks: Sequence[Task], generations: Sequence[Generation], dialect: str = "hermes") -> list[Score]:
    """One `Score` per (task, reply), calls read in the pair's tool-call `dialect`."""
    return [score(task, gen.text, dialect) for task, gen in zip(tasks, generations, strict=True)]


# ---------------------------------------------------------------- inputs


def load_crosscoder(path: str, device: str | torch.device,
                    normalization: str = "checkpoint") -> DedicatedFeatureCrosscoder:
    """A checkpoint (a folder, or an s3:// prefix as trials of an S3 run write them) in eval mode
    (BatchTopK uses its inference threshold) on `device`. `normalization` (JudgeProtocol): "checkpoint"
    uses its saved statistics and refuses an imported checkpoint whose statistics are unknown; "none"
    drops them (raw activations into the weights, the seed study's splice)."""
    require_known_normalization(path, allow_raw=normalization == "none")
    cc = _load_checkpoint(path, device).eval()
    return cc.without_normalization() if normalization == "none" else cc


def _load_checkpoint(path: str, device: str | torch.device) -> DedicatedFeatureCrosscoder:
    if "://" not in path:
        return DedicatedFeatureCrosscoder.load(path, device=device)
    import tempfile  # deferred: only remote checkpoints need a local copy

    fs, root = open_fs(path)
    with tempfile.TemporaryDirectory(prefix="dfc-ray-checkpoint-") as local:
        for name in CHECKPOINT_FILES:
            try:
                with fs.open_input_stream(f"{root}/{name}") as remote:
                    Path(local, name).write_bytes(remote.read())
            except FileNotFoundError:
                raise FileNotFoundError(f"{redact(path)}: not a crosscoder checkpoint (no {name})") from None
        return DedicatedFeatureCrosscoder.load(local, device=device)


def eval_tasks(cfg: EvalConfig) -> list[Task]:

    tasks = load_tasks(cfg.tasks)
    tasks = tasks[:cfg.n_tasks] if cfg.n_tasks else tasks
    if not tasks:
        raise ValueError(f"EvalConfig.tasks={cfg.tasks!r}: no tasks; expected at least one")
    return tasks


def eval_texts(source: str, n: int, seed: int) -> list[str]:
    """Plain texts for the splice loss; the organism's are drawn with a seed the harvest does not use."""

    return plain_texts(source, n, seed + 10_007)


# ---------------------------------------------------------------- splice loss


def splice_loss_per_text(target_model: torch.nn.Module, other_model: torch.nn.Module, tokenizer,
                         texts: Sequence[str], cc: DedicatedFeatureCrosscoder, layer: int, target: str,
                         batch_size: int = 32) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(clean CE, spliced CE, KL(clean ‖ spliced)) per text, averaged over its next-token predictions; each text
    starts with the BOS its tokenizer adds by default (`plain_text_ids`), as the model saw text in training."""

    device = next(target_model.parameters()).device
    encoded = plain_text_ids(tokenizer, texts)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    edit = splice_edit(cc, target)
    ce_clean, ce_splice, kl = [], [], []
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start:start + batch_size]
        ids, mask = (t.to(device) for t in left_pad([Record(list(e)) for e in chunk], pad))
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        other = prompt_activations(other_model, tokenizer, chunk, layer, batch_size)
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
