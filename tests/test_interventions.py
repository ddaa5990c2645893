"""Interventions (splice, clamp, steering, lockstep), feature ranking and the evaluation statistics,
on a tiny random Qwen2 pair and a crosscoder trained on it for a few steps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dfc_ray.crosscoder import DedicatedFeatureCrosscoder, DFCConfig
from dfc_ray.evaluate import bootstrap_rate, paired_delta_pp
from dfc_ray.generation import GenerationConfig, HookContext, PrefixCache, generate, residual_hooks
from dfc_ray.harvest import Record, left_pad
from dfc_ray.interventions import (add_hook, clamp_edit, feature_direction, opening_logprobs, generate_edited,
                                   generate_spliced, generate_steered, last_prompt_residuals, prefill_edit_hook,
                                   prompt_activations, splice_edit, steering_vector)
from dfc_ray.pair import PairSpec, load_pair
from dfc_ray.ranking import auroc, cohens_d, has_signal, rank_features, separates

LAYER = 1


def make_checkpoint(pair: PairSpec, out: Path, a_exclusive: float = 0.25, steps: int = 150) -> Path:
    """A DFC trained for a few Adam steps on the pair's activations at every token of some texts."""
    from dfc_ray.organism import world
    from dfc_ray.tooluse import render_prompt

    model_a, model_b, tok = load_pair(pair)
    texts = world.plain_text(32, 5) + [render_prompt(tok, t) for t in world.load_split("dev")[:16]]
    acts = [torch.cat(prompt_activations(m, tok, texts, LAYER)) for m in (model_a, model_b)]
    x = torch.stack(acts, dim=1).float()
    fit_dfc(DFCConfig(d_model=32, dict_size=64, k=6, a_exclusive=a_exclusive,
                      b_exclusive=a_exclusive / 2 if a_exclusive else 0.0), x, steps).save(out)
    return out


