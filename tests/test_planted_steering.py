"""Planted truth for the steering protocol: a tiny Qwen2 pair where A = B except for a rank-1 change
W + u·wᵀ to block 1's MLP down-projection (dfc_ray/organism/planted.py), so A − B after block 1 is
u times a per-position scalar. The reference direction must recover u, a DFC trained on the pair must
dedicate an A-exclusive feature to u, the candidate ranking must pick that feature and the difference
attribution must put it first (n50 = 1); with nothing planted (A = B) none of it may happen. A second
pair where A only writes a direction B also writes more strongly must put a SHARED feature first, with
no A-exclusive share. Plus the exactness of α's residual-norm calibration and the causal tests' plumbing."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from actors.steering import SteerConfig, Steerer
from dfc_ray import metrics
from dfc_ray.attribution import attribute
from dfc_ray.crosscoder import DFCConfig
from dfc_ray.evaluate import load_crosscoder
from dfc_ray.generation import GenerationConfig, generate
from dfc_ray.interventions import generate_steered, last_prompt_residuals, prompt_activations, steering_vector
from dfc_ray.organism import world
from dfc_ray.config import PlantedPairConfig
from dfc_ray.organism.planted import build_planted_pair
from dfc_ray.ranking import NO_SIGNAL
from dfc_ray.reference import NO_STEERABLE_DIRECTION, cosines, share_of_reference
from dfc_ray.tooluse import load_tasks, render_prompt
from test_interventions import fit_dfc

pytestmark = pytest.mark.usefixtures("one_thread")
LAYER = 1
CFG = SteerConfig(n_dev=24, n_test=8, n_plain=16, top_n=1, alphas=(0.0, 0.8), rankings=("cos_reference",),
                  max_new_tokens=4, batch_size=16, n_bootstrap=200, targets=("b",), primary="b")


def train_dfc(steerer: Steerer, out: Path, steps: int = 600) -> Path:
    """A small DFC (64 features, 8 A-exclusive, k 4) on the pair's activations at every token of
    organism plain text and train prompts after block LAYER, trained in-process."""
    texts = world.plain_text(48, 5) + [render_prompt(steerer.tokenizer, t) for t in load_tasks("organism:train")[:24]]
    x = torch.stack([torch.cat(prompt_activations(m, steerer.tokenizer, texts, LAYER))
                     for m in (steerer.model_a, steerer.model_b)], dim=1).float()
    fit_dfc(DFCConfig(d_model=x.shape[-1], dict_size=64, k=4, a_exclusive=0.125, b_exclusive=0.125), x, steps).save(out)
    return out


@pytest.fixture(scope="module", params=[True, False], ids=["planted", "control"])
def planted(request, tmp_path_factory):
    """(steerer on the pair, planted unit direction u, DFC checkpoint, dev tasks); the control has A = B."""
    root = tmp_path_factory.mktemp("planted" if request.param else "control")
    spec, u = build_planted_pair(root / "pair", PlantedPairConfig(layer=LAYER, plant=request.param))
    steerer = Steerer(spec, CFG)
    dev, _ = steerer._tasks(CFG)
    return request.param, steerer, u, train_dfc(steerer, root / "dfc"), dev


def a_exclusive_cosines(checkpoint: Path, u: torch.Tensor) -> dict[int, float]:
    cc = load_crosscoder(str(checkpoint), "cpu")
    features = cc.partition.a_exclusive.tolist()
    return dict(zip(features, cosines(cc.raw_decoder()[features, 0], u).abs().tolist()))


def test_the_reference_direction_recovers_the_planted_direction(planted):
    is_planted, steerer, u, _, dev = planted
    v = steerer.reference_direction(steerer.tool_prompts(dev), LAYER, CFG.batch_size)
    if is_planted:
        assert abs(float(cosines(v[None], u)[0])) > 0.99
    else:
        assert float(v.norm()) == 0.0  # identical models: not a rounding's worth of difference


def test_a_dfc_dedicates_an_a_exclusive_feature_to_the_planted_direction(planted):
    is_planted, _, u, checkpoint, _ = planted
    best = max(a_exclusive_cosines(checkpoint, u).values())
    assert best >= 0.9 if is_planted else best < 0.9


def test_the_candidate_ranking_picks_the_planted_feature(planted):
    is_planted, steerer, u, checkpoint, dev = planted
    if not is_planted:
        pytest.skip("nothing planted: no feature to pick (the DFC test above checks none aligns)")
    cc = load_crosscoder(str(checkpoint), "cpu")
    planted_feature = max((c, f) for f, c in a_exclusive_cosines(checkpoint, u).items())[1]
    ranking = steerer.rank(cc, LAYER, dev, CFG)
    v = steerer.reference_direction(steerer.tool_prompts(dev), LAYER, CFG.batch_size)
    scales = steerer.feature_scales(cc, ranking, "b", LAYER, dev, CFG)
    picks, _ = steerer.candidates(cc, ranking, v, "b", LAYER, dev, scales, CFG)
    assert picks["cos_reference"] == [planted_feature]
    result = steerer.steer(str(checkpoint), LAYER)  # the whole protocol: its grid holds the feature
    target = result.targets["b"]
    assert target.candidates["cos_reference"] == [planted_feature] and target.feature == planted_feature
    assert abs(target.cos_reference) >= 0.9
    metrics = result.metrics()
    assert metrics["steer_cos_reference"] == target.cos_reference
    assert metrics["steer_reference_label"] in ("", NO_STEERABLE_DIRECTION)
    assert metrics["steer_reference_sig"] == int(target.reference.delta_pp.lo > 0)


def test_a_tied_ranking_chooses_no_feature_and_steers_nothing(planted, tmp_path):
    """A-exclusive features that never fire tie at Cohen's d 0 and AUROC ½: the trial reports that no
    feature separates tool prompts instead of steering feature 0."""
    is_planted, steerer, _, checkpoint, _ = planted
    if not is_planted:
        pytest.skip("one pair is enough: the tie comes from the checkpoint")
    cc = load_crosscoder(str(checkpoint), "cpu")
    silent = cc.partition.a_exclusive
    with torch.no_grad():
        cc.enc_a.zero_()
        cc.b_enc[silent] = -1.0
    cc.save(tmp_path / "silent")
    result = steerer.steer(str(tmp_path / "silent"), LAYER, replace(CFG, rankings=("cohens_d",)))
    assert result.skipped == NO_SIGNAL and result.targets == {} and result.ranking == []
    assert "steer_feature" not in result.metrics()


def test_alpha_in_residual_norm_units_is_exact_and_zero_is_a_no_op(planted):
    _, steerer, _, checkpoint, dev = planted
    cc = load_crosscoder(str(checkpoint), "cpu")
    prompts = steerer.tool_prompts(dev)
    measured = float(last_prompt_residuals(steerer.model_b, steerer.tokenizer, prompts, LAYER).norm(dim=-1).mean())
    ranking = steerer.rank(cc, LAYER, dev, CFG)
    scales = steerer.feature_scales(cc, ranking, "b", LAYER, dev, CFG)
    for s in ranking[:3]:
        vector = steering_vector(cc, [s.feature], "b", 0.8, [scales[s.feature]])
        assert float(vector.norm()) == pytest.approx(0.8 * measured, rel=1e-5)
    v = steerer.reference_direction(prompts, LAYER, CFG.batch_size)
    if float(v.norm()) > 0:
        assert float(steerer.reference_vector(v, 1.2, measured, CFG).norm()) == pytest.approx(1.2 * measured, rel=1e-5)
    cfg = GenerationConfig(max_new_tokens=6, batch_size=8)
    zero = steering_vector(cc, [ranking[0].feature], "b", 0.0, [scales[ranking[0].feature]])
    clean = generate(steerer.model_b, steerer.tokenizer, prompts[:8], cfg)
    steered = generate_steered(steerer.model_b, steerer.tokenizer, prompts[:8], cfg, LAYER, zero)
    assert [g.token_ids for g in steered] == [g.token_ids for g in clean]


def test_share_of_reference_is_defined_without_a_positive_reference():
    assert share_of_reference(10.0, 40.0) == 0.25
    assert share_of_reference(10.0, 0.0) == 0.0 and share_of_reference(-5.0, -10.0) == 0.0


def differing_positions(steerer: Steerer, dev) -> torch.Tensor:
    """Paired activations (n, 2, d) at the tenth of all dev tool prompt tokens where A and B differ most:
    where the planted neuron fires (the organism's counterpart: its tool prompts, where its A and B differ)."""
    prompts = steerer.tool_prompts(dev)
    x = torch.stack([torch.cat(prompt_activations(m, steerer.tokenizer, prompts, LAYER))
                     for m in (steerer.model_a, steerer.model_b)], dim=1)
    return x[(x[:, 0] - x[:, 1]).norm(dim=-1).argsort(descending=True)[:len(x) // 10]]


def test_the_attribution_puts_the_planted_feature_first(planted):
    is_planted, steerer, u, checkpoint, dev = planted
    att = attribute(load_crosscoder(str(checkpoint), "cpu"), differing_positions(steerer, dev))
    if not is_planted:
        assert att.reference_norm == 0 and att.n50 == -1 and set(att.shares.values()) == {0.0}
        return
    planted_feature = max((c, f) for f, c in a_exclusive_cosines(checkpoint, u).items())[1]
    top = att.top[0]
    assert att.n50 == 1 and top.feature == planted_feature and top.partition == "a_exclusive"
    assert att.shares["a_exclusive"] > 0.5 and abs(top.cos_reference) > 0.9
    assert top.beta_a > 0.5 and abs(top.beta_b) < 0.1  # Latent Scaling: B has none of it


def test_the_planted_features_card_shows_the_planted_rows(planted, tmp_path):
    """Planted truth for feature cards: u is no token direction, so the planted feature's top contexts must
    be the planted rows (where x_A − x_B = u·c·a_j is largest), each shown with its own token marked."""
    from dfc_ray.cards import feature_cards, unembedding
    from dfc_ray.config import CorpusSpec, HarvestConfig
    from dfc_ray.harvest import harvest
    from dfc_ray.store import iter_shards

    is_planted, steerer, u, checkpoint, _ = planted
    if not is_planted:
        pytest.skip("nothing planted: no planted rows to find")
    corpus = CorpusSpec(tasks="organism:train", n_tasks=24, plain_text="organism", n_plain=24, max_tokens=256)
    uri = harvest(HarvestConfig(store=str(tmp_path), layers=(LAYER,), pair=steerer.pair, corpus=corpus,
                                positions="all_tokens", dtype="float32", batch_size=16), use_ray=False,
                  progress=False).uri
    gap = torch.cat([(x[:, 0] - x[:, 1]).norm(dim=-1) for x, _ in iter_shards(uri, LAYER)])
    planted_rows = set(gap.argsort(descending=True)[:len(gap) // 20].tolist())  # the top 5% of ‖x_A − x_B‖
    rows_of = {tuple(p): i for i, p in enumerate(p for _, prov in iter_shards(uri, LAYER) for p in prov.tolist())}
    feature = max((c, f) for f, c in a_exclusive_cosines(checkpoint, u).items())[1]
    lenses = (unembedding(steerer.model_a), unembedding(steerer.model_b))
    card, = feature_cards(load_crosscoder(str(checkpoint), "cpu"), uri, LAYER, [feature], "planted",
                          steerer.tokenizer, lenses)
    assert card.partition == "a_exclusive" and not card.note and len(card.top_examples) == 8
    for example in card.top_examples:
        assert rows_of[(example.record, example.position)] in planted_rows
        assert example.token_activations[example.marked] == pytest.approx(example.activation)
    assert card.decoder["beta_a"] > 0.5 and abs(card.decoder["beta_b"]) < 0.1
    assert card.encoder_split["b"] == 0 and card.logit_lens["b"] == {"top": [], "bottom": []}


@pytest.fixture(scope="module")
def scaled(tmp_path_factory):
    """(steerer, u, DFC checkpoint, dev tasks) of a pair where B writes u through one neuron and A writes it
    twice as strongly; the DFC trains longer than the rank-1 one (at 600 steps it still splits the extra
    write into an A-exclusive feature, which Latent Scaling flags with β_B ≈ 0.6)."""
    root = tmp_path_factory.mktemp("scaled")
    spec, u = build_planted_pair(root / "pair", PlantedPairConfig(layer=LAYER, change="scale", scale=2.0))
    steerer = Steerer(spec, CFG)
    dev, _ = steerer._tasks(CFG)
    return steerer, u, train_dfc(steerer, root / "dfc", steps=1500), dev


def test_a_scaled_shared_direction_is_attributed_to_a_shared_feature(scaled):
    steerer, u, checkpoint, dev = scaled
    cc = load_crosscoder(str(checkpoint), "cpu")
    att = attribute(cc, differing_positions(steerer, dev))
    top = att.top[0]
    assert top.partition == "shared" and att.n50 == 1 and abs(att.shares["a_exclusive"]) < 0.05
    rows = cc.raw_decoder()[top.feature]
    assert float(cosines(rows, u).abs().min()) > 0.99  # both rows write u ...
    assert float(rows[0].norm() / rows[1].norm()) == pytest.approx(2.0, rel=0.15)  # ... A's twice as strongly
    assert top.beta_b / top.beta_a == pytest.approx(0.5, abs=0.1)


def test_localize_runs_each_causal_test_with_its_control(planted):
    is_planted, steerer, _, checkpoint, _ = planted
    if not is_planted:
        pytest.skip("nothing planted: no difference to localise")
    cfg = replace(CFG, localize_sizes=(1, 2))
    result = steerer.localize(str(checkpoint), LAYER, cfg)
    found = result.metrics()
    assert not [k for k in found if metrics.find(k) is None]  # every key is registered
    assert [p.n for p in result.curve] == [1, 2] and found["loc_curve_n"] in (1, 2)
    assert found["loc_n50"] in (-1, 1, 2) and found["diff_n50"] == result.attribution.n50
    assert not result.tests["curve"].skipped and not result.tests["patch_a"].skipped
    for test in result.tests.values():
        if test.skipped:
            continue
        assert test.n in (1, 2) and len(test.random_features) == len(test.features) <= test.n
        assert not set(test.features) & set(test.random_features)
        assert test.delta_pp.lo <= test.delta_pp.mean <= test.delta_pp.hi
        assert [n for n, _ in test.dev_delta_pp] == sorted(n for n, _ in test.dev_delta_pp)
    assert set(result.tests) == {"curve", "ablate_b", "patch_a"}
    assert steerer.localize(str(checkpoint), LAYER, replace(cfg, localize=())).tests == {}  # attribution only
    other = steerer.localize(str(checkpoint), LAYER, replace(cfg, localize_when={"k": 5}))  # it has k = 4
    assert other.tests == {} and other.curve == [] and other.attribution.n50 == result.attribution.n50
    with pytest.raises(ValueError, match="localize_when"):
        replace(cfg, localize_when={"dictsize": 64})
