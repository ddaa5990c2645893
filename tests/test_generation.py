"""Generation engine: batch invariance, stopping, hooks, seeded sampling (tiny real Qwen2 models)."""

import random

import numpy as np
import pytest
import torch
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from dfc_ray.generation import (
    GenerationConfig,
    HookContext,
    add_at_last_prompt_token,
    decoder_layers,
    eos_token_ids,
    generate,
    residual_hooks,
)

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"]
TOOL_TAGS = ["<tool_call>", "</tool_call>"]
WORDS = [f"w{i}" for i in range(10, 50)]  # two digits each: no word is a substring of another
D_MODEL, N_LAYERS = 64, 4


@pytest.fixture(scope="module")
def tokenizer():
    vocab = {t: i for i, t in enumerate(SPECIAL + TOOL_TAGS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([AddedToken(t, special=True) for t in SPECIAL])
    tok.add_tokens([AddedToken(t, special=False) for t in TOOL_TAGS])  # as in Qwen2.5: kept when decoding
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token="<unk>"
    )


def tiny_qwen(vocab_size: int, seed: int = 0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    cfg = Qwen2Config(
        hidden_size=D_MODEL,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=vocab_size,
        initializer_range=0.2,  # sharper logits than the default 0.02: fewer near-ties in argmax
        tie_word_embeddings=False,
    )
    return Qwen2ForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_qwen(len(tokenizer))


@pytest.fixture(scope="module")
def prompts():
    rng = random.Random(0)
    return [" ".join(rng.choice(WORDS) for _ in range(n)) for n in (3, 70, 1, 25, 9, 40)]


def ids(outs):
    return [o.token_ids for o in outs]


def one_at_a_time(model, tokenizer, prompts, cfg, hooks=None):
    return [generate(model, tokenizer, [p], cfg, hooks)[0] for p in prompts]


def test_batched_equals_one_at_a_time_with_rows_finishing_at_different_steps(model, tokenizer, prompts):
    free = generate(model, tokenizer, prompts, GenerationConfig(max_new_tokens=12, stop_strings=()))
    # A stop word from the replies, chosen so that rows finish at different steps: finished rows
    # are dropped from the batch and its KV cache while the others go on.
    vocab = tokenizer.get_vocab()

    def finish_steps(word):
        return {o.token_ids.index(vocab[word]) + 1 if vocab[word] in o.token_ids else len(o.token_ids) for o in free}

    word = next((w for w in WORDS if len(finish_steps(w)) >= 3), None)
    assert word is not None, "no stop word makes rows finish at three different steps"
    cfg = GenerationConfig(max_new_tokens=12, batch_size=4, stop_strings=(word,))
    single = one_at_a_time(model, tokenizer, prompts, cfg)
    assert len({len(o.token_ids) for o in single}) >= 3
    batched = generate(model, tokenizer, prompts, cfg)
    assert ids(batched) == ids(single)
    assert [o.finish_reason for o in batched] == [o.finish_reason for o in single]
    assert [o.text for o in batched] == [o.text for o in single]
    assert [o.prompt_tokens for o in batched] == [len(p.split()) for p in prompts]
    assert "stop" in {o.finish_reason for o in batched}


def test_matches_hf_generate_for_one_prompt(model, tokenizer, prompts):
    enc = tokenizer(prompts[3], add_special_tokens=False, return_tensors="pt")
    ref = model.generate(
        **enc, do_sample=False, max_new_tokens=10, eos_token_id=sorted(eos_token_ids(tokenizer)),
        pad_token_id=tokenizer.pad_token_id,
    )[0, enc["input_ids"].shape[1] :].tolist()
    out = generate(model, tokenizer, [prompts[3]], GenerationConfig(max_new_tokens=10, stop_strings=()))[0]
    assert out.token_ids == ref


def successor_model(tokenizer, successor: dict[str, str]) -> Qwen2ForCausalLM:
    """A real Qwen2 whose greedy next token is successor[current token] (default: w10).

    Attention and MLP outputs are zeroed, so the final residual is the current token's one-hot
    embedding and lm_head maps it to its successor.
    """
    m = tiny_qwen(len(tokenizer))
    vocab = tokenizer.get_vocab()
    with torch.no_grad():
        m.model.embed_tokens.weight.copy_(torch.eye(len(vocab), D_MODEL))
        for layer in m.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        m.lm_head.weight.zero_()
        for token, t in vocab.items():
            m.lm_head.weight[vocab[successor.get(token, "w10")], t] = 1.0
    return m


def test_stops_per_row_at_eos_stop_string_or_length(tokenizer):
    chain = {"w11": "w12", "w12": "<tool_call>", "<tool_call>": "w13", "w13": "</tool_call>",
             "</tool_call>": "w14", "w15": "w16", "w16": "<|im_end|>", "w17": "<|endoftext|>",
             "w18": "w19", "w19": "w18"}
    m = successor_model(tokenizer, chain)
    prompts = ["w20 w20 w20 w11", "w15", "w20 w17", "w20 w20 w20 w20 w20 w18"]
    vocab = tokenizer.get_vocab()
    for decode in ("eager", "static"):
        steps = []
        hooks = {0: lambda h, ctx: steps.append((ctx.step, ctx.rows.tolist()))}
        outs = generate(m, tokenizer, prompts, GenerationConfig(max_new_tokens=6, decode=decode), hooks)
        assert [o.finish_reason for o in outs] == ["stop", "eos", "eos", "length"]
        assert [o.text for o in outs] == ["w12 <tool_call> w13 </tool_call>", "w16", "", "w19 w18 w19 w18 w19 w18"]
        assert outs[1].token_ids == [vocab["w16"], vocab["<|im_end|>"]]
        assert outs[2].token_ids == [vocab["<|endoftext|>"]]
        assert len(outs[0].token_ids) == 4 and len(outs[3].token_ids) == 6
        # Finished rows leave the batch (eager: at once; static on CPU: once COMPACT_AT of its rows or fewer are
        # left, here each time); the batch ends when the last row is done (6 tokens: 5 decode calls).
        # Rows are sorted longest first: 3 (w18 row), 0 (w11), 2 (w17), 1 (w15).
        assert steps == [(0, [3, 0, 2, 1]), (1, [3, 0, 1]), (2, [3, 0]), (3, [3, 0]), (4, [3]), (5, [3])], decode
    # A multi-token stop string, and the text cut right after it.
    outs = generate(m, tokenizer, prompts[3:], GenerationConfig(max_new_tokens=6, stop_strings=("w18 w19",)))
    assert (outs[0].text, outs[0].finish_reason) == ("w19 w18 w19", "stop")


def test_hook_context_shapes_steps_and_last_prompt_token_under_left_padding(model, tokenizer, prompts):
    calls = []

    def record(h, ctx):
        calls.append((h.shape, ctx.step, ctx.is_prefill, ctx.real_mask.clone(), ctx.last_prompt_index,
                      ctx.rows.tolist()))

    cfg = GenerationConfig(max_new_tokens=3, batch_size=4, stop_strings=())
    prompts = prompts + [prompts[1], prompts[1]]  # duplicates: still one row each under hooks
    outs = generate(model, tokenizer, prompts, cfg, hooks={2: record})
    prefills = [c for c in calls if c[2]]
    assert len(prefills) == 2  # 8 prompts in batches of 4
    assert sorted(r for c in prefills for r in c[5]) == list(range(len(prompts)))
    for shape, step, _, real, last, rows in prefills:
        n, width = real.shape
        assert step == 0 and tuple(shape) == (n, width, D_MODEL) == (len(rows), width, D_MODEL)
        assert real.sum(1).tolist() == [outs[r].prompt_tokens for r in rows]
        assert width == max(outs[r].prompt_tokens for r in rows)
        assert real[:, -1].all() and last.tolist() == [width - 1] * n  # left padding: last column
        lengths = real.sum(1)
        assert all(real[i, : width - lengths[i]].sum() == 0 for i in range(n))  # pads on the left only
    decodes = [c for c in calls if not c[2]]
    assert [c[1] for c in decodes] == [1, 2, 1, 2]
    for shape, _, _, real, last, rows in decodes:
        assert tuple(shape) == (len(rows), 1, D_MODEL) and real.all() and last is None


def test_for_forward_context_handles_right_padding():
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    ctx = HookContext.for_forward(mask)
    assert ctx.last_prompt_index.tolist() == [2, 4, 4] and ctx.rows.tolist() == [0, 1, 2]


def test_hooks_handle_blocks_returning_a_tuple():
    """transformers 4.x decoder blocks return (hidden, ...); the hook replaces only hidden."""

    class TupleBlock(torch.nn.Module):
        def forward(self, x):
            return x * 2, "extra"

    class Stack(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([TupleBlock(), TupleBlock()])

        def forward(self, x):
            outs = []
            for layer in self.layers:
                x, extra = layer(x)
                outs.append(extra)
            return x, outs

    stack, x = Stack(), torch.ones(2, 3, 4)
    with residual_hooks(stack, {0: lambda h, ctx: h + 1}, HookContext.for_forward(torch.ones(2, 3))):
        y, extras = stack(x)
    assert torch.equal(y, torch.full((2, 3, 4), 6.0)) and extras == ["extra", "extra"]
    assert torch.equal(stack(x)[0], torch.full((2, 3, 4), 4.0))  # removed on exit


def test_identity_hook_is_bit_identical(model, tokenizer, prompts):
    cfg = GenerationConfig(max_new_tokens=8, batch_size=4, stop_strings=())
    clean = generate(model, tokenizer, prompts, cfg)
    hooks = {0: lambda h, ctx: h, 3: lambda h, ctx: None}
    assert ids(generate(model, tokenizer, prompts, cfg, hooks)) == ids(clean)
    enc = tokenizer(prompts[:3], add_special_tokens=False, padding=True, return_tensors="pt")
    with torch.inference_mode():
        ref = model(**enc).logits
        with residual_hooks(model, {1: lambda h, ctx: h.clone()}, HookContext.for_forward(enc["attention_mask"])):
            hooked = model(**enc).logits
    assert torch.equal(ref, hooked)


def test_vector_at_last_prompt_token_changes_only_what_it_should(model, tokenizer, prompts):
    layer, delta = 1, 5.0 * torch.randn(D_MODEL, generator=torch.Generator().manual_seed(1))
    enc = tokenizer(prompts[:4], add_special_tokens=False, padding=True, padding_side="left", return_tensors="pt")
    with torch.inference_mode():
        clean = model(**enc, output_hidden_states=True).hidden_states
        with residual_hooks(model, {layer: add_at_last_prompt_token(delta)},
                            HookContext.for_forward(enc["attention_mask"])):
            steered = model(**enc, output_hidden_states=True).hidden_states
    for i in range(layer + 1):  # embeddings and blocks before the hook: untouched
        assert torch.equal(clean[i], steered[i])
    diff = steered[layer + 1] - clean[layer + 1]
    assert torch.allclose(diff[:, -1], delta.expand(4, -1), atol=1e-5)
    assert torch.equal(diff[:, :-1], torch.zeros_like(diff[:, :-1]))
    for i in range(layer + 2, N_LAYERS + 1):  # later blocks: causal, so only the last column moves
        assert torch.equal(steered[i][:, :-1], clean[i][:, :-1])
        assert not torch.allclose(steered[i][:, -1], clean[i][:, -1])
    # In generate: steering is batch-invariant and changes replies.
    cfg = GenerationConfig(max_new_tokens=8, batch_size=6, stop_strings=())
    hooks = {layer: add_at_last_prompt_token(delta)}
    steered_out = generate(model, tokenizer, prompts, cfg, hooks)
    assert ids(steered_out) == ids(one_at_a_time(model, tokenizer, prompts, cfg, hooks))
    assert ids(steered_out) != ids(generate(model, tokenizer, prompts, cfg))


def test_hooks_removed_after_exception_and_bad_hooks_rejected(model, tokenizer, prompts):
    layers = decoder_layers(model)
    assert len(layers) == N_LAYERS
    before = [dict(layer._forward_hooks) for layer in layers]  # transformers may keep its own capture hooks

    def boom(h, ctx):
        if ctx.step == 2:
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        generate(model, tokenizer, prompts, GenerationConfig(max_new_tokens=5, stop_strings=()), {2: boom, 0: lambda h,
                                                                                                  c: None})
    with pytest.raises(ValueError, match="layer 4 out of range"):
        generate(model, tokenizer, prompts, GenerationConfig(max_new_tokens=2), {0: lambda h, c: None, 4: lambda h,
                                                                                 c: None})
    with pytest.raises(ValueError, match="returned shape"):
        generate(model, tokenizer, prompts, GenerationConfig(max_new_tokens=2), {1: lambda h, c: h[:, :1]})
    assert [dict(layer._forward_hooks) for layer in layers] == before
    assert not model.training


def test_sampling_is_seeded_and_batch_invariant(model, tokenizer, prompts):
    cfg = GenerationConfig(max_new_tokens=10, batch_size=4, do_sample=True, temperature=1.5, top_k=20, seed=3,
                           stop_strings=())
    first = generate(model, tokenizer, prompts, cfg)
    assert ids(generate(model, tokenizer, prompts, cfg)) == ids(first)
    assert ids(generate(model, tokenizer, prompts, GenerationConfig(**{**vars(cfg), "batch_size": 1}))) == ids(first)
    assert ids(generate(model, tokenizer, prompts, GenerationConfig(**{**vars(cfg), "seed": 4}))) != ids(first)
    greedy = generate(model, tokenizer, prompts, GenerationConfig(max_new_tokens=10, stop_strings=()))
    assert ids(first) != ids(greedy)
    # Copies of one prompt (a group of RL rollouts, sharing one prefill) get different samples,
    # the same as when each copy is generated alone at its index.
    group = [prompts[3]] * 4 + [prompts[0]] * 3
    batched = generate(model, tokenizer, group, cfg)
    assert len({tuple(o.token_ids) for o in batched[:4]}) > 1
    assert ids(batched) == ids(generate(model, tokenizer, group, GenerationConfig(**{**vars(cfg), "batch_size": 1})))


@pytest.mark.parametrize(
    "field, value", [("max_new_tokens", 0), ("batch_size", 0), ("temperature", 0.0), ("top_k", 0), ("stop_strings",
                                                                                                    ("",))]
)
def test_bad_config_rejected(field, value):
    with pytest.raises(ValueError, match=f"GenerationConfig.{field}="):
        GenerationConfig(**{field: value})


def test_bad_prompts_rejected(model, tokenizer):
    with pytest.raises(ValueError, match="prompts is a str"):
        generate(model, tokenizer, "w10 w11")
    with pytest.raises(ValueError, match=r"prompts\[1\] is empty"):
        generate(model, tokenizer, ["w10", ""])


# ---------------------------------------------------------------- static decoding (the CUDA-graph formulation, on CPU)


def static(cfg: GenerationConfig) -> GenerationConfig:
    return GenerationConfig(**{**vars(cfg), "decode": "static"})


def replies(outs):
    return [(o.token_ids, o.finish_reason, o.text, o.prompt_tokens) for o in outs]


def test_static_decoding_gives_the_eager_replies_with_every_kind_of_hook(model, tokenizer, prompts):
    """The static step (preallocated KV, the written columns attended under a mask, finished rows leaving the
    batch in groups on CPU) gives the eager loop's token ids, reasons and texts in fp32, with the judges' hooks:
    a vector at the last prompt token, at generated positions and at all positions, a recording hook."""
    from dfc_ray.interventions import add_hook

    free = generate(model, tokenizer, prompts, GenerationConfig(max_new_tokens=12, stop_strings=()))
    vocab = tokenizer.get_vocab()
    word = next(w for w in WORDS if sum(vocab[w] in o.token_ids[1:-1] for o in free) >= 2)  # rows stop mid-batch
    cfg = GenerationConfig(max_new_tokens=12, batch_size=4, stop_strings=(word,), decode="eager")
    delta = 4.0 * torch.randn(D_MODEL, generator=torch.Generator().manual_seed(2))
    seen, reasons = [], set()
    for hooks in (None, {1: add_at_last_prompt_token(delta)}, {2: add_hook(0.3 * delta, "generated")},
                  {0: add_hook(0.2 * delta, "all"), 3: lambda h, ctx: seen.append(ctx.is_prefill)}):
        eager = generate(model, tokenizer, prompts, cfg, hooks)
        assert replies(generate(model, tokenizer, prompts, static(cfg), hooks)) == replies(eager)
        reasons |= {o.finish_reason for o in eager}
    assert reasons >= {"stop", "length"}
    assert seen.count(False) > 0 and seen.count(True) == 2 * 2  # both loops: 2 batches prefilled, decode steps seen


@pytest.mark.parametrize("mode", ["last_prompt_token", "prompt"])
def test_static_decoding_gives_the_eager_replies_with_splices(model, tokenizer, prompts, mode):
    """A pair edit spliced at the last prompt token (on the target's prefix cache) or at every prompt token,
    the other model's activations read first, as the evaluator does: static replies = eager replies."""
    from dfc_ray.generation import PrefixCache
    from dfc_ray.interventions import generate_edited

    other = tiny_qwen(len(tokenizer), seed=1)
    prompts = [p for p in prompts if len(p.split()) >= 2]

    def edit(x):  # (k, 2, d): the target (A) sees the mean of both models' residuals
        return 0.5 * (x[:, 0] + x[:, 1])

    cfg = GenerationConfig(max_new_tokens=8, batch_size=3, stop_strings=(), decode="eager")
    cache = PrefixCache(model)
    eager = generate_edited(model, other, tokenizer, prompts, cfg, 1, edit, "a", mode, prefix_cache=cache)
    spliced = generate_edited(model, other, tokenizer, prompts, static(cfg), 1, edit, "a", mode, prefix_cache=cache)
    assert replies(spliced) == replies(eager) != replies(generate(model, tokenizer, prompts, cfg))
    assert cache.hits == (2 if mode == "last_prompt_token" else 0)


def test_static_decoding_re_uses_its_step_for_new_vectors_and_stops_like_eager(tokenizer):
    """Successive calls with different vectors at generated positions re-use one step (the vector is copied
    into it) and still match eager; eos, a stop string completed by an added token and length as in eager."""
    from dfc_ray.generation import _step_cache
    from dfc_ray.interventions import add_hook

    chain = {"w11": "w12", "w12": "<tool_call>", "<tool_call>": "w13", "w13": "</tool_call>",
             "</tool_call>": "w14", "w15": "w16", "w16": "<|im_end|>", "w17": "<|endoftext|>",
             "w18": "w19", "w19": "w18", "w30": "w35", "w31": "w36"}
    m = successor_model(tokenizer, chain)
    prompts = ["w20 w20 w20 w11", "w15", "w20 w17", "w20 w20 w20 w20 w20 w18"]
    cfg = GenerationConfig(max_new_tokens=6, decode="static")
    outs = generate(m, tokenizer, prompts, cfg)
    assert [o.finish_reason for o in outs] == ["stop", "eos", "eos", "length"]
    assert [o.text for o in outs] == ["w12 <tool_call> w13 </tool_call>", "w16", "", "w19 w18 w19 w18 w19 w18"]
    outs = generate(m, tokenizer, prompts[3:], GenerationConfig(**{**vars(cfg), "stop_strings": ("w18 w19",)}))
    assert (outs[0].text, outs[0].finish_reason) == ("w19 w18 w19", "stop")
    vocab = tokenizer.get_vocab()
    steps = _step_cache(m).steps
    for i, word in enumerate(("w30", "w31", "w30")):  # a vector that makes every next token `word`'s successor
        delta = torch.zeros(D_MODEL)
        delta[vocab[word]] = 50.0
        hooks = {N_LAYERS - 1: add_hook(delta, "generated")}
        got = generate(m, tokenizer, prompts, cfg, hooks)
        assert replies(got) == replies(generate(m, tokenizer, prompts, GenerationConfig(max_new_tokens=6,
                                                                                         decode="eager"), hooks))
        assert got[3].token_ids[1] == vocab[chain[word]]
        if i == 0:
            before = dict(steps)
    assert dict(steps) == before  # the later vectors replayed the first one's step


def test_static_decoding_on_a_prefix_cache_and_its_refusals(model, tokenizer, prompts):
    from dfc_ray.generation import PrefixCache, _cache_tensors, decode_mode
    from dfc_ray.interventions import Lockstep

    cfg = GenerationConfig(max_new_tokens=10, batch_size=3, stop_strings=(), decode="eager")
    delta = 4.0 * torch.randn(D_MODEL, generator=torch.Generator().manual_seed(3))
    prompts = [p for p in prompts if len(p.split()) >= 2]  # a prefix to cache in every batch
    cache = PrefixCache(model)
    eager = generate(model, tokenizer, prompts, cfg, {1: add_at_last_prompt_token(delta)}, prefix_cache=cache)
    steered = generate(model, tokenizer, prompts, static(cfg), {1: add_at_last_prompt_token(delta)}, prefix_cache=cache)
    assert replies(steered) == replies(eager) and cache.hits == 2
    # the copies a generation decodes on share the stored tensors (appends_by_copy): none of them is written
    stored = [[t.clone() for pair in _cache_tensors(entry) for t in pair] for entry in cache._entries.values()]
    for loop in (cfg, static(cfg)):
        generate(model, tokenizer, prompts, loop, {1: add_at_last_prompt_token(-delta)}, prefix_cache=cache)
    assert all(torch.equal(a, b) for entry, before in zip(cache._entries.values(), stored)
               for a, b in zip((t for pair in _cache_tensors(entry) for t in pair), before))
    assert decode_mode(model, cfg) == "eager"
    # auto: static (uncaptured) on CPU too, for greedy decoding of a supported model (docs/generation.md says why)
    auto = GenerationConfig(**{**vars(cfg), "decode": "auto"})
    assert decode_mode(model, auto) == decode_mode(model, static(cfg)) == "static"
    assert decode_mode(model, GenerationConfig(**{**vars(auto), "do_sample": True})) == "eager"
    with pytest.raises(ValueError, match="decode='static': Lockstep is not a transformers causal LM"):
        generate(Lockstep(model, model, 1, lambda x: x[:, 0], "a"), tokenizer, prompts[:1], static(cfg))
    with pytest.raises(ValueError, match="GenerationConfig.decode='static': expected 'eager' or 'auto' when do_sample"):
        GenerationConfig(do_sample=True, decode="static")


@pytest.mark.parametrize("stops", [("w18 w19", "</tool_call>", "w2"), ("w19 ",)], ids=["ascii-ends", "space-end"])
def test_stop_checks_on_candidate_tokens_only_equal_checking_every_token(model, tokenizer, stops):
    """Static decoding checks the stop rule only at tokens that can complete a stop string (their own text
    holds its last character) and reads tokens back in blocks: same stopping point and reason as the eager
    loop's check after every token, on random replies (eos among them)."""
    from dfc_ray.generation import _Decoder, _StopScan

    decoder = _Decoder(model, tokenizer, GenerationConfig(stop_strings=stops), None)
    replies_ = np.random.default_rng(0).integers(0, len(tokenizer), (200, 30))
    scan = _StopScan(decoder, len(replies_))
    for block in np.split(replies_, [1, 8, 9, 20], axis=1):
        scan.update(block)
    completions, reasons = [[] for _ in replies_], [None] * len(replies_)
    for r, reply in enumerate(replies_.tolist()):
        any(decoder._finish(completions, reasons, r, token) for token in reply)
    assert scan.completions == completions and scan.reasons == reasons
    assert {"stop", "eos"} <= set(reasons)


def test_judge_batches_come_from_free_memory_on_a_gpu_and_stay_fixed_on_cpu():
    """A 3B pair on an H200 decodes 128–256 prompts at once (the issue's target), a small GPU fewer; on CPU a
    replica keeps the spec's batch (tests/test_generation.py's CPU timings gain nothing from larger ones)."""
    from transformers import Qwen2Config

    from actors.replica import PairReplica
    from dfc_ray.generation import batch_for_memory, decode_bytes_per_row
    from dfc_ray.pair import PairSpec

    qwen3b = Qwen2Config(hidden_size=2048, num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2,
                         intermediate_size=11008, vocab_size=151936)
    per_row = decode_bytes_per_row(qwen3b, 2, 370, 128)
    assert 40e6 < per_row < 150e6  # ~36 KB of KV per token and position, three copies, plus the prefill's MLP
    h200_free = 139 * 2**30 - 2 * 6.2e9 - 15e9  # both models' bf16 weights and the judges' prefix caches
    assert 128 <= batch_for_memory(per_row, h200_free) <= 256
    assert 1 < batch_for_memory(per_row, 4e9) < 32 and batch_for_memory(per_row, 0) == 1
    replica = PairReplica(PairSpec())
    cfg = GenerationConfig(batch_size=7)
    assert replica.generation(cfg, ["a prompt", "another"]) == cfg and replica.stats()["generation_batches"] == [7]


def test_drafts_change_no_reply_and_skip_the_decode_steps_they_verify(model, tokenizer, prompts, monkeypatch):
    """`generate(..., drafts=)`: whatever the drafts (the replies themselves, replies of another intervention,
    a reply cut, changed or run on, noise, nothing), the replies, reasons and texts are those decoded without
    drafts; drafts that are the replies finish every row in one teacher-forced forward (no decode step), and
    hooks that act after the prefill, the eager loop and sampling leave the drafts unused."""
    from dfc_ray import generation
    from dfc_ray.generation import _StaticStep
    from dfc_ray.interventions import add_hook

    steps = []
    plain_call = _StaticStep.__call__
    monkeypatch.setattr(_StaticStep, "__call__", lambda self, s: (steps.append(s), plain_call(self, s))[1])
    free = generate(model, tokenizer, prompts, GenerationConfig(max_new_tokens=12, stop_strings=()))
    vocab = tokenizer.get_vocab()
    word = next(w for w in WORDS if sum(vocab[w] in o.token_ids[1:-1] for o in free) >= 2)  # rows stop mid-batch
    cfg = GenerationConfig(max_new_tokens=12, batch_size=4, stop_strings=(word,), decode="static")
    delta = 4.0 * torch.randn(D_MODEL, generator=torch.Generator().manual_seed(2))
    hooks = {1: add_at_last_prompt_token(delta)}
    plain = generate(model, tokenizer, prompts, cfg, hooks)
    assert {o.finish_reason for o in plain} >= {"stop", "length"}
    exact = ids(plain)
    rng = np.random.default_rng(0)
    noise = rng.integers(0, len(tokenizer), (len(prompts), 12)).tolist()
    for drafts in (exact, ids(generate(model, tokenizer, prompts, cfg)), [d[:len(d) // 2] for d in exact],
                   [d[:-2] + [(d[-2] + 1) % len(tokenizer)] + d[-1:] if len(d) > 2 else d for d in exact],
                   [d + rng.integers(0, len(tokenizer), 5).tolist() for d in exact], noise, [[] for _ in prompts]):
        steps.clear()
        assert replies(generate(model, tokenizer, prompts, cfg, hooks, drafts=drafts)) == replies(plain)
        assert not steps if drafts is exact else steps or drafts is not noise
    for other_cfg, other_hooks in ((cfg, {2: add_hook(0.3 * delta, "generated")}),
                                   (GenerationConfig(**{**vars(cfg), "decode": "eager"}), hooks)):
        without = generate(model, tokenizer, prompts, other_cfg, other_hooks)
        steps.clear()
        assert replies(generate(model, tokenizer, prompts, other_cfg, other_hooks, drafts=ids(without))) == \
            replies(without)
        assert steps or other_cfg.decode == "eager"
    with pytest.raises(ValueError, match="generate: 1 drafts for 6 prompts; expected one per prompt"):
        generate(model, tokenizer, prompts, cfg, drafts=[[1]])
    with pytest.raises(ValueError, match=rf"generate: drafts\[1\] holds token id {len(tokenizer)}; expected ids in"):
        generate(model, tokenizer, prompts, cfg, drafts=[[1], [2, len(tokenizer)]] + [[]] * 4)
    monkeypatch.setattr(generation, "DRAFT_CHUNK", 3)  # the teacher-forced pass in several forwards
    for drafts in (exact, noise):
        steps.clear()
        assert replies(generate(model, tokenizer, prompts, cfg, hooks, drafts=drafts)) == replies(plain)
        assert not steps if drafts is exact else steps