def fit_dfc(cfg: DFCConfig, x: torch.Tensor, steps: int) -> DedicatedFeatureCrosscoder:
    """A DFC fitted to paired activations x (n, 2, d_model) by `steps` Adam steps on batches of 256."""
    cc = DedicatedFeatureCrosscoder(cfg)
    cc.fit_normalization(x)
    opt = torch.optim.Adam(cc.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        loss = cc.loss(x[torch.randint(len(x), (256,), generator=gen)])["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    return cc


@pytest.fixture(scope="module")
def loaded(tiny_pair):
    return load_pair(tiny_pair)


@pytest.fixture(scope="module")
def cc(tiny_pair, tmp_path_factory):
    path = make_checkpoint(tiny_pair, tmp_path_factory.mktemp("ckpt") / "dfc")
    return DedicatedFeatureCrosscoder.load(path).eval()


@pytest.fixture(scope="module")
def prompts(loaded):
    from dfc_ray.organism import world
    from dfc_ray.tooluse import render_prompt

    tok = loaded[2]
    tasks = world.load_split("test")[:5]
    # tool prompts of different lengths plus short plain texts: a batch with real left padding
    return [render_prompt(tok, t) for t in tasks] + ["The train to paris leaves at 7.", "Bob likes jazz music."]


CFG = GenerationConfig(max_new_tokens=8, batch_size=8, stop_strings=())


def ids(gens):
    return [g.token_ids for g in gens]


@pytest.mark.parametrize("mode", ["last_prompt_token", "prompt", "lockstep"])
def test_splice_with_error_added_back_is_the_identity(loaded, cc, prompts, mode):
    model_a, model_b, tok = loaded
    for target, model in (("a", model_a), ("b", model_b)):
        clean = generate(model, tok, prompts, CFG)
        same = generate_spliced(model_a, model_b, tok, prompts, CFG, cc, LAYER, target, mode, add_error=True)
        assert ids(same) == ids(clean)
    spliced = generate_spliced(model_a, model_b, tok, prompts, CFG, cc, LAYER, "a", mode)
    assert len(spliced) == len(prompts) and all(g.token_ids for g in spliced)


def _hidden_after(model, tok, texts, hook):
    """(residual after LAYER with the hook applied, attention mask) for a left-padded plain forward."""
    encoded = tok(texts, add_special_tokens=False)["input_ids"]
    input_ids, mask = left_pad([Record(e) for e in encoded], tok.pad_token_id)
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.inference_mode(), residual_hooks(model, {LAYER: hook} if hook else {}, HookContext.for_forward(mask)):
        out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, output_hidden_states=True)
    return out.hidden_states[LAYER + 1], mask


def test_last_token_splice_lands_on_the_last_prompt_token_under_left_padding(loaded, cc, prompts):
    model_a, model_b, tok = loaded
    other = prompt_activations(model_b, tok, prompts, LAYER)
    clean, mask = _hidden_after(model_a, tok, prompts, None)
    hooked, _ = _hidden_after(model_a, tok, prompts, prefill_edit_hook(splice_edit(cc, "a"), "a", other,
                                                                       "last_prompt_token"))
    assert mask[:, -1].all() and not mask[:, 0].all()  # left padded, every prompt ends at the last column
    x = torch.stack([clean[:, -1], torch.stack([o[-1] for o in other])], dim=1)
    torch.testing.assert_close(hooked[:, -1], cc(x)[:, 0], rtol=1e-5, atol=1e-5)
    assert torch.equal(hooked[:, :-1], clean[:, :-1])  # nothing else touched
    assert not torch.allclose(hooked[:, -1], clean[:, -1])
    # "prompt" mode: every real position replaced, pads left alone
    hooked, _ = _hidden_after(model_a, tok, prompts, prefill_edit_hook(splice_edit(cc, "a"), "a", other, "prompt"))
    real = mask.bool()
    x_all = torch.stack([clean[real], torch.cat(other)], dim=1)
    torch.testing.assert_close(hooked[real], cc(x_all)[:, 0], rtol=1e-5, atol=1e-5)
    assert torch.equal(hooked[~real], clean[~real])


def test_hooked_generation_is_batch_invariant(loaded, cc, prompts):
    model_a, model_b, tok = loaded
    one = GenerationConfig(max_new_tokens=8, batch_size=1, stop_strings=())
    for mode in ("last_prompt_token", "lockstep"):
        batched = generate_spliced(model_a, model_b, tok, prompts, CFG, cc, LAYER, "b", mode)
        alone = generate_spliced(model_a, model_b, tok, prompts, one, cc, LAYER, "b", mode)
        assert ids(batched) == ids(alone)
    delta = steering_vector(cc, [0], "a", 30.0)
    assert ids(generate_steered(model_a, tok, prompts, CFG, LAYER, delta, "all")) == \
        ids(generate_steered(model_a, tok, prompts, one, LAYER, delta, "all"))


def test_prefix_cache_and_cached_last_token_activations_give_the_same_replies(loaded, cc, prompts):
    """What the judge replicas do on every request: re-use the prompts' prefill and the other model's
    last-token residuals. Replies must be those of a full prefill, for splices and steering."""
    model_a, model_b, tok = loaded
    caches = {"a": PrefixCache(model_a), "b": PrefixCache(model_b)}
    other = {"a": last_prompt_residuals(model_b, tok, prompts, LAYER)[:, None],
             "b": last_prompt_residuals(model_a, tok, prompts, LAYER)[:, None]}
    for target in ("a", "b"):
        full = generate_spliced(model_a, model_b, tok, prompts, CFG, cc, LAYER, target)
        for _ in range(2):  # a miss that fills the cache, then a hit
            cached = generate_spliced(model_a, model_b, tok, prompts, CFG, cc, LAYER, target, other=other[target],
                                      prefix_cache=caches[target])
            assert ids(cached) == ids(full)
    assert (caches["a"].misses, caches["a"].hits) == (1, 1)
    delta = steering_vector(cc, [0], "a", 30.0)
    full = generate_steered(model_a, tok, prompts, CFG, LAYER, delta)
    assert ids(generate_steered(model_a, tok, prompts, CFG, LAYER, delta, prefix_cache=caches["a"])) == ids(full)
    assert ids(full) != ids(generate(model_a, tok, prompts, CFG, prefix_cache=caches["a"]))  # the vector mattered
    # a prompt-mode splice edits the prefix: the cache must not be used for it
    hits = caches["a"].hits
    generate_spliced(model_a, model_b, tok, prompts, CFG, cc, LAYER, "a", "prompt", prefix_cache=caches["a"])
    assert caches["a"].hits == hits
    with pytest.raises(ValueError, match="another model"):
        generate(model_a, tok, prompts, CFG, prefix_cache=caches["b"])
    with pytest.raises(ValueError, match="leaves_prefix_alone"):  # an all-positions hook would be half applied
        generate(model_a, tok, prompts, CFG, {LAYER: add_hook(delta, "all")}, prefix_cache=caches["a"])


@pytest.mark.parametrize("positions", ["last_prompt_token", "generated", "all"])
def test_alpha_zero_is_a_no_op_and_a_large_alpha_is_not(loaded, cc, prompts, positions):
    model_a, _, tok = loaded
    clean = generate(model_a, tok, prompts, CFG)
    zero = generate_steered(model_a, tok, prompts, CFG, LAYER, steering_vector(cc, [0, 1], "a", 0.0), positions)
    assert ids(zero) == ids(clean)
    big = steering_vector(cc, [0], "a", 200.0)
    assert ids(generate_steered(model_a, tok, prompts, CFG, LAYER, big, positions)) != ids(clean)


def test_add_hook_positions():
    delta = torch.arange(1.0, 33.0)
    hidden = torch.zeros(2, 4, 32)
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]], dtype=torch.bool)
    prefill = HookContext.for_forward(mask)
    out = add_hook(delta, "last_prompt_token")(hidden, prefill)
    assert torch.equal(out[:, 3], delta.expand(2, 32)) and not out[:, :3].any()
    out = add_hook(delta, "all")(hidden, prefill)
    assert torch.equal(out[mask], delta.expand(7, 32)) and not out[~mask].any()
    assert add_hook(delta, "generated")(hidden, prefill) is None
    step = HookContext(1, False, torch.ones(2, 1, dtype=torch.bool), None, torch.arange(2))
    assert torch.equal(add_hook(delta, "generated")(torch.zeros(2, 1, 32), step)[:, 0], delta.expand(2, 32))
    assert add_hook(delta, "last_prompt_token")(torch.zeros(2, 1, 32), step) is None


