"""PairReplica: what every judge replica (evaluator, steerer) holds between requests.

A replica hosts model A and B and judges one checkpoint per request. Everything about its fixed
prompt sets that does not depend on the checkpoint is computed once and kept: clean replies, the
prompts' prefill (a `PrefixCache` per model), each model's residual at the last prompt token and the
reference steering direction (A − B mean difference) made from them.
A last-prompt-token splice or steering request then costs one prompt token plus the reply per
prompt, and a 48-trial sweep pays for each prompt's prefill once per replica, not 48 × (1 + α grid).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, replace
from typing import Any

import ray
import torch

from dfc_ray.fs import redact
from dfc_ray.generation import Generation, GenerationConfig, PrefixCache, generate, memory_batch_size
from dfc_ray.interventions import last_prompt_residuals, model_index
from dfc_ray.pair import PairSpec, load_pair, pair_fingerprint
from dfc_ray.plan import peak_memory_mb
from dfc_ray.reference import mean_difference
from dfc_ray.tooluse import Task, render_for
from dfc_ray.tooluse.dialects import resolve_dialect


MONITOR = "monitor"
"""The concurrency group of `PairReplica.busy`: its own thread, so a caller asking how busy a replica is gets an
answer while a request runs; every other method stays in Ray's default group, one request at a time."""
CONCURRENCY_GROUPS = {MONITOR: 1}
"""`ray.remote(concurrency_groups=...)` of every judge replica class."""


