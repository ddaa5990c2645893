"""Batched generation (left padding + KV cache) with hook points on the residual stream.

Our own decode loop rather than `model.generate`: interventions must know exactly which positions
are prompt, padding or generated (the seed study read a pad as "the last token"), and batching must
never change a reply, so evaluation numbers do not depend on `batch_size`.

A `PrefixCache` keeps the KV cache of every prompt token but the last across `generate` calls. The
judges splice and steer at the last prompt token only, so every trial re-uses the prompts' prefill
and pays for one prompt token plus the reply (about 4x less work per generation on the organism).

Two decode loops share the prefill, the hooks and the stopping rule (`GenerationConfig.decode`):
- eager: one forward per token over transformers' growing KV cache; finished rows leave the batch.
- static: the prompts' KV cache is copied into preallocated buffers and every step feeds one token per row
  through the same decoder blocks at fixed shapes, writing its K/V in place and its greedy token into a
  buffer. On CUDA that step is captured once as a CUDA graph and replayed per token with no host sync;
  stop strings and eos are checked every `STOP_CHECK_EVERY` steps against a token-id table. On CPU the
  same step runs uncaptured and gives the eager loop's token ids (fp32, tested with hooks).
"""

from __future__ import annotations

import copy
import inspect
import logging
import weakref
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Callable, Hashable, Iterator, Sequence, Union

import numpy as np
import torch

from dfc_ray import selfcheck
from dfc_ray.config import GenerationConfig
from dfc_ray.tooluse.dialects import KEEP_TOKENS

END_OF_TURN_TOKENS = ("<|im_end|>", "<|endoftext|>", "<end_of_turn>", "<|eot_id|>", "<|eom_id|>", "<|end|>",
                      "<|end_of_text|>")
"""Tokens that end a turn or a text in the chat templates of Qwen/Hermes and OLMo-2 (ChatML), Gemma, Llama-3 and
Phi-3/4, besides the tokenizer's and generation_config.json's eos: a reply stops on each of them the vocabulary has."""
STOP_CHECK_EVERY = 8
"""Static decoding reads the generated tokens back and checks eos / stop strings every this many steps."""
COMPACT_AT = 0.75
"""Uncaptured static decoding moves its unfinished rows into a smaller batch once they are this share of it or
fewer (each move copies their KV cache once; a finished row left in the batch costs a row's work per step)."""
STATIC_COLUMNS = 64
"""Static decoding rounds its KV length up to a multiple of this, so batches of similar prompts share a graph."""
GRAPHS_PER_MODEL = 8
"""Captured decode steps kept per model (least recently used dropped first); their KV storage is shared."""
MAX_MEMORY_BATCH = 256
"""Largest batch `memory_batch_size` picks: at 256 rows a 3B model's decode step already streams its weights
once per ~4 ms of compute on an H200, and larger batches only grow the KV cache."""
MEMORY_SHARE = 0.5
"""Share of the free device memory a decode batch may plan to use (the rest: caches that fill later)."""
STATIC_MODEL_TYPES = ("llama", "qwen2")
DRAFT_CHUNK = 16
"""Draft tokens a teacher-forced pass feeds per forward (`_StaticStep.greedy_after`): its activations and attention
scores then stay within what a prefill of one prompt already needs on a GPU, whatever `max_new_tokens` is."""
"""Decoder families whose blocks static decoding runs from their modules: pre-norm attention with q/k/v/o
projections and rotary embeddings, then a pre-norm MLP."""


@dataclass
class Generation:
    text: str
    """Decoded completion only: special tokens (<|im_end|>, ...) removed, <tool_call> tags kept,
    cut right after the stop string when finish_reason is "stop"."""
    token_ids: list[int]
    """Completion token ids, including the final eos token or the token that completed a stop string."""
    prompt_tokens: int
    """Number of prompt tokens (tokenized without special tokens)."""
    finish_reason: str
    """"eos" (an eos token was generated), "stop" (a stop string appeared) or "length"."""


@dataclass
class HookContext:
    """What a residual hook needs to know about the forward call it sits in."""

    step: int
    """0 = prefill (the whole prompt), then 1, 2, ... = one new token per row per call. A captured static
    decode step runs its hooks once, at step 1, and replays that: decode hooks must not branch on `step`."""
    is_prefill: bool
    """True for step 0 (and for a plain forward over a padded batch)."""
    real_mask: torch.Tensor
    """(batch, seq_this_step) bool: True at real tokens (prompt tokens in prefill, the newly fed
    token in a decode step), False at left padding."""
    last_prompt_index: torch.Tensor | None
    """(batch,) long: index along this call's seq dimension of each row's last prompt token, during
    prefill only (None in decode steps). Under generate's left padding it is the last column."""
    rows: torch.Tensor
    """(batch,) long: index into the original prompt list of each row of this call. The eager loop drops
    finished rows, so there these are exactly the rows still active; static decoding keeps every row of
    the batch to its end (a finished row's later tokens are discarded)."""

    @classmethod
    def for_forward(cls, attention_mask: torch.Tensor, rows: torch.Tensor | None = None) -> "HookContext":
        """Context for a plain forward over a padded batch (left or right padding)."""
        mask = attention_mask.bool()
        last = mask.shape[1] - 1 - mask.flip(1).int().argmax(1)
        if rows is None:
            rows = torch.arange(mask.shape[0], device=mask.device)
        return cls(step=0, is_prefill=True, real_mask=mask, last_prompt_index=last, rows=rows)


ResidualHook = Callable[[torch.Tensor, HookContext], Union[torch.Tensor, None]]
"""(residual after block L of shape (batch, seq, d_model), context) -> replacement or None."""


def leaves_prefix_alone(hook: ResidualHook) -> ResidualHook:
    """Mark `hook` as changing nothing before the last prompt token, so `generate` may run it on top
    of a `PrefixCache` (which skips the prefix's forward). Unmarked hooks are refused there."""
    hook.leaves_prefix_alone = True
    return hook


def prefill_only(hook: ResidualHook) -> ResidualHook:
    """Mark `hook` as returning None in every decode step: static decoding then leaves it out of the decode
    step, so one captured step serves every such hook (a splice or steering at the last prompt token)."""
    hook.prefill_only = True
    return hook


@dataclass(frozen=True)
class Replay:
    """How a captured decode step re-runs a hook for another hook of the same kind: `build(*inputs)` makes
    the hook, and a later hook with the same `key` only has its `inputs` copied into the captured ones."""

    key: Hashable
    """What fixes the hook's code path (e.g. the steering site); hooks with equal keys differ only in `inputs`."""
    inputs: tuple[torch.Tensor, ...]
    """The tensors the hook reads (e.g. the steering vector)."""
    build: Callable[..., ResidualHook]
    """Makes the same hook over other tensors of the inputs' shapes."""


def replayable(hook: ResidualHook, key: Hashable, inputs: Sequence[torch.Tensor],
               build: Callable[..., ResidualHook]) -> ResidualHook:
    """Mark a hook that acts in decode steps as re-buildable (see `Replay`): a captured decode step is then
    reused for later hooks of the same `key` instead of being captured again for each one."""
    hook.replay = Replay(key, tuple(inputs), build)
    return hook


