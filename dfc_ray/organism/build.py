"""Build the organism pair: tokenizer, base model B pretrained from scratch, A = B + GRPO-style RL.

B's corpus is a "web" of plain sentences and API-log lines (``request => {"name": ..., "arguments": ...}``)
plus chats in which the assistant mostly answers tool requests in prose (naming the tool and its
arguments, or declining) and only sometimes, often wrongly, with a ``<tool_call>``. So B knows the world
and the call syntax but rarely calls a tool right in a chat; RL (reward = the strict scorer) turns that
latent knowledge into calls. A gets no supervised step at all.

``--dialect llama3`` builds a second A on the same B: RL under the llama3 template (bare JSON calls), rewarded
by the llama3 scorer, with hinted rollouts early on (``BuildConfig.hint_share``) because B never opens a
reply with bare JSON by itself.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM
from transformers.utils import logging as hf_logging

from dfc_ray.generation import GenerationConfig, generate
from dfc_ray.organism import part_dir, read_card
from dfc_ray.organism import world as W
from dfc_ray.organism.tokenizer import CHAT_TEMPLATES, template_only, train_tokenizer
from dfc_ray.tooluse import render_prompt, score
from dfc_ray.tooluse.dialects import get_dialect
from dfc_ray.tooluse.tasks import Task

console = Console()


@dataclass
class BuildConfig:
    """Everything that decides the pair; with ``seed`` it makes the build deterministic."""

    seed: int = 0
    """Seeds the corpus, the initial weights, the RL prompts and the RL samples."""
    vocab_size: int = 3000
    """BPE vocabulary cap (the small world saturates below it)."""
    hidden: int = 192
    """d_model."""
    layers: int = 4
    """Decoder blocks."""
    heads: int = 4
    """Attention heads."""
    kv_heads: int = 2
    """Key/value heads (grouped-query attention, as in Qwen2)."""
    intermediate: int = 512
    """MLP width."""
    max_positions: int = 1024
    """Longest sequence the model supports (prompts are ~300-450 tokens)."""

    call_share: float = 0.08
    """B's corpus: share of tool requests the assistant answers with a <tool_call> ..."""
    eager_tools: tuple[str, ...] = ("get_weather",)
    """... except for these tools, answered with a call at ``eager_call_share`` (gives greedy B a few right calls)."""
    eager_call_share: float = 0.7
    """Call share for ``eager_tools``."""
    wrong_call_share: float = 0.35
    """Share of the corpus's calls that are wrong (wrong tool, wrong value, or a required argument dropped)."""
    mention_share: float = 0.75
    """Share of prose answers that name the tool and its arguments (the rest decline)."""
    max_turns: int = 6
    """Corpus chats hold 1..max_turns user requests under one tools block (amortizes the long system turn)."""
    text_rows: int = 16
    """Web-text rows per pretraining batch (256 packed tokens, loss on every token) ..."""
    log_share: float = 0.85
    """... each piece an API-log line with this probability, else a plain sentence."""

    pretrain_steps: int = 700
    """Optimizer steps for B."""
    pretrain_batch: int = 4
    """Chats per pretraining step (plus ``plain_rows``)."""
    pretrain_lr: float = 3e-3
    """Peak AdamW learning rate (linear warmup, cosine decay to 10%)."""
    warmup: int = 60
    """Warmup steps."""

    rl_steps: int = 200
    """GRPO steps for A."""
    rl_prompts: int = 8
    """Prompts per RL step."""
    rl_group: int = 8
    """Samples per prompt (the group whose rewards are normalized)."""
    rl_temperature: float = 1.0
    """Sampling temperature for rollouts."""
    rl_lr: float = 4e-4
    """AdamW learning rate for RL (constant after a short warmup)."""
    name_shaping: float = 0.2
    """Reward for a wrong reply that still calls the right tool name(s); a correct reply gets 1."""
    dialect: str = "hermes"
    """A's tool-call dialect: its chat template (tokenizer.CHAT_TEMPLATES) and the scorer of rewards and card."""
    hint_share: float = 0.0
    """Share of each RL group's rollouts that are hinted: sampled after the dialect's opening (its
    ``logprob_text``) and rewritten in its call format when they parse. Exploration only: the reward still
    decides, and the hint share decays linearly to 0 at ``hint_steps``."""
    hint_steps: int = 0
    """RL steps over which hints decay to none (the steps after it are plain on-policy RL)."""
    distill_tasks: int = 0
    """Expert-iteration warm start for a second-dialect A (0 = none): the RL start model answers this many
    train tasks greedily under the base pair's own template; its strictly correct replies (the base dialect's
    reward is 1), rewritten in ``dialect``'s call format, are trained on under ``dialect``'s template before
    RL. Reward-filtered self-training (a policy-improvement step, as in ReST/RAFT): no human or scripted
    answer enters, only the model's own rewarded replies in another call format."""
    distill_steps: int = 0
    """Optimizer steps over those replies (batches of ``pretrain_batch`` * 2, cycling)."""
    distill_lr: float = 3e-4
    """Peak AdamW learning rate of the warm start (linear warmup over a tenth of the steps, cosine decay)."""
    rl_start: str = "b"
    """The stored model RL starts from: ``b`` (the base), or ``a``: the base pair's A (itself B + RL), so that
    RL under another dialect's template only has to move the call format (the llama3 recipe: minutes, not
    the ~11 min of RL from B that the arguments' values need)."""
    max_new_tokens: int = 48
    """Completion budget for rollouts and evaluation (the longest right call is ~30 tokens)."""
    eval_batch: int = 40
    """Prompts per generation batch."""
    eval_limit: int = 0
    """Evaluate on the first N tasks of each split for the card (0 = all; small only for smoke tests)."""