def test_opening_logprobs_match_a_full_forward_and_see_the_delta(loaded, cc, prompts):
    """The prefix-once path must equal a plain full forward of each prompt followed by the opening (zero
    delta, and a delta hooked at the last prompt token only), summed over the opening's teacher-forced tokens."""
    model_a, _, tok = loaded
    opening = [5, 7, 9]
    delta = steering_vector(cc, [0], "a", 30.0)
    got = opening_logprobs(model_a, tok, prompts, LAYER, [torch.zeros_like(delta), delta], opening, batch_size=3)
    first = opening_logprobs(model_a, tok, prompts, LAYER, [torch.zeros_like(delta), delta], opening[:1],
                             batch_size=3)  # one token: the static step's blocks after LAYER only
    for j, d in enumerate((None, delta)):
        for i, prompt in enumerate(prompts):
            prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
            ids_ = torch.tensor([prompt_ids + opening])
            hooks = {LAYER: add_hook(d)} if d is not None else None
            ctx = HookContext(0, True, torch.ones_like(ids_, dtype=torch.bool), torch.tensor([len(prompt_ids) - 1]),
                              torch.arange(1))
            with torch.inference_mode(), residual_hooks(model_a, hooks, ctx):
                logp = model_a(input_ids=ids_).logits[0].log_softmax(-1)
            want = sum(logp[len(prompt_ids) - 1 + k, t] for k, t in enumerate(opening))
            assert float(got[j, i]) == pytest.approx(float(want), abs=1e-4)
            assert float(first[j, i]) == pytest.approx(float(logp[len(prompt_ids) - 1, opening[0]]), abs=1e-4)
    assert not torch.allclose(got[0], got[1]) and not torch.allclose(first[0], first[1])