class PairReplica:
    """The pair on this process's device, with caches keyed by what they depend on."""

    model_a: torch.nn.Module
    model_b: torch.nn.Module
    tokenizer: Any
    dialect: str
    device: torch.device
    fingerprint: str
    prefix: dict[str, PrefixCache]
    _clean: dict[str, list[Generation]]
    _residuals: dict[str, torch.Tensor]
    _references: dict[str, torch.Tensor]
    _batches: dict[str, int]

    def __init__(self, pair: PairSpec, shared: PairReplica | None = None):
        """`shared`: a replica of the same pair in this process whose models and caches this one uses (an
        in-process evaluator and steerer then hold one copy of the pair and generate each clean reply once)."""
        self.pair = pair
        self.clean_hits = self.clean_misses = 0
        self._busy = 0
        if shared is not None:
            if shared.pair != pair:
                raise ValueError(f"shared replica holds {shared.pair}; expected the same pair as {pair}")
            self.model_a, self.model_b, self.tokenizer = shared.model_a, shared.model_b, shared.tokenizer
            self.device, self.fingerprint, self.prefix = shared.device, shared.fingerprint, shared.prefix
            self._clean, self._residuals, self._references = shared._clean, shared._residuals, shared._references
            self._batches, self.dialect = shared._batches, shared.dialect
            return
        self.model_a, self.model_b, self.tokenizer = load_pair(pair)
        self.dialect = resolve_dialect(pair.dialect, self.tokenizer)  # the tool-call dialect replies are read in
        self.device = next(self.model_a.parameters()).device
        self.fingerprint = pair_fingerprint(pair)
        self.prefix = {"a": PrefixCache(self.model_a), "b": PrefixCache(self.model_b)}
        self._clean, self._residuals, self._references, self._batches = {}, {}, {}, {}

    def for_pair(self, fingerprint: str, method: str, *args: Any) -> Any:
        """`method(*args)` when this replica hosts the pair `fingerprint` (`pair.pair_fingerprint`), else one
        line naming both: a checkpoint is never judged by models other than its own sweep's."""
        if fingerprint != self.fingerprint:
            hosted = f"{self.fingerprint} (a={redact(self.pair.a)}, b={redact(self.pair.b)})"
            raise ValueError(f"judge replica (pid {os.getpid()}) hosts pair {hosted}; expected the trial's pair "
                             f"{fingerprint}")
        self._busy += 1
        try:
            return getattr(self, method)(*args)
        finally:
            self._busy -= 1

    @ray.method(concurrency_group=MONITOR)
    def busy(self) -> int:
        """Trial requests (`for_pair`) running in this replica now: 0 or 1, as they run one at a time. Answered
        from the MONITOR group's thread, beside a running request, so `ReplicaPool` can send a trial's request
        to an idle replica whichever trial sent the others (each trial holds its own pool handle)."""
        return self._busy

    def model(self, target: str) -> torch.nn.Module:
        return (self.model_a, self.model_b)[model_index(target)]

    def generation(self, cfg: GenerationConfig, prompts: list[str]) -> GenerationConfig:
        """`cfg` with this replica's batch size for `prompts`: on a GPU the largest that fits the free memory
        (up to 256), chosen on first use and then kept for these prompts, so clean and intervened replies
        are decoded in the same batches and the prefix cache's entries are re-used; elsewhere cfg's own."""
        key = json.dumps([prompts, cfg.max_new_tokens])
        if key not in self._batches:
            longest = max((len(ids) for ids in self.tokenizer(prompts, add_special_tokens=False)["input_ids"]),
                          default=1)
            self._batches[key] = memory_batch_size(self.model_a, longest, cfg.max_new_tokens) or cfg.batch_size
        return replace(cfg, batch_size=self._batches[key])

    def clean_replies(self, target: str, prompts: list[str], cfg: GenerationConfig,
                      prefix: bool = True) -> list[Generation]:
        """Greedy replies of `target` to `prompts` with no intervention (generated once, then cached).
        `prefix`: through the prefix cache, as the interventions they are compared with (same kernels,
        same rounding); False for interventions that prefill whole prompts."""
        key = json.dumps([target, prompts, asdict(cfg), prefix])
        if key in self._clean:
            self.clean_hits += 1
        else:
            self.clean_misses += 1
            self._clean[key] = generate(self.model(target), self.tokenizer, prompts, self.generation(cfg, prompts),
                                        prefix_cache=self.prefix[target] if prefix else None)
        return self._clean[key]

    def prompts(self, tasks: list[Task], prompt_format: str = "chat") -> list[str]:
        """The tasks' prompts as the judging protocol renders them (JudgeProtocol.prompt_format)."""
        return [render_for(self.tokenizer, task, prompt_format, self.dialect) for task in tasks]

    def last_residuals(self, target: str, prompts: list[str] | list[list[int]], layer: int,
                       batch_size: int) -> torch.Tensor:
        """`target`'s residual after block `layer` at each prompt's last token (rendered prompts, or token ids fed as
        they are), (n, d_model), cached."""
        key = json.dumps([target, layer, prompts])
        if key not in self._residuals:
            self._residuals[key] = last_prompt_residuals(self.model(target), self.tokenizer, prompts, layer, batch_size)
        return self._residuals[key]

    def reference_direction(self, prompts: list[str], layer: int, batch_size: int) -> torch.Tensor:
        """v = mean over `prompts` of A's minus B's residual after block `layer` at the last prompt token
        (d_model,), float32, cached per (layer, prompts)."""
        key = json.dumps([layer, prompts])
        if key not in self._references:
            self._references[key] = mean_difference(*(self.last_residuals(t, prompts, layer, batch_size) for t in "ab"))
        return self._references[key]

    def stats(self) -> dict[str, object]:
        """Process id, device, the tool-call dialect replies are read in and cache counters (for monitoring,
        the report and tests)."""
        return {"pid": os.getpid(), "device": str(self.device), "cuda": torch.cuda.is_available(),
                "dialect": self.dialect, "clean_hits": self.clean_hits, "clean_misses": self.clean_misses,
                "prefix_batches": {t: len(c) for t, c in self.prefix.items()},
                "prefix_hits": {t: c.hits for t, c in self.prefix.items()}, "peak_mem_mb": peak_memory_mb(),
                "generation_batches": sorted(set(self._batches.values()))}