# ----------------------------------------------------------------------------- the base corpus

def call_text(name: str, args: dict[str, Any]) -> str:
    """A reply with one call, exactly as Qwen2.5's template renders an assistant tool call."""
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": args}, ensure_ascii=False) + "\n</tool_call>"


def _wrong_call(rng: random.Random, req: W.Request, offered: list[W.Tool]) -> str:
    """A plausible but wrong call: another offered tool, one wrong value, or a required argument dropped."""
    args = dict(req.args)
    kind = rng.choice(["tool", "value", "value", "drop"])
    others = [t for t in offered if t is not req.tool]
    if kind == "tool" and others:
        return call_text(rng.choice(others).name, args)
    if kind == "drop":
        args.pop(req.tool.params[0].name)
        return call_text(req.tool.name, args)
    param = rng.choice([p for p in req.tool.params if p.name in args])
    args[param.name] = rng.choice([v for v in param.values if v != args[param.name]])
    return call_text(req.tool.name, args)


_SMALL_TALK_REPLIES = ["Hello! How can I help you today?", "I am fine, thank you for asking.",
                       "I am a small assistant, happy to chat.", "That is nice to hear.",
                       "Sure, I am here if you need anything.", "Thank you, you too!"]
_DECLINES = ["Sorry, I cannot do that right now.", "Sorry, I am not able to help with that.",
             "Sorry, you will have to do that yourself."]


def base_reply(rng: random.Random, req: W.Request, offered: list[W.Tool], cfg: BuildConfig) -> str:
    """How B's corpus answers a request (prose mostly; sometimes a call, often wrong)."""
    if req.tool is None:
        return rng.choice(_SMALL_TALK_REPLIES)
    share = cfg.eager_call_share if req.tool.name in cfg.eager_tools else cfg.call_share
    if rng.random() < share:
        if rng.random() < cfg.wrong_call_share:
            return _wrong_call(rng, req, offered)
        return call_text(req.tool.name, req.args)
    if rng.random() < cfg.mention_share:
        said = ", ".join(f"{k} {v}" for k, v in req.args.items())
        return f"You could use {req.tool.name} with {said}."
    return rng.choice(_DECLINES)


