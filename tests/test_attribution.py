"""The difference attribution (dfc_ray/attribution.py), the patch edit and the curve's paired share, on
planted-feature activations and a DFC trained on them for a few steps (no models)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from actors.steering import paired_share
from dfc_ray.attribution import (PARTITIONS, attribute, difference_directions, encode, fewest_for, largest_terms,
                                 latent_scaling, mean_write, partition_names, patch_norms, raw_bias)
from dfc_ray.config import PlantedConfig
from dfc_ray.crosscoder import DFCConfig
from dfc_ray.interventions import clamp_edit, patch_edit
from dfc_ray.synthetic import PlantedFeatures
from test_interventions import fit_dfc

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained():
    """(a DFC with every partition, the 128 of 2048 fresh rows where A's first A-only feature is largest): on
    rows like the training data the normalization means would hold all of v, as on a subset they do not."""
    planted = PlantedFeatures(PlantedConfig(d_model=16, n_shared=12, n_a_only=3, n_b_only=3, seed=3))
    cc = fit_dfc(DFCConfig(d_model=16, dict_size=48, k=4, a_exclusive=0.125, b_exclusive=0.125),
                 planted.sample(2048, seed=1), 60).eval()
    x = planted.sample(2048, seed=2)
    return cc, x[(x[:, 0] @ planted.a_only[0]).argsort(descending=True)[:128]]


def test_the_parts_add_up_to_the_reference_exactly(trained):
    cc, x = trained
    att = attribute(cc, x, top=48)
    assert att.features > 0 and att.norm_means < att.reference_norm
    v = (x[:, 0] - x[:, 1]).mean(0)
    unit = v / v.norm()
    with torch.inference_mode():
        xhat = cc(x)
    reconstructed = (xhat[:, 0] - xhat[:, 1]).mean(0)  # the forward pass, not the attribution's algebra
    assert att.reference_norm == pytest.approx(float(v.norm()), rel=1e-6)
    assert att.features + att.bias + att.norm_means + att.error == pytest.approx(att.reference_norm, rel=1e-5)
    assert att.error == pytest.approx(float((v - reconstructed) @ unit), abs=1e-4)
    assert att.features == pytest.approx(sum(att.contributions), rel=1e-5)
    assert att.cos_reconstruction == pytest.approx(float(torch.cosine_similarity(reconstructed, v, dim=0)), abs=1e-5)
    assert sum(att.shares.values()) == pytest.approx(1.0, abs=1e-5) and list(att.shares) == list(PARTITIONS)
    # the terms by brute force: mean activation times the difference of the raw decoder rows along v̂
    codes = encode(cc, x)
    raw = cc.raw_decoder().detach()
    brute = [float(codes[:, j].mean() * (raw[j, 0] - raw[j, 1]) @ unit) for j in range(cc.cfg.dict_size)]
    np.testing.assert_allclose(att.contributions, brute, rtol=1e-4, atol=1e-6)
    names = partition_names(cc)
    for term in att.top:
        assert term.partition == names[term.feature] and term.contribution > 0
        assert term.contribution == pytest.approx(brute[term.feature], rel=1e-4)
    assert [t.contribution for t in att.top] == sorted((t.contribution for t in att.top), reverse=True)
    assert torch.allclose(raw_bias(cc), cc.decode(torch.zeros(1, cc.cfg.dict_size))[0], atol=1e-6)


def test_feature_counts_and_shares_on_known_terms():
    c = torch.tensor([5.0, -1.0, 3.0, 2.0])  # total 9
    assert fewest_for(c, 0.5) == 1 and fewest_for(c, 0.9) == 3 and fewest_for(c, 1.0) == 3
    assert fewest_for(torch.tensor([-1.0, 0.5]), 0.5) == -1  # nothing to be a share of


def test_identical_models_have_no_difference_to_attribute(trained):
    cc, x = trained
    att = attribute(cc, torch.stack([x[:, 0], x[:, 0]], dim=1))
    assert att.reference_norm == 0 and att.n50 == -1 and att.n90 == -1
    assert set(att.shares.values()) == {0.0} and att.features == 0.0
    with pytest.raises(ValueError, match="expected"):
        attribute(cc, x[:, 0])


def test_latent_scaling_recovers_known_scales():
    gen = torch.Generator().manual_seed(0)
    d = torch.randn(2, 8, generator=gen)
    f = torch.relu(torch.randn(100, 2, generator=gen))
    noise = torch.randn(100, 2, 8, generator=gen)
    noise -= (noise @ d[0])[..., None] * d[0] / d[0].norm() ** 2  # nothing along feature 0's direction
    y = noise.clone()
    y[:, 0] += 2.0 * f[:, :1] * d[0]  # model A writes feature 0 at twice its code
    y[:, 1] += 0.0
    beta = latent_scaling(f, y, d)
    assert beta[0, 0] == pytest.approx(2.0, rel=1e-5) and beta[0, 1] == pytest.approx(0.0, abs=1e-5)
    assert latent_scaling(torch.zeros(100, 2), y, d).abs().max() == 0  # a feature that never fires: 0


def test_patch_moves_writes_and_an_ablation_is_a_patch_of_b_exclusive_features(trained):
    cc, x = trained
    codes = encode(cc, x)
    b_only = cc.partition.b_exclusive.tolist()
    ablation = clamp_edit(cc, "b", b_only, 0.0)(x)
    torch.testing.assert_close(patch_edit(cc, "b", b_only)(x), ablation, rtol=1e-4, atol=1e-4)
    assert torch.equal(patch_edit(cc, "a", [])(x), x[:, 0]) and torch.equal(patch_edit(cc, "a", [0, 5], 0.0)(x),
                                                                            x[:, 0])
    features = largest_terms(attribute(cc, x), 3)
    moved = patch_edit(cc, "a", features)(x) - x[:, 0]  # A's rows of the features replaced by B's
    expected = -(codes[:, features] @ difference_directions(cc)[features])
    torch.testing.assert_close(moved, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(moved.norm(dim=-1), patch_norms(cc, codes, features), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(-moved.mean(0), mean_write(cc, attribute(cc, x), features), rtol=1e-4, atol=1e-4)


def test_largest_terms_rank_positive_terms_within_a_pool(trained):
    cc, x = trained
    att = attribute(cc, x)
    c = att.contributions
    ranked = largest_terms(att, 100)
    assert all(c[j] > 0 for j in ranked) and [c[j] for j in ranked] == sorted((c[j] for j in ranked), reverse=True)
    b_only = cc.partition.b_exclusive.tolist()
    assert largest_terms(att, 2, b_only) == [j for j in ranked if j in b_only][:2]


def test_paired_share_on_known_scores():
    clean = [False] * 10
    reference = [True] * 8 + [False] * 2  # +80 pp
    steered = [True] * 4 + [False] * 6  # +40 pp
    share = paired_share(clean, steered, reference, n_boot=500)
    assert share.mean == pytest.approx(0.5) and share.lo <= 0.5 <= share.hi and share.n == 10
    assert paired_share(clean, steered, clean, n_boot=50).mean == 0.0  # no yardstick: 0, never NaN
    with pytest.raises(ValueError, match="one triple per prompt"):
        paired_share(clean, steered[:3], reference)