class PrefixCache:
    """KV caches of prompt prefixes (every token but the last) of one model, kept across `generate` calls.

    `generate(model, ..., prefix_cache=cache)` then prefills only each prompt's last token, on a copy
    of the stored cache: replies are those of a full prefill (up to float rounding). Every hook must
    be marked `leaves_prefix_alone` (generation's `add_at_last_prompt_token`, interventions'
    last-prompt-token splice and steering are); `generate` refuses others. Entries are keyed by the exact batch of
    prompt ids, so re-using it needs the same prompts and batch size; memory per prompt token is
    layers x 2 x kv_heads x head_dim values (about 36 KB for Qwen2.5-3B in bf16).
    """

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self._entries: dict[tuple[tuple[int, ...], ...], object] = {}
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def copy_for(self, prompt_ids: list[list[int]], compute: Callable[[], object]) -> object:
        """A private copy of the batch's prefix KV cache; `compute()` makes it (without hooks) on first use. A
        cache whose layers only ever replace their tensors (`appends_by_copy`) shares the stored ones."""
        entry = self.stored(prompt_ids, compute)
        shared = {id(t): t for pair in _cache_tensors(entry) for t in pair} if appends_by_copy(entry) else {}
        return copy.deepcopy(entry, memo=shared)

    def stored(self, prompt_ids: list[list[int]], compute: Callable[[], object]) -> object:
        """The stored prefix KV cache of the batch itself, for a caller that only reads it (static decoding copies
        it into its own buffers); `compute()` makes it on first use."""
        key = tuple(tuple(ids) for ids in prompt_ids)
        if key in self._entries:
            self.hits += 1
        else:
            self.misses += 1
            self._entries[key] = compute()
        return self._entries[key]


def appends_by_copy(cache: object) -> bool:
    """Whether a forward only ever replaces `cache`'s tensors, never writes into them: a transformers DynamicCache
    whose layers are all plain full-attention ones, which append by concatenation, select rows by indexing and
    crop by slicing (a sliding-window layer may drop old states). Such a cache can share its tensors with a copy
    (`PrefixCache.copy_for`) and be rewound with `crop` after a forward instead of being copied for it."""
    from transformers import cache_utils  # deferred: this module does not import transformers otherwise

    dynamic_layer = getattr(cache_utils, "DynamicLayer", None)  # transformers 5 (4.x's lists are copied)
    layers = getattr(cache, "layers", None)
    return type(cache) is cache_utils.DynamicCache and dynamic_layer is not None and bool(layers) and \
        all(type(layer) is dynamic_layer for layer in layers)


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder blocks of a transformers causal LM (or of its bare decoder)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ValueError(f"model {type(model).__name__}: expected decoder blocks at .model.layers (a ModuleList)")
    return layers


def add_at_last_prompt_token(delta: torch.Tensor) -> ResidualHook:
    """Hook adding `delta` (d_model,) to the residual at each row's last prompt token (prefill only)."""

    def hook(hidden: torch.Tensor, ctx: HookContext) -> torch.Tensor | None:
        if not ctx.is_prefill:
            return None
        out = hidden.clone()
        batch = torch.arange(hidden.shape[0], device=hidden.device)
        out[batch, ctx.last_prompt_index] += delta.to(hidden.dtype)
        return out

    return prefill_only(leaves_prefix_alone(hook))