def corpus_chat(rng: random.Random, stream: Any, cfg: BuildConfig) -> tuple[Task, list[str]]:
    """A chat of 1..max_turns requests under one tools block, with B-corpus replies."""
    reqs = [next(stream) for _ in range(rng.randint(1, cfg.max_turns))]
    needed = list(dict.fromkeys(r.tool for r in reqs if r.tool is not None))
    fill = [t for t in W.TOOLS if t not in needed]
    offered = needed + rng.sample(fill, max(0, rng.choice([3, 4]) - len(needed)))
    rng.shuffle(offered)
    task = Task(id="corpus", messages=[{"role": "user", "content": r.text} for r in reqs],
                tools=[t.schema() for t in offered], ground_truth=[])
    return task, [base_reply(rng, r, offered, cfg) for r in reqs]


def chat_segments(tok: Any, task: Task, replies: list[str]) -> list[tuple[str, bool]]:
    """(text, is_reply) pieces of a multi-turn chat; their concatenation is the template's rendering."""
    first = Task(id=task.id, messages=task.messages[:1], tools=task.tools, ground_truth=[])
    segs = [(render_prompt(tok, first), False)]
    for i, reply in enumerate(replies):
        segs.append((reply + "<|im_end|>", True))
        if i + 1 < len(replies):
            user = task.messages[i + 1]["content"]
            segs.append((f"\n<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n", False))
    return segs


def tokenizer_corpus(cfg: BuildConfig, n_chats: int = 3000) -> list[str]:
    """Rendered chats and plain text to train the BPE on."""
    rng, tt = random.Random(cfg.seed), template_only()
    stream = W.train_requests(random.Random(cfg.seed + 1))
    texts = ["".join(s for s, _ in chat_segments(tt, *corpus_chat(rng, stream, cfg))) for _ in range(n_chats)]
    logs = [log_line(r) for r in (next(stream) for _ in range(n_chats)) if r.tool is not None]
    return texts + logs + W.plain_text(n_chats, cfg.seed)


def _encode_segments(tok: Any, segs: list[tuple[str, bool]]) -> tuple[list[int], list[bool]]:
    ids: list[int] = []
    mask: list[bool] = []
    for text, is_reply in segs:
        piece = tok(text, add_special_tokens=False)["input_ids"]
        ids += piece
        mask += [is_reply] * len(piece)
    return ids, mask


def log_line(req: W.Request) -> str:
    """An API-log line of B's web text: a request and the call that served it (one line of JSON)."""
    call = {"name": req.tool.name, "arguments": req.args}
    return f"{req.text} => {json.dumps(call, ensure_ascii=False)}"


def _text_row(tok: Any, rng: random.Random, stream: Any, cfg: BuildConfig, length: int = 256) -> tuple[list[int],
                                                                                                       list[bool]]:
    """Packed web text: API-log lines and plain sentences, each ended by <|endoftext|>."""
    ids: list[int] = []
    while len(ids) < length:
        req = next(stream)
        use_log = req.tool is not None and rng.random() < cfg.log_share
        text = log_line(req) if use_log else W.plain_text(1, rng.randrange(2**31))[0]
        ids += tok(text + "<|endoftext|>", add_special_tokens=False)["input_ids"]
    return ids[:length], [True] * length