def test_one_token_opening_on_the_static_step_equals_the_per_delta_forward(loaded, cc, prompts, monkeypatch):
    """The steering ranking's path (a one-token opening, blocks after the layer once per delta, the prefix from
    the replica's cache) gives the per-delta full forward's log-probs (up to float rounding) and their order."""
    from dfc_ray import interventions
    from dfc_ray.generation import PrefixCache

    model_a, _, tok = loaded
    deltas = [torch.zeros(cc.cfg.d_model)] + [steering_vector(cc, [f], "a", 20.0) for f in range(4)]
    cache = PrefixCache(model_a)
    fast = [opening_logprobs(model_a, tok, prompts, LAYER, deltas, [5], batch_size=3, prefix_cache=cache)
            for _ in range(2)]
    batches = -(-len(prompts) // 3)
    assert (cache.misses, cache.hits) == (batches, batches)  # each batch's prefix computed once, then re-used
    monkeypatch.setattr(interventions, "steered_logprobs", lambda *args: None)
    slow = opening_logprobs(model_a, tok, prompts, LAYER, deltas, [5], batch_size=3)
    assert torch.equal(fast[0], fast[1])
    torch.testing.assert_close(fast[0], slow, rtol=0, atol=1e-5)  # bit for bit on the organism; here ~1e-6 apart
    assert fast[0].mean(1).argsort().tolist() == slow.mean(1).argsort().tolist()  # the ranking's order
    assert len(set(slow[:, 0].tolist())) == len(deltas)  # every delta moved the log-prob


def test_feature_directions_are_raw_space_and_b_uses_the_a_row_for_a_exclusive_features(cc):
    part = cc.partition
    zero = cc.decode(torch.zeros(1, cc.cfg.dict_size))
    for feature in (int(part.a_exclusive[0]), int(part.shared[0]), int(part.b_exclusive[0])):
        e = torch.zeros(1, cc.cfg.dict_size)
        e[0, feature] = 1.0
        written = (cc.decode(e) - zero)[0]  # decode is affine: this is what one unit writes
        for target, m in (("a", 0), ("b", 1)):
            if written[m].abs().max() > 0:
                torch.testing.assert_close(feature_direction(cc, feature, target), written[m], rtol=1e-4, atol=1e-6)
    a_only = int(part.a_exclusive[0])
    assert not cc.raw_decoder()[a_only, 1].any()  # B's row is masked: steering through it is a no-op
    torch.testing.assert_close(feature_direction(cc, a_only, "b"), feature_direction(cc, a_only, "a"))
    torch.testing.assert_close(steering_vector(cc, [a_only], "b", 3.0, [2.0]), 6.0 * feature_direction(cc, a_only, "a"))


def test_clamp_adds_exactly_the_clamped_features_write(loaded, cc, prompts):
    model_a, model_b, tok = loaded
    xa = torch.cat(prompt_activations(model_a, tok, prompts[:2], LAYER))
    xb = torch.cat(prompt_activations(model_b, tok, prompts[:2], LAYER))
    x = torch.stack([xa, xb], dim=1)
    feature = int(cc.partition.a_exclusive[0])
    inactive = cc.encode(x)[:, feature] == 0
    assert inactive.any()
    out = clamp_edit(cc, "a", [feature], 5.0)(x[inactive])
    expected = x[inactive, 0] + 5.0 * feature_direction(cc, feature, "a")
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    # clamping to the current value changes nothing; a clamp edit also drives generation
    assert torch.equal(clamp_edit(cc, "a", [feature], 0.0)(x[inactive]), x[inactive, 0])
    gens = generate_edited(model_a, model_b, tok, prompts, CFG, LAYER, clamp_edit(cc, "a", [feature], 0.0), "a")
    assert ids(gens) == ids(generate(model_a, tok, prompts, CFG))


def test_ranking_statistics_match_brute_force():
    gen = torch.Generator().manual_seed(0)
    pos = torch.relu(torch.randn(30, 5, generator=gen) + torch.tensor([2.0, 0, 0, -1, 0]))
    neg = torch.relu(torch.randn(40, 5, generator=gen))
    neg[:, 4] = 0
    pos[:, 4] = 0  # never fires: d = 0, AUROC = ½
    pairs = (pos[:, None, :] > neg[None, :, :]).float() + 0.5 * (pos[:, None, :] == neg[None, :, :]).float()
    torch.testing.assert_close(auroc(pos, neg), pairs.mean((0, 1)))
    sd = (((29 * pos.var(0) + 39 * neg.var(0)) / 68).sqrt())
    torch.testing.assert_close(cohens_d(pos, neg)[:4], ((pos.mean(0) - neg.mean(0)) / sd)[:4])
    assert cohens_d(pos, neg)[4] == 0
    stats = rank_features(pos, neg, [1, 0, 4])
    assert [s.feature for s in stats][0] == 0 and stats[0].auroc > 0.8
    assert stats[0].typical == pytest.approx(float(pos[:, 0][pos[:, 0] > 0].mean()), rel=1e-5)
    with pytest.raises(ValueError, match="at least 2"):
        rank_features(pos[:1], neg, [0])


def test_a_ranking_whose_statistic_ties_has_no_winner():
    never = torch.zeros(30, 4)  # four features that never fire: d 0, AUROC ½ each, a tie broken only by index
    assert not separates(rank_features(never, torch.zeros(40, 4), range(4)))
    gen = torch.Generator().manual_seed(1)
    pos, neg = torch.relu(torch.randn(30, 4, generator=gen) + 1), torch.relu(torch.randn(40, 4, generator=gen))
    assert separates(rank_features(pos, neg, range(4)))
    assert not has_signal([0.3, 0.3, 0.3], 0.0) and has_signal([0.3, 0.2], 0.0)
    assert has_signal([0.3], 0.0) and not has_signal([0.0], 0.0)  # a lone candidate: signal unless it is null


def test_bootstrap_intervals():
    rate = bootstrap_rate([1, 0, 0, 1, 1, 1, 0, 1], n_boot=500)
    assert rate.mean == pytest.approx(0.625) and rate.lo <= rate.mean <= rate.hi and rate.n == 8
    before, after = [0] * 20 + [1] * 20, [1] * 20 + [1] * 20
    delta = paired_delta_pp(before, after, n_boot=500)
    assert delta.mean == pytest.approx(50.0) and 25 < delta.lo <= 50 <= delta.hi < 75
    same = paired_delta_pp(before, before)
    assert (same.mean, same.lo, same.hi) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="one pair per prompt"):
        paired_delta_pp([1], [1, 0])
    assert np.isfinite(bootstrap_rate([0.5]).hi)