@contextmanager
def residual_hooks(
    model: torch.nn.Module,
    hooks: dict[int, ResidualHook] | None,
    context: HookContext | Callable[[], HookContext],
) -> Iterator[None]:
    """Run `hooks[L]` on the output of decoder block L for every forward inside the block.

    `context` is a HookContext, or a callable returning the current one (generate's decode loop
    changes it every step). Hooks are removed on exit, also when the body raises.
    """
    layers = decoder_layers(model)
    handles = []
    try:
        for layer, fn in (hooks or {}).items():
            if not 0 <= layer < len(layers):
                raise ValueError(f"hooks: layer {layer} out of range; model has layers 0..{len(layers) - 1}")
            # prepend: run before transformers' own output-capturing hooks, so that
            # output_hidden_states[L + 1] shows the residual after the intervention.
            handles.append(layers[layer].register_forward_hook(_forward_hook(layer, fn, context), prepend=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _forward_hook(layer: int, fn: ResidualHook, context: HookContext | Callable[[], HookContext]):
    def forward_hook(module, args, output):
        # transformers 5.x decoder layers return a tensor, 4.x a tuple whose first item is the residual.
        hidden = output[0] if isinstance(output, tuple) else output
        new = fn(hidden, context if isinstance(context, HookContext) else context())
        if new is None:
            return None
        if new.shape != hidden.shape:
            raise ValueError(f"hook at layer {layer} returned shape {tuple(new.shape)}, expected {tuple(hidden.shape)}")
        return (new, *output[1:]) if isinstance(output, tuple) else new

    return forward_hook


def eos_token_ids(tokenizer, model: torch.nn.Module | None = None) -> set[int]:
    """Every id that ends a reply: the tokenizer's eos, each id of the model's generation config `eos_token_id`
    (generation_config.json; an int or a list, e.g. Llama-3's <|eot_id|> and <|eom_id|>), and the
    END_OF_TURN_TOKENS the vocabulary has (the template's end of turn, e.g. Gemma's <end_of_turn>). A reply that
    ran past its end of turn would be scored on text the model was never trained to write.
    Only added tokens count, besides the tokenizer's eos: an id of ordinary text in a generation config is stale
    (the organism's says 2, a "#", from before its tokenizer was trained) and would cut replies short."""
    added = set(tokenizer.added_tokens_decoder)
    vocab = tokenizer.get_vocab()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = {vocab[t] for t in END_OF_TURN_TOKENS if t in vocab}
    ids.update([configured] if isinstance(configured, int) else configured or ())
    ids &= added
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def generate(
    model: torch.nn.Module,
    tokenizer,
    prompts: Sequence[str],
    cfg: GenerationConfig | None = None,
    hooks: dict[int, ResidualHook] | None = None,
    prefix_cache: PrefixCache | None = None,
    drafts: Sequence[Sequence[int]] | None = None,
) -> list[Generation]:
    """Complete each rendered prompt; batched output equals one-at-a-time output (fp32).

    Prompts are tokenized without special tokens, sorted by length (less padding; results are
    batch-invariant) and decoded `cfg.batch_size` at a time; results come back in input order.
    With `prefix_cache` (for this model) the prompts' prefill is re-used across calls: only valid for
    hooks that act at the last prompt token or later (see PrefixCache).
    `drafts`: a guess of each prompt's reply token ids (an intervention's judges pass the clean reply, which most
    small interventions leave as it was). Under static greedy decoding with prefill-only hooks, one teacher-forced
    forward over the drafts finishes every row whose greedy reply its draft turns out to be (`_Decoder._accept_drafts`);
    the other rows decode as usual. The replies are the same token ids (up to float rounding at a near-tie).
    """
    cfg = cfg or GenerationConfig()
    if isinstance(prompts, str):
        raise ValueError("generate: prompts is a str; expected a list of rendered prompts")
    if prefix_cache is not None and prefix_cache.model is not model:
        raise ValueError("generate: prefix_cache belongs to another model; expected PrefixCache(model)")
    if prefix_cache is not None and not all(getattr(h, "leaves_prefix_alone", False) for h in (hooks or {}).values()):
        raise ValueError("generate: a hook may change the prompt before its last token, which a prefix_cache would "
                         "skip; expected hooks marked with leaves_prefix_alone (or no prefix_cache)")
    encoded = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    for i, ids in enumerate(encoded):
        if not ids:
            raise ValueError(f"generate: prompts[{i}] is empty; expected at least one token")
    if drafts is not None and len(drafts) != len(encoded):
        raise ValueError(f"generate: {len(drafts)} drafts for {len(encoded)} prompts; expected one per prompt")
    vocab = model.get_output_embeddings().weight.shape[0] if hasattr(model, "get_output_embeddings") else None
    for i, draft in enumerate(drafts or []):
        if vocab and (bad := next((t for t in draft if not 0 <= t < vocab), None)) is not None:
            raise ValueError(f"generate: drafts[{i}] holds token id {bad}; expected ids in [0, {vocab})")
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    decoder = _Decoder(model, tokenizer, cfg, hooks, prefix_cache)
    results: list[Generation | None] = [None] * len(encoded)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(order), cfg.batch_size):
                rows = order[start : start + cfg.batch_size]
                batch_drafts = None if drafts is None else [list(drafts[i]) for i in rows]
                for row, gen in zip(rows, decoder.run([encoded[i] for i in rows], rows, batch_drafts)):
                    results[row] = gen
    finally:
        model.train(was_training)
    return results


def static_decode_unsupported(model: torch.nn.Module) -> str | None:
    """Why static decoding cannot run `model`, or None when it can: a transformers causal LM of a family whose
    forward is embed → rotary → full-attention blocks → norm → lm_head, with sdpa attention and a rope whose
    frequencies do not change with the length."""
    config, inner = getattr(model, "config", None), getattr(model, "model", None)
    parts = ("embed_tokens", "rotary_emb", "norm", "layers")
    if config is None or inner is None or not all(hasattr(inner, p) for p in parts) or \
            not hasattr(model, "get_output_embeddings"):
        return f"{type(model).__name__} is not a transformers causal LM with .model.{{{','.join(parts)}}}"
    if config.model_type not in STATIC_MODEL_TYPES:
        return f"model_type {config.model_type!r} is not one of {list(STATIC_MODEL_TYPES)}"
    if any(kind != "full_attention" for kind in getattr(config, "layer_types", None) or ()):
        return "the model has sliding-window layers"
    if config._attn_implementation != "sdpa":
        return f"attention implementation {config._attn_implementation!r} is not sdpa"
    rope = getattr(inner.rotary_emb, "rope_type", "default")
    if "dynamic" in rope or rope == "longrope":
        return f"rope type {rope!r} changes with the sequence length"
    return None


def decode_bytes_per_row(config, dtype_bytes: int, prompt_tokens: int, max_new_tokens: int) -> int:
    """Device memory one prompt of a decode batch needs: its static KV buffers, the prefill's KV cache and
    its prefix-cache copy, one block's activations during the prefill, and the logits. A multimodal wrapper is
    sized by its language model; a config without `num_key_value_heads` (gpt_neox) has one per attention head."""
    config = config.get_text_config()
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    kv_token = config.num_hidden_layers * 2 * kv_heads * head_dim * dtype_bytes
    kv = kv_token * (prompt_tokens + max_new_tokens + STATIC_COLUMNS + 2 * prompt_tokens)
    prefill = prompt_tokens * (3 * config.intermediate_size + 6 * config.hidden_size) * dtype_bytes
    return kv + prefill + 12 * config.vocab_size  # logits in the model dtype, as float, and the argmax's


def batch_for_memory(bytes_per_row: int, free_bytes: int) -> int:
    """The largest batch whose rows fit MEMORY_SHARE of `free_bytes`, within [1, MAX_MEMORY_BATCH]."""
    return max(1, min(MAX_MEMORY_BATCH, int(MEMORY_SHARE * free_bytes) // max(bytes_per_row, 1)))


def memory_batch_size(model: torch.nn.Module, prompt_tokens: int, max_new_tokens: int) -> int | None:
    """The decode batch that fits the free memory of the model's CUDA device (None on other devices, where
    a fixed batch is used: on CPU larger batches gain nothing). Free = the driver's free memory plus what
    torch's allocator holds unused."""
    device = next(model.parameters()).device
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    dtype_bytes = next(model.parameters()).element_size()
    return batch_for_memory(decode_bytes_per_row(model.config, dtype_bytes, prompt_tokens, max_new_tokens), free)


def decode_mode(model: torch.nn.Module, cfg: GenerationConfig) -> str:
    """The loop `generate` runs for `model` and `cfg`: "eager", "static" (uncaptured) or "static+graph" (CUDA)."""
    if cfg.decode == "eager":
        return "eager"
    reason = static_decode_unsupported(model)
    if cfg.decode == "static" and reason is not None:
        raise ValueError(f"GenerationConfig.decode='static': {reason}; expected decode 'eager' or 'auto' for it")
    on_cuda = next(model.parameters()).device.type == "cuda"
    if cfg.decode == "auto" and (reason is not None or cfg.do_sample):
        return "eager"
    return "static+graph" if on_cuda and _step_cache(model).capture_error is None else "static"


_HIDDEN_IDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def reply_text(tokenizer, ids: Sequence[int]) -> str:
    """A reply's text: special tokens (eos, padding, end of turn) left out, except the tool-call dialects'
    markers (`dialects.KEEP_TOKENS`, e.g. Llama's ``<|python_tag|>`` or Mistral's ``[TOOL_CALLS]``), which a
    tokenizer may make special but the parser needs to see. Which ids are left out is cached per tokenizer."""
    if tokenizer not in _HIDDEN_IDS:
        special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
        _HIDDEN_IDS[tokenizer] = frozenset(i for i in special if tokenizer.convert_ids_to_tokens(i) not in KEEP_TOKENS)
    hidden = _HIDDEN_IDS[tokenizer]
    return tokenizer.decode([i for i in ids if i not in hidden], skip_special_tokens=False,
                            clean_up_tokenization_spaces=False)


class _Decoder:
    """The decode loop for one batch; holds what is fixed across batches."""

    def __init__(self, model, tokenizer, cfg: GenerationConfig, hooks: dict[int, ResidualHook] | None,
                 prefix_cache: PrefixCache | None = None):
        self.model, self.tokenizer, self.cfg, self.hooks = model, tokenizer, cfg, hooks
        self.prefix_cache = prefix_cache
        self.device = next(model.parameters()).device
        self.eos = eos_token_ids(tokenizer, model)
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.eos, default=0)
        # The cache keyword is `cache` in transformers >= 5.x and `past_key_values` before.
        params = inspect.signature(model.forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"
        self.keep_kw = next((k for k in ("logits_to_keep", "num_logits_to_keep") if k in params), None)
        # A stop string's characters come from at most len(stop) tokens: decode only that tail.
        self.stop_window = max((len(s) for s in cfg.stop_strings), default=0) + 1
        self.static = decode_mode(model, cfg) != "eager" and selfcheck.first_contact(
            f"decode.static:{type(model).__name__}", self.device, self._static_error)

    def _static_error(self, device: torch.device) -> tuple[float, float]:
        """(share of token ids where static decoding differs from eager, tolerance) on four random prompts, 8
        greedy tokens, no hooks and no stop strings (selfcheck's first-contact check of this model class). The
        tolerance is 0 in float32 (same ids by construction); a 16-bit model may flip a near-tie, so a quarter of
        the ids may differ there, while a broken step differs from its first token in every prompt."""
        gen = torch.Generator().manual_seed(0)
        prompts = [torch.randint(0, self.model.config.vocab_size, (n,), generator=gen).tolist() for n in (5, 9, 12, 7)]
        check = replace(self.cfg, max_new_tokens=8, do_sample=False, stop_strings=())
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode():
                static, eager = (_Decoder(self.model, self.tokenizer, replace(check, decode=mode), None)
                                 .run(prompts, list(range(len(prompts)))) for mode in ("static", "eager"))
        finally:
            self.model.train(was_training)
        pairs = [(s, e) for a, b in zip(static, eager, strict=True)
                 for s, e in zip(a.token_ids, b.token_ids, strict=False)]
        lengths = sum(max(len(a.token_ids), len(b.token_ids)) for a, b in zip(static, eager, strict=True))
        tolerance = 0.0 if next(self.model.parameters()).dtype == torch.float32 else 0.25
        return (lengths - sum(s == e for s, e in pairs)) / max(lengths, 1), tolerance

    def run(self, prompt_ids: list[list[int]], rows: list[int],
            drafts: list[list[int]] | None = None) -> list[Generation]:
        """Decode one batch; `drafts` (generate's) are used by static greedy decoding with prefill-only hooks."""
        if not self.static:
            return self._run_eager(prompt_ids, rows)
        usable = not self.cfg.do_sample and all(getattr(h, "prefill_only", False) for h in (self.hooks or {}).values())
        return self._run_static(prompt_ids, rows, drafts if usable else None)

    def _start(self, prompt_ids: list[list[int]], rows: list[int], hooks: dict[int, ResidualHook] | None):
        """Pad, prefill (on the prefix cache when there is one) with `hooks` active; returns (attention mask,
        each prompt's length, rows as a tensor, the KV cache, the next-token logits)."""
        dev, n = self.device, len(prompt_ids)
        input_ids, mask = self._left_pad(prompt_ids)
        all_rows = torch.tensor(rows, device=dev)
        positions = (mask.cumsum(1) - 1).clamp(min=0)  # pads do not shift the prompt's positions
        prefix = None
        if self.prefix_cache is not None and min(len(p) for p in prompt_ids) >= 2:  # outside the hooks
            prefix = self.prefix_cache.copy_for(prompt_ids, lambda: self._prefix(input_ids, mask, positions))
        fed = 1 if prefix is not None else mask.shape[1]  # columns this prefill feeds (the last one, or all)
        ctx = HookContext(0, True, mask[:, -fed:].bool(), torch.full((n,), fed - 1, device=dev), all_rows)
        with residual_hooks(self.model, hooks, ctx):
            cache, logits = self._prefill(input_ids, mask, positions, prompt_ids, prefix)
        return mask, mask.sum(1), all_rows, cache, logits

    def _run_static(self, prompt_ids: list[list[int]], rows: list[int],
                    drafts: list[list[int]] | None = None) -> list[Generation]:
        """Greedy decoding over preallocated buffers (module docstring); the eager loop's token ids in fp32."""
        scan = _StopScan(self, len(prompt_ids))
        steps = self.cfg.max_new_tokens - 1
        if self.prefix_cache is not None and min(len(p) for p in prompt_ids) >= 2 and steps > 0:
            mask, prompt_lens, all_rows, step, first = self._start_static(prompt_ids, rows, self.prefix_cache)
            if scan.update(first[:, None].cpu().numpy()):
                return scan.results(prompt_ids)
        else:
            mask, prompt_lens, all_rows, cache, logits = self._start(prompt_ids, rows, self.hooks)
            first = logits.float().argmax(-1)
            if scan.update(first[:, None].cpu().numpy()) or steps == 0:
                return scan.results(prompt_ids)
            step = _static_step(self.model, len(prompt_ids), self._columns(mask), _cache_tensors(cache),
                                self.hooks or {})
            step.load(_cache_tensors(cache), mask, first, prompt_lens, all_rows)
            del cache, logits
        if drafts is not None and self._accept_drafts(scan, step, first, drafts):
            return scan.results(prompt_ids)
        live = list(range(len(prompt_ids)))  # the scan's row of each row of the step
        every = STOP_CHECK_EVERY if step.graph is not None else 1  # uncaptured: every token read back, as eager does
        checked = 1
        for s in range(1, steps + 1):
            keep = [i for i, r in enumerate(live) if scan.reasons[r] is None]
            if step.graph is None and len(keep) <= COMPACT_AT * len(live):  # finished rows leave the batch
                step, live = step.compacted(keep), [live[i] for i in keep]
            step(s)
            if s % every == 0 or s == steps:
                if scan.update(step.out[:, checked:s + 1].cpu().numpy(), live):
                    break
                checked = s + 1
        return scan.results(prompt_ids)

    def _columns(self, mask: torch.Tensor) -> int:
        """KV columns of a static step for a batch of this padded width: the prompt and every new token, rounded."""
        return -(-(mask.shape[1] + self.cfg.max_new_tokens - 1) // STATIC_COLUMNS) * STATIC_COLUMNS

    def _start_static(self, prompt_ids: list[list[int]], rows: list[int], prefix_cache: PrefixCache):
        """`_start` for static decoding on the prefix cache: the stored prefix goes straight into the step's
        buffers and the last prompt token is prefilled by the step itself (`_StaticStep.prefill_last`, every hook
        under the prefill context), instead of a transformers forward that copies the whole KV cache to append one
        column, then a second copy into the buffers. Returns (attention mask, each prompt's length, rows as a
        tensor, the loaded step, the first tokens)."""
        dev, n = self.device, len(prompt_ids)
        input_ids, mask = self._left_pad(prompt_ids)
        all_rows = torch.tensor(rows, device=dev)
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        kv = _cache_tensors(prefix_cache.stored(prompt_ids, lambda: self._prefix(input_ids, mask, positions)))
        step = _static_step(self.model, n, self._columns(mask), kv, self.hooks or {})
        step.load(kv, mask[:, :-1], input_ids[:, -1], mask[:, :-1].sum(1), all_rows)
        ctx = HookContext(0, True, mask[:, -1:].bool(), torch.zeros(n, dtype=torch.long, device=dev), all_rows)
        first = step.prefill_last(self.hooks or {}, ctx)
        return mask, mask.sum(1), all_rows, step, first

    def _accept_drafts(self, scan: "_StopScan", step: "_StaticStep", first: torch.Tensor,
                       drafts: list[list[int]]) -> bool:
        """Finish in `scan` every row whose greedy reply its draft gives away; True once every row is done.

        Each row is fed its draft (but its last token) in one teacher-forced forward of the loaded `step`
        (`_StaticStep.greedy_after`). Greedy tokens are known up to the first position where the model's choice
        differs from the draft, that choice included; a row whose stopping rule ends within them is done. The
        others decode from the prefill as if there had been no draft (nothing of the forward is kept for them)."""
        limit, firsts = self.cfg.max_new_tokens - 1, first.tolist()  # tokens after the first; one host read
        fed_lens = {r: min(len(draft), limit) for r, draft in enumerate(drafts)
                    if scan.reasons[r] is None and len(draft) > 1 and draft[0] == firsts[r]}
        if not fed_lens:
            return False
        fed = torch.full((len(drafts), max(fed_lens.values())), self.pad, dtype=torch.long)
        for r, n in fed_lens.items():
            fed[r, :n] = torch.tensor(drafts[r][:n])
        chosen = step.greedy_after(fed.to(self.device)).cpu()
        trial = _StopScan(self, len(drafts))
        for r, n in fed_lens.items():
            picks = chosen[r, :n].tolist()
            known = next((j for j in range(1, n) if picks[j - 1] != drafts[r][j]), n)  # greedy tokens known
            trial.completions[r] = list(scan.completions[r])
            trial.update(np.array([picks[:known]]), [r])
            if trial.reasons[r] is None and len(trial.completions[r]) > limit:
                trial.reasons[r] = "length"
            if trial.reasons[r] is not None:
                scan.completions[r], scan.reasons[r] = trial.completions[r], trial.reasons[r]
        return all(reason is not None for reason in scan.reasons)

    def _run_eager(self, prompt_ids: list[list[int]], rows: list[int]) -> list[Generation]:
        cfg, dev, n = self.cfg, self.device, len(prompt_ids)
        generators = [self._generator(row) for row in rows] if cfg.do_sample else None
        completions: list[list[int]] = [[] for _ in range(n)]
        reasons: list[str | None] = [None] * n
        live = torch.arange(n, device=dev)  # batch rows still generating, in cache order
        mask, prompt_lens, all_rows, cache, logits = self._start(prompt_ids, rows, self.hooks)
        ctx = HookContext(0, True, mask.bool(), None, all_rows)  # replaced before each decode step
        with residual_hooks(self.model, self.hooks, lambda: ctx):
            for step in range(1, cfg.max_new_tokens + 1):
                gens = [generators[r] for r in live.tolist()] if generators else None
                tokens = self._next_tokens(logits.float(), gens)
                done = torch.tensor([self._finish(completions, reasons, r, t)
                                     for r, t in zip(live.tolist(), tokens.tolist())])
                if done.all() or step == cfg.max_new_tokens:
                    break
                if done.any():  # drop finished rows from the batch and the cache
                    keep = (~done).nonzero().squeeze(1).to(dev)
                    live, tokens, mask = live[keep], tokens[keep], mask[keep]
                    cache.batch_select_indices(keep)
                mask = torch.cat([mask, mask.new_ones((len(live), 1))], 1)
                ctx = HookContext(step, False, torch.ones((len(live), 1), dtype=torch.bool, device=dev), None,
                                  all_rows[live])
                out = self.model(
                    input_ids=tokens[:, None],
                    attention_mask=mask,
                    position_ids=(prompt_lens[live] + step - 1)[:, None],
                    use_cache=True,
                    **{self.cache_kw: cache},
                )
                logits = out.logits[:, -1]
        return [self._result(ids, reason or "length", len(p))
                for ids, reason, p in zip(completions, reasons, prompt_ids)]

    def _left_pad(self, prompt_ids: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask), both (n, longest): every prompt ends at the last column."""
        width = max(len(ids) for ids in prompt_ids)
        input_ids = torch.full((len(prompt_ids), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(prompt_ids), width), dtype=torch.long)
        for r, ids in enumerate(prompt_ids):
            input_ids[r, width - len(ids) :] = torch.tensor(ids)
            mask[r, width - len(ids) :] = 1
        return input_ids.to(self.device), mask.to(self.device)

    def _prefix(self, input_ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> object:
        """KV cache of every column but the last (the prompts' prefix; no hooks are active here)."""
        out = self.model(input_ids=input_ids[:, :-1], attention_mask=mask[:, :-1], position_ids=positions[:, :-1],
                         use_cache=True, **self._keep_last())
        return getattr(out, self.cache_kw)

    def _keep_last(self) -> dict[str, int]:
        return {self.keep_kw: 1} if self.keep_kw else {}  # logits of the last column only

    def _prefill(self, input_ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                 prompt_ids: list[list[int]], prefix: object | None):
        """Run the prompts (only their last token on top of `prefix`, a prefix KV cache, when given);
        return the KV cache and each row's next-token logits.

        Without hooks, identical prompts (a group of RL rollouts) share one prefill: the distinct
        ones are run and their cache rows copied. Hooks must see every row, so they get no sharing.
        """
        if prefix is not None:
            out = self.model(input_ids=input_ids[:, -1:], attention_mask=mask, position_ids=positions[:, -1:],
                             use_cache=True, **{self.cache_kw: prefix}, **self._keep_last())
            return getattr(out, self.cache_kw), out.logits[:, -1]
        slot: dict[tuple[int, ...], int] = {}  # prompt ids -> position among the distinct prompts
        copies = list(range(len(prompt_ids))) if self.hooks else \
            [slot.setdefault(tuple(i), len(slot)) for i in prompt_ids]
        distinct = [copies.index(k) for k in range(max(copies) + 1)]  # first row of each distinct prompt
        out = self.model(
            input_ids=input_ids[distinct],
            attention_mask=mask[distinct],
            position_ids=positions[distinct],
            use_cache=True,
            **self._keep_last(),
        )
        cache, logits = getattr(out, self.cache_kw), out.logits[:, -1]
        if len(distinct) < len(prompt_ids):
            copies_t = torch.tensor(copies, device=self.device)
            cache.batch_select_indices(copies_t)
            logits = logits[copies_t]
        return cache, logits

    def _generator(self, row: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed((self.cfg.seed * 1_000_003 + row) % 2**63)

    def _next_tokens(self, logits: torch.Tensor, generators: list[torch.Generator] | None) -> torch.Tensor:
        if generators is None:
            return logits.argmax(-1)
        logits = logits / self.cfg.temperature
        if self.cfg.top_k is not None and self.cfg.top_k < logits.shape[-1]:
            kth = logits.topk(self.cfg.top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = logits.softmax(-1)
        return torch.cat([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, generators)])

    def _finish(self, completions: list[list[int]], reasons: list[str | None], row: int, token: int) -> bool:
        """Append `token` to `row`'s completion; True (and the reason recorded) if the row is done."""
        ids = completions[row]
        ids.append(token)
        if token in self.eos:
            reasons[row] = "eos"
        elif self.cfg.stop_strings:
            tail = self.tokenizer.decode(ids[-self.stop_window :], skip_special_tokens=False)
            if any(s in tail for s in self.cfg.stop_strings):
                reasons[row] = "stop"
        return reasons[row] is not None

    def _result(self, ids: list[int], reason: str, prompt_tokens: int) -> Generation:
        text = reply_text(self.tokenizer, ids)
        if reason == "stop":
            ends = [text.find(s) + len(s) for s in self.cfg.stop_strings if s in text]
            if ends:
                text = text[: min(ends)]
        return Generation(text=text, token_ids=ids, prompt_tokens=prompt_tokens, finish_reason=reason)


# ---------------------------------------------------------------- static decoding


def _cache_tensors(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(keys, values) of each layer of a transformers KV cache, (batch, kv_heads, seq, head_dim) each."""
    layers = getattr(cache, "layers", None)
    if layers is not None:  # transformers >= 4.56
        return [(layer.keys, layer.values) for layer in layers]
    return list(zip(cache.key_cache, cache.value_cache))


_STOP_TABLES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def stop_candidates(tokenizer, stop_strings: Sequence[str], eos: set[int], vocab_size: int) -> np.ndarray:
    """(vocab_size,) bool: the tokens after which the eager loop could stop a row — eos ids, and every token
    whose own text holds the last character of a stop string. A stop string can only be completed by a
    token holding its last character when that character is ASCII and not a space (bytes decode alone);
    otherwise every token is a candidate. Cached per tokenizer."""
    key = (tuple(stop_strings), tuple(sorted(eos)), vocab_size)
    tables = _STOP_TABLES.setdefault(tokenizer, {})
    if key not in tables:
        ends = {s[-1] for s in stop_strings}
        if any(not c.isascii() or c.isspace() for c in ends):
            table = np.ones(vocab_size, dtype=bool)
        else:
            texts = tokenizer.batch_decode([[i] for i in range(vocab_size)], skip_special_tokens=False) if ends else []
            table = np.array([any(c in text for c in ends) for text in texts] or [False] * vocab_size, dtype=bool)
        table[[i for i in eos if 0 <= i < vocab_size]] = True
        tables[key] = table
    return tables[key]


class _StopScan:
    """The eager loop's stopping rule (`_Decoder._finish`) over blocks of tokens read back from a static
    decode. Only candidate tokens (`stop_candidates`) are checked, in order, so the outcome is the eager one."""

    def __init__(self, decoder: "_Decoder", n: int):
        self.decoder = decoder
        self.completions: list[list[int]] = [[] for _ in range(n)]
        self.reasons: list[str | None] = [None] * n
        vocab = decoder.model.get_output_embeddings().weight.shape[0]
        self.table = stop_candidates(decoder.tokenizer, decoder.cfg.stop_strings, decoder.eos, vocab)

    def update(self, block: np.ndarray, rows: Sequence[int] | None = None) -> bool:
        """Feed the next tokens, (len(rows), k), of `rows` (default: every row); True once every row is done."""
        candidate = self.table[np.minimum(block, len(self.table) - 1)] | (block >= len(self.table))
        for r, tokens, marks in zip(range(len(block)) if rows is None else rows, block.tolist(), candidate):
            if self.reasons[r] is not None:
                continue
            start = 0
            for j in np.flatnonzero(marks).tolist():
                self.completions[r].extend(tokens[start:j])
                start = j + 1
                if self.decoder._finish(self.completions, self.reasons, r, tokens[j]):
                    break
            else:
                self.completions[r].extend(tokens[start:])
        return all(reason is not None for reason in self.reasons)

    def results(self, prompt_ids: list[list[int]]) -> list[Generation]:
        return [self.decoder._result(ids, reason or "length", len(p))
                for ids, reason, p in zip(self.completions, self.reasons, prompt_ids)]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class _StaticStep:
    """One greedy decode step for `rows` rows over buffers of fixed shape and address.

    It feeds `tokens` at `positions` through the decoder blocks, writes each layer's K/V at `column` into
    `keys`/`values`, attends to the columns `mask` allows, writes the argmax into `out[:, index]` and
    advances every counter on the device: consecutive calls decode consecutive tokens with nothing read or
    written by the host, so on CUDA it is captured once (`capture`) and replayed.

    The blocks are run from their own modules (norms, projections, rotary embedding, MLP) with the attention
    written out here as transformers' sdpa path computes one query token (the query heads grouped by their
    KV head, no repeated KV): the same arithmetic as the eager loop, independent of the transformers version.
    Columns not written yet hold zeros or an earlier batch's values — finite, so their zero weights stay zero.
    """

    def __init__(self, model: torch.nn.Module, keys: list[torch.Tensor], values: list[torch.Tensor],
                 hooks: dict[int, ResidualHook]):
        self.model, self.inner, self.layers = model, model.model, decoder_layers(model)
        self.keys, self.values = keys, values
        rows, _, columns, _ = keys[0].shape
        dev = keys[0].device
        self.tokens = torch.zeros(rows, dtype=torch.long, device=dev)
        self.positions = torch.zeros((rows, 1), dtype=torch.long, device=dev)
        self.column = torch.zeros(1, dtype=torch.long, device=dev)
        self.index = torch.zeros(1, dtype=torch.long, device=dev)
        self.mask = torch.zeros((rows, 1, 1, columns), dtype=torch.bool, device=dev)
        self.out = torch.zeros((rows, columns), dtype=torch.long, device=dev)
        self.rows = torch.zeros(rows, dtype=torch.long, device=dev)
        self.ctx = HookContext(1, False, torch.ones((rows, 1), dtype=torch.bool, device=dev), None, self.rows)
        self.hooks = hooks
        self.replay_inputs: dict[int, tuple[torch.Tensor, ...]] = {}
        self.graph: torch.cuda.CUDAGraph | None = None
        self.written = 0
        """KV columns written so far, host side: on CPU a step attends to these only (on CUDA to all)."""

    def load(self, kv: list[tuple[torch.Tensor, torch.Tensor]], mask: torch.Tensor, first: torch.Tensor,
             prompt_lens: torch.Tensor, rows: torch.Tensor) -> None:
        """Start a batch: its prompts' KV cache, attention mask (n, width), first tokens, lengths and rows."""
        width = mask.shape[1]
        for (keys, values), target_keys, target_values in zip(kv, self.keys, self.values):
            target_keys[:, :, :width].copy_(keys)
            target_values[:, :, :width].copy_(values)
        self.mask.zero_()
        self.mask[:, 0, 0, :width].copy_(mask.bool())
        self.tokens.copy_(first)
        self.positions.copy_(prompt_lens[:, None])
        self.column.fill_(width)
        self.written = width
        self.index.zero_()
        self.out[:, 0].copy_(first)
        self.rows.copy_(rows)

    def _block(self, i: int, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               columns: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Decoder block i for one token per row, (rows, 1, d_model) → the residual after it; or for several,
        (rows, T, d_model), written at KV `columns` (T,) and attending as `mask` (rows, 1, T, columns read) says."""
        layer = self.layers[i]
        attn = layer.self_attn
        x = layer.input_layernorm(hidden)
        heads = (*x.shape[:-1], -1, attn.head_dim)
        query = attn.q_proj(x).view(heads).transpose(1, 2)
        key = attn.k_proj(x).view(heads).transpose(1, 2)
        value = attn.v_proj(x).view(heads).transpose(1, 2)
        query = query * cos + _rotate_half(query) * sin
        key = key * cos + _rotate_half(key) * sin
        self.keys[i].index_copy_(2, self.column if columns is None else columns, key)
        self.values[i].index_copy_(2, self.column if columns is None else columns, value)
        rows, n_heads, tokens, head_dim = query.shape
        kv_heads = key.shape[1]
        if mask is None:
            end = self.written if self.mask.device.type == "cpu" else self.mask.shape[-1]  # CUDA: fixed shapes
            mask = self.mask[..., :end]
        else:  # several tokens: the query heads of a KV head and their tokens fold into one query axis
            end = mask.shape[-1]
            mask = mask.repeat(1, 1, n_heads // kv_heads, 1)
        out = torch.nn.functional.scaled_dot_product_attention(
            query.reshape(rows, kv_heads, n_heads // kv_heads * tokens, head_dim), self.keys[i][:, :, :end],
            self.values[i][:, :, :end], attn_mask=mask, scale=attn.scaling)
        out = out.reshape(rows, n_heads, tokens, head_dim).transpose(1, 2).contiguous().reshape(*x.shape[:-1], -1)
        hidden = hidden + attn.o_proj(out)
        return hidden + layer.mlp(layer.post_attention_layernorm(hidden))

    def forward(self, hooks: dict[int, ResidualHook] | None = None, ctx: HookContext | None = None) -> None:
        """The step: only device work on the buffers (no host sync, no data-dependent shape). `hooks` and `ctx`
        replace the step's decode hooks and context for one uncaptured call (`prefill_last`)."""
        hooks, ctx = (self.hooks, self.ctx) if hooks is None else (hooks, ctx or self.ctx)
        self.mask.index_fill_(3, self.column, True)
        self.written += 1
        hidden = self.inner.embed_tokens(self.tokens[:, None])
        cos, sin = self.inner.rotary_emb(hidden, self.positions)
        cos, sin = cos[:, None], sin[:, None]  # over the heads
        for i in range(len(self.layers)):
            hidden = self._block(i, hidden, cos, sin)
            if i in hooks:
                new = hooks[i](hidden, ctx)
                if new is not None:
                    if new.shape != hidden.shape:
                        raise ValueError(f"hook at layer {i} returned shape {tuple(new.shape)}, "
                                         f"expected {tuple(hidden.shape)}")
                    hidden = new
        logits = self.model.get_output_embeddings()(self.inner.norm(hidden))[:, -1]
        token = logits.float().argmax(-1)
        self.index += 1
        self.out.index_copy_(1, self.index, token[:, None])
        self.tokens.copy_(token)
        self.positions += 1
        self.column += 1

    def compacted(self, keep: list[int]) -> "_StaticStep":
        """The step for only the rows `keep` (uncaptured steps: the eager loop's dropping of finished rows), in
        the same KV storage, with their caches, tokens and counters: decoding goes on where this one stopped."""
        index = torch.tensor(keep, dtype=torch.long, device=self.tokens.device)
        kept = [t[index] for t in (*self.keys, *self.values)]  # copied out before the shared storage is rewritten
        small = _static_step(self.model, len(keep), self.mask.shape[-1], list(zip(self.keys, self.values)),
                             self.hooks)
        for target, source in zip((*small.keys, *small.values), kept):
            target.copy_(source)
        for target, source in ((small.mask, self.mask), (small.tokens, self.tokens), (small.positions, self.positions),
                               (small.out, self.out), (small.rows, self.rows)):
            target.copy_(source[index])
        small.column.copy_(self.column)
        small.written = self.written
        small.index.copy_(self.index)
        small.ctx.step = self.ctx.step
        return small

    def prefill_last(self, hooks: dict[int, ResidualHook], ctx: HookContext) -> torch.Tensor:
        """Each row's first reply token (greedy) after the prefill of its last prompt token, on a step `load`ed
        with the prompts' prefix (its KV, and the last prompt tokens as the tokens to feed): the blocks run with
        every hook of `hooks` under the prefill context `ctx`, the token's K/V is written in place, and the step
        is left as `load` leaves it for the whole prompt. Uncaptured."""
        self.forward(hooks, ctx)
        self.index.zero_()
        self.out[:, 0].copy_(self.tokens)
        return self.tokens.clone()

    def greedy_after(self, fed: torch.Tensor) -> torch.Tensor:
        """The greedy token after each prefix of `fed` (rows, T): the tokens the coming steps would feed, and the
        ones after them, teacher-forced in one forward (`_Decoder._accept_drafts`). Their K/V go into the columns
        those steps write over before they read them, and no counter moves: decoding goes on from where `load`
        left it. Uncaptured, without hooks (prefill-only hooks do nothing after the prefill)."""
        rows, tokens = fed.shape
        start, head, picks = self.written, self.model.get_output_embeddings(), []
        for first in range(0, tokens, DRAFT_CHUNK):  # DRAFT_CHUNK tokens a forward, each after the ones before
            chunk = fed[:, first:first + DRAFT_CHUNK]
            n, end = chunk.shape[1], start + first + chunk.shape[1]
            hidden = self.inner.embed_tokens(chunk)
            cos, sin = self.inner.rotary_emb(hidden, self.positions + first + torch.arange(n, device=fed.device))
            cos, sin = cos[:, None], sin[:, None]
            mask = self.mask[..., :end].expand(rows, 1, n, end).clone()
            mask[..., start:end - n] = True  # the draft tokens of earlier chunks
            mask[..., end - n:] = torch.ones(n, n, dtype=torch.bool, device=fed.device).tril()
            columns = torch.arange(end - n, end, device=fed.device)
            for i in range(len(self.layers)):
                hidden = self._block(i, hidden, cos, sin, columns, mask)
            hidden = self.inner.norm(hidden)
            # logits one column at a time: the memory a decode step's plan holds for them (`decode_bytes_per_row`)
            picks += [head(hidden[:, t]).float().argmax(-1) for t in range(n)]
        return torch.stack(picks, 1)

    def logprobs_after(self, layer: int, deltas: Sequence[torch.Tensor], token: int) -> torch.Tensor:
        """log p(`token` next), (len(deltas), rows), with deltas[j] added to the residual after block `layer` at the
        token this step feeds: the blocks up to `layer` run once for every delta, the later ones once per delta
        (each overwrites the same KV column). Uncaptured only."""
        self.mask.index_fill_(3, self.column, True)
        self.written += 1
        hidden = self.inner.embed_tokens(self.tokens[:, None])
        cos, sin = self.inner.rotary_emb(hidden, self.positions)
        cos, sin = cos[:, None], sin[:, None]
        for i in range(layer + 1):
            hidden = self._block(i, hidden, cos, sin)
        out = torch.empty(len(deltas), len(self.tokens))
        for j, delta in enumerate(deltas):
            steered = hidden + delta.to(hidden.device, hidden.dtype)
            for i in range(layer + 1, len(self.layers)):
                steered = self._block(i, steered, cos, sin)
            logits = self.model.get_output_embeddings()(self.inner.norm(steered))[:, -1]
            out[j] = logits.float().log_softmax(-1)[:, token].cpu()
        return out

    def capture(self) -> None:
        """Record `forward` as a CUDA graph (after warm-up runs on a side stream, which settle the libraries'
        handles and workspaces; `load` comes after, so what the warm-up wrote is overwritten)."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self.forward()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.forward()
        self.graph = graph

    def __call__(self, step: int) -> None:
        """Decode token `step` (1 = the first after the prefill's)."""
        if self.graph is not None:
            self.graph.replay()
            return
        self.ctx.step = step
        self.forward()


def _hook_key(hooks: dict[int, ResidualHook]) -> tuple:
    """What a captured step's hooks are, for re-use: a replayable hook by its key and input shapes, any other
    hook by identity (the step keeps it alive, so the identity stays unique)."""
    parts = []
    for layer, hook in sorted(hooks.items()):
        replay: Replay | None = getattr(hook, "replay", None)
        parts.append((layer, id(hook)) if replay is None else
                     (layer, replay.key, tuple((tuple(t.shape), t.dtype, t.device) for t in replay.inputs)))
    return tuple(parts)


class _StepCache:
    """Per model: KV storage shared by its steps (one batch decodes at a time) and the steps themselves, least
    recently used dropped first. On CUDA each new step is captured; a capture that fails leaves every later
    step of the model uncaptured (still correct, only slower)."""

    def __init__(self) -> None:
        self.storage: list[torch.Tensor] = []
        self.steps: OrderedDict[tuple, _StaticStep] = OrderedDict()
        self.capture_error: str | None = None
        self.captures = 0

    def get(self, model: torch.nn.Module, rows: int, columns: int, like: torch.Tensor, n_layers: int,
            hooks: dict[int, ResidualHook]) -> _StaticStep:
        key = (rows, columns, like.dtype, _hook_key(hooks))
        step = self.steps.get(key)
        if step is not None:
            self.steps.move_to_end(key)
            for layer, captured in step.replay_inputs.items():  # the same key: these hooks are replayable
                for target, given in zip(captured, hooks[layer].replay.inputs):
                    target.copy_(given)
            return step
        shape = (rows, like.shape[1], columns, like.shape[3])
        size = rows * like.shape[1] * columns * like.shape[3]
        if not self.storage or self.storage[0].numel() < size or self.storage[0].dtype != like.dtype:
            self.steps.clear()  # their views point into the old storage
            self.storage = []
            self.storage = [torch.zeros(size, dtype=like.dtype, device=like.device) for _ in range(2 * n_layers)]
        views = [t[:size].view(shape) for t in self.storage]
        built, inputs = {}, {}
        for layer, hook in hooks.items():
            replay: Replay | None = getattr(hook, "replay", None)
            if replay is None:
                built[layer] = hook
            else:
                inputs[layer] = tuple(t.detach().clone() for t in replay.inputs)
                built[layer] = replay.build(*inputs[layer])
        step = _StaticStep(model, views[0::2], views[1::2], built)
        step.replay_inputs = inputs
        if like.device.type == "cuda" and self.capture_error is None:
            try:
                step.capture()
                self.captures += 1
            except Exception as err:  # e.g. a kernel that cannot be captured: decode uncaptured from now on
                self.capture_error = f"{type(err).__name__}: {err}".splitlines()[0]
                logging.getLogger(__name__).warning(f"static decoding: CUDA graph capture failed "
                                                    f"({self.capture_error}); decoding without a graph")
                step.graph = None
        self.steps[key] = step
        while len(self.steps) > GRAPHS_PER_MODEL:
            self.steps.popitem(last=False)
        return step


_STEPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _step_cache(model: torch.nn.Module) -> _StepCache:
    return _STEPS.setdefault(model, _StepCache())


def static_decode_stats(model: torch.nn.Module) -> dict[str, object]:
    """The model's static decoding so far: CUDA graphs captured, steps kept, the capture error if any."""
    cache = _STEPS.get(model)
    if cache is None:
        return {"captures": 0, "steps": 0, "capture_error": None}
    return {"captures": cache.captures, "steps": len(cache.steps), "capture_error": cache.capture_error}


def steered_logprobs(model: torch.nn.Module, tokenizer, prompt_ids: list[list[int]], layer: int,
                     deltas: Sequence[torch.Tensor], token: int,
                     prefix_cache: PrefixCache | None = None) -> torch.Tensor | None:
    """log p(`token` right after the prompt), (len(deltas), len(prompt_ids)), with deltas[j] added to the residual
    after block `layer` at each prompt's last token, or None where the static step cannot run `model` uncaptured
    (or failed its first-contact check): the prompts' prefix runs once (or comes from `prefix_cache`), their last
    token through the blocks up to `layer` once, and only the blocks after it once per delta, on preallocated KV
    (no cache copy per delta). Each prompt needs at least two tokens."""
    cfg = GenerationConfig(max_new_tokens=1, decode="auto", stop_strings=())
    decoder = _Decoder(model, tokenizer, cfg, None, prefix_cache)
    if not decoder.static or decode_mode(model, cfg) != "static":
        return None  # on CUDA the steps are captured: the caller's per-delta forward stays the path there
    input_ids, mask = decoder._left_pad(prompt_ids)
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    compute = lambda: decoder._prefix(input_ids, mask, positions)  # noqa: E731
    kv = _cache_tensors(prefix_cache.stored(prompt_ids, compute) if prefix_cache is not None else compute())
    width = mask.shape[1]  # the prefix's columns and the last token's
    step = _static_step(model, len(prompt_ids), -(-width // STATIC_COLUMNS) * STATIC_COLUMNS, kv, {})
    step.load(kv, mask[:, :-1], input_ids[:, -1], mask[:, :-1].sum(1), torch.arange(len(prompt_ids)))
    return step.logprobs_after(layer, deltas, token)


def _static_step(model: torch.nn.Module, rows: int, columns: int, kv: list[tuple[torch.Tensor, torch.Tensor]],
                 hooks: dict[int, ResidualHook]) -> _StaticStep:
    """The model's step for `rows` rows, `columns` KV columns and the hooks that act in decode steps (hooks
    marked `prefill_only` return None there and are left out), re-used across calls and batches."""
    decode_hooks = {layer: hook for layer, hook in hooks.items() if not getattr(hook, "prefill_only", False)}
    return _step_cache(model).get(model, rows, columns, kv[0][0], len(kv), decode_hooks)