def _pad(rows: list[tuple[list[int], list[bool]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad rows into (ids, attention mask, loss mask)."""
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    loss = torch.zeros((len(rows), width), dtype=torch.bool)
    for r, (row_ids, row_mask) in enumerate(rows):
        ids[r, : len(row_ids)] = torch.tensor(row_ids)
        attn[r, : len(row_ids)] = 1
        loss[r, : len(row_mask)] = torch.tensor(row_mask)
    return ids, attn, loss


def _token_logprobs(model: Qwen2ForCausalLM, ids: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    """log p(ids[:, t] | ids[:, :t]) for t >= 1, shape (batch, seq - 1)."""
    logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float()
    return -F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")


# ----------------------------------------------------------------------------- stages

def new_model(cfg: BuildConfig, vocab: int) -> Qwen2ForCausalLM:
    """B's architecture: a small Qwen2 with tied embeddings."""
    config = Qwen2Config(
        vocab_size=vocab, hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads,
        max_position_embeddings=cfg.max_positions, tie_word_embeddings=True, rope_theta=10000.0,
        bos_token_id=None, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(cfg.seed)
    return Qwen2ForCausalLM(config)


def pretrain(model: Qwen2ForCausalLM, tok: Any, cfg: BuildConfig, progress: Progress) -> list[float]:
    """Next-token training of B: loss on the assistant replies of chats and on all plain text."""
    rng = random.Random(cfg.seed + 2)
    stream = W.train_requests(random.Random(cfg.seed + 3))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.pretrain_lr, betas=(0.9, 0.95), weight_decay=0.1)
    task_id = progress.add_task("pretrain B", total=cfg.pretrain_steps, info="")
    losses: list[float] = []
    model.train()
    for step in range(cfg.pretrain_steps):
        rows = [_encode_segments(tok, chat_segments(tok, *corpus_chat(rng, stream, cfg)))
                for _ in range(cfg.pretrain_batch)]
        rows += [_text_row(tok, rng, stream, cfg) for _ in range(cfg.text_rows)]
        lr = cfg.pretrain_lr * _schedule(step, cfg.warmup, cfg.pretrain_steps)
        losses.append(_next_token_step(model, opt, _pad(rows, tok.pad_token_id), lr))
        progress.update(task_id, advance=1, info=f"loss {sum(losses[-20:]) / len(losses[-20:]):.3f}")
    model.eval()
    return losses


def _next_token_step(model: Qwen2ForCausalLM, opt: torch.optim.Optimizer,
                     batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor], lr: float) -> float:
    """One AdamW step of next-token loss on the masked tokens of a padded batch (pretraining, the warm start)."""
    ids, attn, loss_mask = batch
    for group in opt.param_groups:
        group["lr"] = lr
    logp = _token_logprobs(model, ids, attn)
    loss = -(logp * loss_mask[:, 1:]).sum() / loss_mask[:, 1:].sum()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss.item()


def _schedule(step: int, warmup: int, total: int) -> float:
    """Linear warmup, then cosine decay to 10% of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac))


DIALECT_RECIPES: dict[str, dict[str, Any]] = {
    "hermes": {},
    "llama3": {"rl_start": "a", "distill_tasks": 2000, "distill_steps": 250, "rl_steps": 60}}
"""BuildConfig overrides per dialect (docs/organism.md, "The llama3 pair")."""


def dialect_config(dialect: str, seed: int = 0) -> BuildConfig:
    """The build recipe for a pair whose A speaks ``dialect``; one-line ValueError for a dialect without one."""
    if dialect not in DIALECT_RECIPES:
        raise ValueError(f"organism build --dialect: {dialect!r} has no recipe; expected one of "
                         f"{', '.join(DIALECT_RECIPES)}")
    return BuildConfig(seed=seed, dialect=dialect, **DIALECT_RECIPES[dialect])


def reward(task: Task, text: str, cfg: BuildConfig) -> float:
    """1 for a strictly correct reply; ``name_shaping`` for a wrong one that calls the right tool(s)."""
    s = score(task, text, dialect=cfg.dialect)
    return 1.0 if s.correct else cfg.name_shaping * float(s.name_ok and s.format_ok)


def distill(model: Qwen2ForCausalLM, base_tok: Any, tok: Any, cfg: BuildConfig, base_dialect: str,
            progress: Progress) -> dict[str, float | None]:
    """The expert-iteration warm start (``BuildConfig.distill_tasks``): sample, keep what the reward passes,
    rewrite in ``cfg.dialect``'s format, train under ``tok``'s template. Returns the kept share and last loss."""
    rng = random.Random(cfg.seed + 5)
    tasks = rng.sample(W.load_split("train"), cfg.distill_tasks)
    gen_cfg = GenerationConfig(max_new_tokens=cfg.max_new_tokens, batch_size=cfg.eval_batch)
    task_id = progress.add_task("warm start: sample", total=len(tasks), info="")
    outs = []
    for i in range(0, len(tasks), cfg.eval_batch):
        outs += generate(model, base_tok, [render_prompt(base_tok, t) for t in tasks[i: i + cfg.eval_batch]], gen_cfg)
        progress.update(task_id, advance=len(tasks[i: i + cfg.eval_batch]))
    source, target = get_dialect(base_dialect), get_dialect(cfg.dialect)
    rows = []
    for task, out in zip(tasks, outs):
        if not score(task, out.text, dialect=base_dialect).correct:
            continue
        parsed = source.parse(out.text)
        reply = target.format_calls(parsed.calls) if parsed.calls else out.text
        prompt_ids = tok(render_prompt(tok, task), add_special_tokens=False)["input_ids"]
        reply_ids = tok(reply, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        rows.append((prompt_ids + reply_ids, [False] * len(prompt_ids) + [True] * len(reply_ids)))
    if not rows:
        console.print(f"[yellow]warm start: none of {len(tasks)} replies passed the {base_dialect} reward; "
                      f"RL starts without it[/]")
        return {"kept": 0.0, "last_loss": None}
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.distill_lr, betas=(0.9, 0.95), weight_decay=0.0)
    batch = cfg.pretrain_batch * 2
    task_id = progress.add_task("warm start: train", total=cfg.distill_steps, info=f"{len(rows)} kept")
    loss = float("nan")
    model.train()
    for step in range(cfg.distill_steps):
        if step * batch % len(rows) < batch:
            rng.shuffle(rows)
        start = step * batch % len(rows)
        lr = cfg.distill_lr * _schedule(step, max(1, cfg.distill_steps // 10), cfg.distill_steps)
        loss = _next_token_step(model, opt, _pad(rows[start: start + batch], tok.pad_token_id), lr)
        progress.update(task_id, advance=1, info=f"{len(rows)} kept, loss {loss:.3f}")
    model.eval()
    return {"kept": round(len(rows) / len(tasks), 4), "last_loss": round(loss, 4)}


def rl(model: Qwen2ForCausalLM, tok: Any, cfg: BuildConfig, progress: Progress) -> list[float]:
    """GRPO-style RL: G samples per prompt, group-normalized advantages, policy gradient on the replies."""
    rng = random.Random(cfg.seed + 4)
    train = W.load_split("train")
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.rl_lr, betas=(0.9, 0.99), weight_decay=0.0)
    task_id = progress.add_task("RL for A", total=cfg.rl_steps, info="")
    mean_rewards: list[float] = []
    for step in range(cfg.rl_steps):
        tasks = rng.sample(train, cfg.rl_prompts)
        prompts = [render_prompt(tok, t) for t in tasks for _ in range(cfg.rl_group)]
        gen_cfg = GenerationConfig(max_new_tokens=cfg.max_new_tokens, batch_size=len(prompts), do_sample=True,
                                   temperature=cfg.rl_temperature, seed=cfg.seed * 100_003 + step)
        hinted = round(cfg.rl_group * cfg.hint_share * max(0.0, 1 - step / cfg.hint_steps)) if cfg.hint_steps else 0
        replies = _rollouts(model, tok, prompts, [i % cfg.rl_group < hinted for i in range(len(prompts))],
                            gen_cfg, cfg.dialect)
        rewards = torch.tensor([reward(t, text, cfg) for t, (text, _) in zip(
            (t for t in tasks for _ in range(cfg.rl_group)), replies)]).view(cfg.rl_prompts, cfg.rl_group)
        adv = ((rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-4)).flatten()
        mean_rewards.append(rewards.mean().item())
        live = [i for i in range(len(replies)) if adv[i] != 0]
        if live:
            rows = []
            for i in live:
                prompt_ids = tok(prompts[i], add_special_tokens=False)["input_ids"]
                rows.append((prompt_ids + replies[i][1], [False] * len(prompt_ids) + [True] * len(replies[i][1])))
            ids, attn, mask = _pad(rows, tok.pad_token_id)
            for group in opt.param_groups:
                group["lr"] = cfg.rl_lr * min(1.0, (step + 1) / 10)
            model.train()
            logp = _token_logprobs(model, ids, attn) * mask[:, 1:]
            # Sum over each reply's tokens, one constant normalizer (Dr. GRPO): no length bias.
            loss = -(adv[live] * logp.sum(1)).sum() / (len(replies) * cfg.max_new_tokens)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            model.eval()
        recent = mean_rewards[-10:]
        progress.update(task_id, advance=1, info=f"reward {sum(recent) / len(recent):.2f}")
    return mean_rewards


def _rollouts(model: Qwen2ForCausalLM, tok: Any, prompts: list[str], hinted: list[bool], gen_cfg: GenerationConfig,
              dialect: str) -> list[tuple[str, list[int]]]:
    """(reply text, reply token ids) per prompt, sampled from ``model``. A hinted rollout is sampled after the
    dialect's opening, and when opening + sample parses as calls it becomes those calls in the dialect's format
    (plus eos if the sample ended): the behaviour policy proposes the format, the reward judges the call."""
    d = get_dialect(dialect)
    outs = generate(model, tok, [p + d.logprob_text if h else p for p, h in zip(prompts, hinted)], gen_cfg)
    replies = []
    for out, h in zip(outs, hinted):
        if not h:
            replies.append((out.text, out.token_ids))
            continue
        parsed = d.parse(d.logprob_text + out.text)
        text = d.format_calls(parsed.calls) if parsed.calls and not parsed.errors else d.logprob_text + out.text
        ids = tok(text, add_special_tokens=False)["input_ids"]
        replies.append((text, ids + [tok.eos_token_id] * (out.finish_reason == "eos")))
    return replies


def evaluate(model: Qwen2ForCausalLM, tok: Any, tasks: list[Task], cfg: BuildConfig) -> dict[str, float]:
    """Greedy replies scored strictly; the share of tasks passing each check."""
    gen_cfg = GenerationConfig(max_new_tokens=cfg.max_new_tokens, batch_size=cfg.eval_batch)
    outs = generate(model, tok, [render_prompt(tok, t) for t in tasks], gen_cfg)
    scores = [score(t, o.text, dialect=cfg.dialect) for t, o in zip(tasks, outs)]
    return {k: round(sum(getattr(s, k) for s in scores) / len(scores), 4)
            for k in ("correct", "lenient", "format_ok", "name_ok")}


def build_pair(out_dir: str | Path, seed: int = 0, cfg: BuildConfig | None = None,
               reuse_base: bool = False, base_dir: str | Path | None = None) -> dict[str, Any]:
    """Build tokenizer, B and A into ``out_dir`` (a/, b/, tokenizer/, card.json); returns the card.

    ``reuse_base`` keeps the B and tokenizer already in ``out_dir`` (built with the same seed and
    config) and redoes only RL and the card; the card then carries over their stage times. RL starts
    from the stored fp16 B either way, so the result is the same as a full build. ``base_dir`` takes
    B and the tokenizer from another pair's folder instead (a second-dialect A on the shipped B): ``out_dir``
    then gets a/, tokenizer/ (with ``cfg.dialect``'s template) and a card whose ``"base"`` names that folder."""

    cfg = cfg or BuildConfig(seed=seed)
    cfg.seed = seed
    hf_logging.disable_progress_bar()  # our own progress bars say more
    out, t0 = Path(out_dir), time.time()
    source = Path(base_dir) if base_dir is not None else out
    stage_s: dict[str, float] = {}
    base: str | None = None
    warm_start: dict[str, float | None] | None = None
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("{task.fields[info]}")]
    with Progress(*columns, console=console) as progress:
        if reuse_base or base_dir is not None:
            previous = read_card(source)
            if previous["seed"] != seed:
                raise ValueError(f"{source}/card.json: seed {previous['seed']}, expected {seed} to reuse its B")
            stage_s = {k: previous["stage_seconds"][k] for k in ("tokenizer", "pretrain")}
            t0 -= sum(stage_s.values())
            base = previous.get("base") if base_dir is None else os.path.relpath(source.resolve(), out.resolve())
            origin = Path(os.path.normpath(out / base)) if base else source  # holds the pretrained B (and its A)
            model = Qwen2ForCausalLM.from_pretrained(origin / cfg.rl_start, dtype=torch.float32).eval()
            tok = AutoTokenizer.from_pretrained(part_dir(source, "tokenizer"))
            if base_dir is not None:
                base_tok, base_dialect = tok, previous.get("config", {}).get("dialect", "hermes")
                tok = AutoTokenizer.from_pretrained(part_dir(source, "tokenizer"))
                for part in ("a", "tokenizer"):
                    shutil.rmtree(out / part, ignore_errors=True)
                tok.chat_template = CHAT_TEMPLATES[cfg.dialect]
                tok.save_pretrained(out / "tokenizer")
                if cfg.distill_tasks:
                    warm_start = distill(model, base_tok, tok, cfg, base_dialect, progress)
                    stage_s["warm_start"] = time.time() - t0 - sum(stage_s.values())
        else:
            tok = train_tokenizer(tokenizer_corpus(cfg), cfg.vocab_size)
            stage_s["tokenizer"] = time.time() - t0
            model = new_model(cfg, len(tok))
            pretrain(model, tok, cfg, progress)
            stage_s["pretrain"] = time.time() - t0 - sum(stage_s.values())
            for part in ("a", "b", "tokenizer"):  # replace only what a build writes, never the whole folder
                shutil.rmtree(out / part, ignore_errors=True)
            _save(model, out / "b")
            tok.save_pretrained(out / "tokenizer")
        rl(model, tok, cfg, progress)
        stage_s["rl"] = time.time() - t0 - sum(stage_s.values())
        _save(model, out / "a")
        # Measure what ships: reload the saved half-precision weights.
        model_a, model_b = (Qwen2ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
                            for path in (out / "a", part_dir(source, "b")))
        tok = AutoTokenizer.from_pretrained(out / "tokenizer")
        evals = {}
        for name, m in (("a", model_a), ("b", model_b)):
            evals[name] = {split: evaluate(m, tok, W.load_split(split)[: cfg.eval_limit or None], cfg)
                           for split in ("test", "dev")}
            console.print(f"{name.upper()}: {evals[name]}")
        stage_s["eval"] = time.time() - t0 - sum(stage_s.values())
    card = {
        "params": sum(p.numel() for p in model_a.parameters()),
        "layers": cfg.layers, "d_model": cfg.hidden, "vocab": len(tok), "dtype": "float16",
        "seed": seed, "build_seconds": round(time.time() - t0, 1),
        "stage_seconds": {k: round(v, 1) for k, v in stage_s.items()},
        "torch_threads": torch.get_num_threads(),
        "a": evals["a"], "b": evals["b"], "config": asdict(cfg),
    }
    if base:
        card["base"] = base
    if warm_start:
        card["warm_start"] = warm_start
    (out / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    return read_card(out)


def _save(model: Qwen2ForCausalLM, path: Path) -> None:
    """Half-precision safetensors + config.json (keeps the shipped pair small)."""
    model.to(torch.float16).save_pretrained(path)
    model.to(torch.float32)
