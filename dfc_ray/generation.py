"""Batched generation (left padding + KV cache) with hook points on the residual stream.

Our own decode loop rather than `model.generate`: interventions must know exactly which positions
are prompt, padding or generated (the seed study read a pad as "the last token"), and batching must
never change a reply, so evaluation numbers do not depend on `batch_size`.

A `PrefixCache` keeps the KV cache of every prompt token but the last across `generate` calls. The
judges splice and steer at the last prompt token only, so every trial re-uses the prompts' prefill
and pays for one prompt token plus the reply (about 4x less work per generation on the organism).
"""

from __future__ import annotations

import copy
import inspect
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence, Union

import torch

from dfc_ray.config import GenerationConfig

EOS_TOKENS = ("<|im_end|>", "<|endoftext|>")
"""Tokens that end a reply in Qwen-style chat templates, besides `tokenizer.eos_token`."""


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
    """0 = prefill (the whole prompt), then 1, 2, ... = one new token per row per call."""
    is_prefill: bool
    """True for step 0 (and for a plain forward over a padded batch)."""
    real_mask: torch.Tensor
    """(batch, seq_this_step) bool: True at real tokens (prompt tokens in prefill, the newly fed
    token in a decode step), False at left padding."""
    last_prompt_index: torch.Tensor | None
    """(batch,) long: index along this call's seq dimension of each row's last prompt token, during
    prefill only (None in decode steps). Under generate's left padding it is the last column."""
    rows: torch.Tensor
    """(batch,) long: index into the original prompt list of each row of this call. Finished rows
    are dropped from the batch, so during decoding these are exactly the rows still active."""

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
        """A private copy of the batch's prefix KV cache; `compute()` makes it (without hooks) on first use."""
        key = tuple(tuple(ids) for ids in prompt_ids)
        if key in self._entries:
            self.hits += 1
        else:
            self.misses += 1
            self._entries[key] = compute()
        return copy.deepcopy(self._entries[key])


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

    return leaves_prefix_alone(hook)


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


def eos_token_ids(tokenizer) -> set[int]:
    """tokenizer.eos_token_id plus <|im_end|> / <|endoftext|> when the vocabulary has them."""
    vocab = tokenizer.get_vocab()
    ids = {vocab[t] for t in EOS_TOKENS if t in vocab}
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
) -> list[Generation]:
    """Complete each rendered prompt; batched output equals one-at-a-time output (fp32).

    Prompts are tokenized without special tokens, sorted by length (less padding; results are
    batch-invariant) and decoded `cfg.batch_size` at a time; results come back in input order.
    With `prefix_cache` (for this model) the prompts' prefill is re-used across calls: only valid for
    hooks that act at the last prompt token or later (see PrefixCache).
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
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    decoder = _Decoder(model, tokenizer, cfg, hooks, prefix_cache)
    results: list[Generation | None] = [None] * len(encoded)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(order), cfg.batch_size):
                rows = order[start : start + cfg.batch_size]
                for row, gen in zip(rows, decoder.run([encoded[i] for i in rows], rows)):
                    results[row] = gen
    finally:
        model.train(was_training)
    return results


class _Decoder:
    """The decode loop for one batch; holds what is fixed across batches."""

    def __init__(self, model, tokenizer, cfg: GenerationConfig, hooks: dict[int, ResidualHook] | None,
                 prefix_cache: PrefixCache | None = None):
        self.model, self.tokenizer, self.cfg, self.hooks = model, tokenizer, cfg, hooks
        self.prefix_cache = prefix_cache
        self.device = next(model.parameters()).device
        self.eos = eos_token_ids(tokenizer)
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.eos, default=0)
        # The cache keyword is `cache` in transformers >= 5.x and `past_key_values` before.
        params = inspect.signature(model.forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"
        self.keep_kw = next((k for k in ("logits_to_keep", "num_logits_to_keep") if k in params), None)
        # A stop string's characters come from at most len(stop) tokens: decode only that tail.
        self.stop_window = max((len(s) for s in cfg.stop_strings), default=0) + 1

    def run(self, prompt_ids: list[list[int]], rows: list[int]) -> list[Generation]:
        cfg, dev, n = self.cfg, self.device, len(prompt_ids)
        input_ids, mask = self._left_pad(prompt_ids)
        prompt_lens = mask.sum(1)
        all_rows = torch.tensor(rows, device=dev)
        generators = [self._generator(row) for row in rows] if cfg.do_sample else None
        completions: list[list[int]] = [[] for _ in range(n)]
        reasons: list[str | None] = [None] * n
        live = torch.arange(n, device=dev)  # batch rows still generating, in cache order

        positions = (mask.cumsum(1) - 1).clamp(min=0)  # pads do not shift the prompt's positions
        prefix = None
        if self.prefix_cache is not None and min(len(p) for p in prompt_ids) >= 2:  # outside the hooks
            prefix = self.prefix_cache.copy_for(prompt_ids, lambda: self._prefix(input_ids, mask, positions))
        fed = 1 if prefix is not None else mask.shape[1]  # columns this prefill feeds (the last one, or all)
        ctx = HookContext(0, True, mask[:, -fed:].bool(), torch.full((n,), fed - 1, device=dev), all_rows)
        with residual_hooks(self.model, self.hooks, lambda: ctx):
            cache, logits = self._prefill(input_ids, mask, positions, prompt_ids, prefix)
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
        text = self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        if reason == "stop":
            ends = [text.find(s) + len(s) for s in self.cfg.stop_strings if s in text]
            if ends:
                text = text[: min(ends)]
        return Generation(text=text, token_ids=ids, prompt_tokens=prompt_tokens, finish_reason=reason)
