"""The DFC math: exclusivity, sparsity, losses, normalization and checkpoints."""

from __future__ import annotations

import json

import pytest
import torch

from dfc_ray.crosscoder import DedicatedFeatureCrosscoder, DFCConfig
from dfc_ray.synthetic import PlantedConfig, PlantedFeatures

D_MODEL = 16


pytestmark = pytest.mark.usefixtures("one_thread")


def make(**overrides) -> DedicatedFeatureCrosscoder:
    cfg = dict(d_model=D_MODEL, dict_size=64, k=4, a_exclusive=0.125, b_exclusive=0.25) | overrides
    return DedicatedFeatureCrosscoder(DFCConfig(**cfg), seed=1)


def data(rows: int = 128, seed: int = 0) -> torch.Tensor:
    return PlantedFeatures(PlantedConfig(d_model=D_MODEL, n_shared=24, n_a_only=6, n_b_only=6)).sample(rows, seed)


def assert_exclusive(cc: DedicatedFeatureCrosscoder) -> None:
    part, w_dec, w_enc = cc.partition, cc.W_dec, cc.W_enc
    for w in (w_dec, w_enc):
        assert torch.count_nonzero(w[part.a_exclusive, 1]) == 0  # A-exclusive: nothing in/out of B
        assert torch.count_nonzero(w[part.b_exclusive, 0]) == 0
        assert torch.count_nonzero(w[part.a_exclusive, 0]) > 0
        assert torch.count_nonzero(w[part.shared]) > 0


def test_partitions_are_sized_by_fraction_and_structurally_exclusive():
    cc = make()
    part = cc.partition
    assert part.a_exclusive.tolist() == list(range(0, 8))
    assert part.b_exclusive.tolist() == list(range(8, 24))
    assert part.shared.tolist() == list(range(24, 64))
    assert part.shared.dtype == torch.long
    assert_exclusive(cc)
    # Forbidden weights are not parameters at all: encoder and decoder each hold exactly the
    # allowed entries (exclusive features d_model wide, shared ones 2*d_model).
    allowed = D_MODEL * (8 + 16) + 2 * D_MODEL * 40
    assert sum(p.numel() for n, p in cc.named_parameters() if n.startswith("enc_")) == allowed
    assert sum(p.numel() for n, p in cc.named_parameters() if n.startswith("dec_")) == allowed
    plain = make(a_exclusive=0.0, b_exclusive=0.0)
    assert len(plain.partition.shared) == 64 and len(plain.partition.a_exclusive) == 0


@pytest.mark.parametrize("optimizer", ["adam", "adamw"])
def test_exclusivity_holds_after_many_optimizer_steps(optimizer):
    cc = make(sparsity="batchtopk", l1_excl=1e-3, l1_shared=1e-3, dead_tokens=256)
    x = data(256)
    cc.fit_normalization(x)
    if optimizer == "adam":
        opt = torch.optim.Adam(cc.parameters(), lr=1e-2)
    else:
        opt = torch.optim.AdamW(cc.parameters(), lr=1e-2, weight_decay=0.5)
    for step in range(200):
        batch = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(step))[:64]]
        opt.zero_grad()
        cc.loss(batch)["loss"].backward()
        opt.step()
    assert_exclusive(cc)

    # An A-exclusive feature's activation does not depend on x_B at all ...
    probe = data(32, seed=5).requires_grad_(True)
    f = cc.encode(probe)
    a_excl = cc.partition.a_exclusive
    f[:, a_excl].sum().backward()
    assert torch.count_nonzero(probe.grad[:, 1]) == 0
    assert torch.count_nonzero(probe.grad[:, 0]) > 0
    with torch.no_grad():
        moved = probe.detach().clone()
        moved[:, 1] = torch.randn(32, D_MODEL) * 10
        cc.eval()
        f0, f1 = cc.encode(probe.detach()), cc.encode(moved)
        both = (f0[:, a_excl] > 0) & (f1[:, a_excl] > 0)
        assert both.any()
        assert torch.equal(f0[:, a_excl][both], f1[:, a_excl][both])
        # ... and writes only to x̂_A.
        one = torch.zeros(1, 64)
        one[0, a_excl[0]] = 3.0
        delta = cc.decode(one) - cc.decode(torch.zeros(1, 64))
        assert torch.count_nonzero(delta[0, 1]) == 0 and torch.count_nonzero(delta[0, 0]) > 0


def test_topk_keeps_exactly_k_per_sample():
    cc = make(k=5)
    f = cc.encode(data(64))
    assert ((f > 0).sum(1) == 5).all()
    assert (f >= 0).all()


@pytest.mark.parametrize("sparsity", ["topk", "batchtopk"])
def test_encode_columns_is_encode_restricted_to_the_named_features(sparsity):
    """Feature cards read a few columns of the codes over a whole store: the same bits as encode()'s columns,
    for features that fire, that never fire, repeated, from every partition (eval: batchtopk's threshold)."""
    cc = make(sparsity=sparsity, k=4)
    x = data(256, seed=3)
    cc.fit_normalization(x)
    cc.loss(x)  # batchtopk learns its threshold
    cc.eval()
    with torch.no_grad():
        cc.b_enc[5] = -1e4  # a feature that never fires
    codes = cc.encode(x)
    features = [0, 8, 20, 63, 5, 20]  # 0-7 A-exclusive, 8-23 B-exclusive, the rest shared
    assert (codes[:, 5] == 0).all() and (codes[:, [0, 8, 20, 63]] > 0).any(0).all()
    assert torch.equal(cc.encode_columns(x, torch.tensor(features)), codes[:, features])


def test_raw_decoder_rows_are_the_dense_decoders_rows():
    """Steering reads single rows (hundreds per checkpoint): the same bits as the dense raw decoder's."""
    cc = make()
    cc.fit_normalization(data(64) * torch.tensor([1.0, 3.0])[None, :, None])  # unequal scales per model
    features = torch.tensor([63, 0, 8, 7, 23, 24, 0])  # every partition, its edges, a repeat
    rows = cc.raw_decoder_rows(features)
    assert torch.equal(rows, cc.raw_decoder()[features])
    assert (rows[1, 1] == 0).all() and (rows[2, 0] == 0).all() and rows[0].all()  # exclusivity holds
    for outside in (64, -1):  # dense indexing raised (or read from the end); a row read must not give zeros
        with pytest.raises(IndexError, match=rf"feature {outside}: expected an index in \[0, 64\)"):
            cc.raw_decoder_rows(torch.tensor([3, outside]))
        with pytest.raises(IndexError, match=rf"feature {outside}: expected"):
            cc.encode_columns(data(8), torch.tensor([outside]))


def test_batchtopk_trains_with_batch_k_and_infers_with_threshold():
    cc = make(sparsity="batchtopk", k=4)
    x = data(64)
    cc.fit_normalization(x)
    assert cc.threshold < 0  # not learned yet
    f_train = cc.encode(x)
    counts = (f_train > 0).sum(1)
    assert counts.sum() == 64 * 4 and counts.min() != counts.max()  # per batch, not per sample
    out = cc.loss(x)
    assert out["l0"] * 64 == 64 * 4
    assert cc.threshold > 0

    cc.threshold.fill_(float(cc.threshold) * 0.5)  # a threshold that keeps more than batch*k
    cc.eval()
    f_eval = cc.encode(x)
    scores = torch.relu(cc._preacts(cc.normalize(x))) * cc.decoder_norms().norm(dim=0)
    assert torch.equal(f_eval > 0, scores > cc.threshold)
    assert (f_eval > 0).sum() != 64 * 4
    before = cc.threshold.clone()
    cc.loss(x)  # eval mode: no running-statistics update
    assert torch.equal(cc.threshold, before)


def test_auxk_gives_gradient_to_dead_features():
    x = data(64)
    grads = {}
    for aux_k in (0, 8):
        cc = make(k=2, aux_k=aux_k, dead_tokens=64)
        cc.fit_normalization(x)
        first = cc.loss(x)  # every feature that did not fire is now dead
        assert first["dead_frac"] == 0
        fired = cc.rows_since_fired == 0
        out = cc.loss(x)
        assert out["dead_frac"] > 0
        out["loss"].backward()
        dead_shared = (~fired)[cc.partition.shared]
        grads[aux_k] = cc.dec_s.grad[dead_shared].abs().sum(1)
        if aux_k:
            assert out["aux"] > 0
    assert (grads[0] == 0).all()
    assert (grads[8] > 0).any()


def test_l1_modes():
    x = data(64)
    common = dict(l1_excl=0.01, l1_shared=0.0)
    seed, partition = make(l1_mode="seed", **common), make(l1_mode="partition", **common)
    seed.eval(), partition.eval()
    f = seed.encode(x)
    codes = seed.decoder_norms().sum(0) * f.mean(0)
    shared = seed.partition.shared
    excl = torch.cat([seed.partition.a_exclusive, seed.partition.b_exclusive])
    torch.testing.assert_close(seed.loss(x)["l1"], 0.01 * codes.sum())
    torch.testing.assert_close(partition.loss(x)["l1"], 0.01 * codes[excl].sum())
    only_shared = make(l1_mode="partition", l1_excl=0.0, l1_shared=0.02).eval()
    torch.testing.assert_close(only_shared.loss(x)["l1"], 0.02 * codes[shared].sum())


def test_normalization_round_trip():
    x = data(512)
    cc = make(k=8)
    cc.fit_normalization(x)
    xn = cc.normalize(x)
    torch.testing.assert_close(xn.mean(0), torch.zeros(2, D_MODEL), atol=1e-4, rtol=0)
    torch.testing.assert_close(xn.pow(2).sum(-1).mean(0), torch.full((2,), float(D_MODEL)))
    cc.eval()
    out = cc.loss(x)
    raw = cc(x)
    raw_fvu = (raw - x).pow(2).sum((0, 2)) / (x - x.mean(0)).pow(2).sum((0, 2))
    torch.testing.assert_close(raw_fvu, torch.stack([out["fvu_a"], out["fvu_b"]]), rtol=1e-4, atol=1e-6)

    # A perfect-reconstruction construction: +e_i and -e_i features per model, all kept.
    perfect = DedicatedFeatureCrosscoder(DFCConfig(d_model=D_MODEL, dict_size=4 * D_MODEL, k=4 * D_MODEL,
                                                   a_exclusive=0.5, b_exclusive=0.5, decoder_norm_selection=False))
    perfect.fit_normalization(x)
    eye = torch.cat([torch.eye(D_MODEL), -torch.eye(D_MODEL)])
    with torch.no_grad():
        for w in (perfect.enc_a, perfect.dec_a, perfect.enc_b, perfect.dec_b):
            w.copy_(eye)
    torch.testing.assert_close(perfect(x), x, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(perfect.decode(perfect.encode(x)), x, rtol=1e-5, atol=1e-5)


def test_save_load_round_trip_is_bit_identical(tmp_path):
    cc = make(sparsity="batchtopk", dead_tokens=64)
    x = data(128)
    cc.fit_normalization(x)
    opt = torch.optim.Adam(cc.parameters(), lr=1e-2)
    for _ in range(5):
        opt.zero_grad()
        cc.loss(x)["loss"].backward()
        opt.step()
    cc.save(tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "model.safetensors"]
    loaded = DedicatedFeatureCrosscoder.load(tmp_path / "ckpt")
    assert loaded.cfg == cc.cfg
    for a, b in zip(cc.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)
    cc.eval(), loaded.eval()
    f = cc.encode(x)
    assert torch.equal(f, loaded.encode(x))
    assert torch.equal(cc.decode(f), loaded.decode(f))
    for key, value in cc.loss(x).items():
        assert torch.equal(value, loaded.loss(x)[key]), key


@pytest.mark.parametrize("damage, expected", [
    ("no_config", "no config.json"),
    ("bad_json", "config.json: not valid JSON"),
    ("unknown_field", "unknown field 'colour'"),
    ("bad_value", "DFCConfig.k=0"),
    ("missing_field", "d_model"),
    ("missing_tensor", "missing tensor 'dec_s'"),
    ("extra_tensor", "unexpected tensor 'extra'"),
    ("bad_shape", "tensor 'enc_a' has shape (3, 16)"),
])
def test_load_refuses_bad_folders(tmp_path, damage, expected):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "ckpt"
    make().save(folder)
    config, weights = folder / "config.json", folder / "model.safetensors"
    raw, tensors = json.loads(config.read_text()), load_file(str(weights))
    if damage == "no_config":
        config.unlink()
    elif damage == "bad_json":
        config.write_text("{nope")
    elif damage in ("unknown_field", "bad_value", "missing_field"):
        if damage == "unknown_field":
            raw["colour"] = "red"
        elif damage == "bad_value":
            raw["k"] = 0
        else:
            del raw["d_model"]
        config.write_text(json.dumps(raw))
    else:
        if damage == "missing_tensor":
            del tensors["dec_s"]
        elif damage == "extra_tensor":
            tensors["extra"] = torch.zeros(1)
        else:
            tensors["enc_a"] = torch.zeros(3, D_MODEL)
        save_file(tensors, str(weights))
    with pytest.raises((ValueError, FileNotFoundError)) as err:
        DedicatedFeatureCrosscoder.load(folder)
    message = str(err.value)
    assert expected in message and str(folder) in message and "\n" not in message


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="DFCConfig.b_exclusive"):
        DFCConfig(d_model=8, dict_size=32, k=4, a_exclusive=0.6, b_exclusive=0.6)
    with pytest.raises(ValueError, match="DFCConfig.sparsity='top'"):
        DFCConfig(d_model=8, dict_size=32, k=4, sparsity="top")
    with pytest.raises(ValueError, match="DFCConfig.k=64"):
        DFCConfig(d_model=8, dict_size=32, k=64)
    with pytest.raises(ValueError, match=r"expected \(batch, 2, 16\)"):
        make().encode(torch.zeros(4, 16))


def test_bf16_autocast_keeps_fp32_master_weights():
    cc = make(sparsity="batchtopk")
    x = data(64)
    cc.fit_normalization(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = cc.loss(x)
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])
    out["loss"].backward()
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in cc.parameters())


@pytest.mark.parametrize("sparsity", ["topk", "batchtopk"])
def test_sparse_backward_matches_dense_autograd(sparsity):
    """The sparse encoder backward and sparse decoder give the gradients of the dense formula."""
    import torch.nn.functional as F

    cc = make(sparsity=sparsity, aux_k=8, dead_tokens=64, l1_excl=1e-2, l1_shared=1e-2)
    x = data(64)
    cc.fit_normalization(x)
    cc.loss(x)  # makes some features dead, so AuxK is part of the loss
    out = cc.loss(x)
    assert out["dead_frac"] > 0
    out["loss"].backward()
    sparse = {name: p.grad.clone() for name, p in cc.named_parameters()}
    cc.zero_grad()

    # The same loss through plain autograd on dense pre-activations and dense masked weights.
    xn = cc.normalize(x)
    acts = F.relu(cc._preacts(xn))  # dense products with a graph
    with torch.no_grad():
        rows, feats, _ = cc._select(acts)
    codes = torch.zeros_like(acts).index_put((rows, feats), acts[rows, feats])
    part = cc.partition
    dense_dec = torch.zeros(64, 2, D_MODEL).index_put((part.a_exclusive, torch.tensor(0)), cc.dec_a)
    dense_dec = dense_dec.index_put((part.b_exclusive, torch.tensor(1)), cc.dec_b)
    dense_dec = dense_dec.index_put((part.shared,), cc.dec_s.view(-1, 2, D_MODEL))
    xhat = torch.einsum("bf,fmd->bmd", codes, dense_dec) + cc.b_dec
    norms = dense_dec.norm(dim=2).sum(1)
    c = norms * codes.mean(0)
    l1 = 1e-2 * c.sum() + 1e-2 * c[part.shared].sum()
    dead = cc.rows_since_fired >= 64
    residual = (xn - xhat).detach()
    aux_feats = acts.detach().masked_fill(~dead, -1).topk(min(8, int(dead.sum())), dim=1).indices
    aux_codes = torch.zeros_like(acts).scatter(1, aux_feats, acts.gather(1, aux_feats))
    approx = torch.einsum("bf,fmd->bmd", aux_codes, dense_dec)
    aux = (approx - residual).pow(2).sum() / (residual - residual.mean(0)).pow(2).sum()
    ((xhat - xn).pow(2).mean() + l1 + cc.cfg.aux_coef * aux).backward()
    for name, p in cc.named_parameters():
        torch.testing.assert_close(p.grad, sparse[name], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("a, b, dict_size, ok", [
    (0.5, 0.49, 100, True),
    (0.5, 0.5, 100, True),     # a sum of 1: nothing shared (the spec check used to refuse what the class accepted)
    (0.5, 0.5, 3, False),      # a sum of 1, but rounding gives 2 + 2 features of 3
    (0.6, 0.6, 100, False),
])
def test_the_exclusive_shares_must_fit_the_dictionary(a, b, dict_size, ok):
    """One rule for the class and the spec: n_shared >= 0 in whole features (a_exclusive + b_exclusive <= 1)."""
    build = lambda: DFCConfig(d_model=8, dict_size=dict_size, k=2, a_exclusive=a, b_exclusive=b)  # noqa: E731
    if ok:
        assert build().n_shared >= 0
    else:
        with pytest.raises(ValueError, match="DFCConfig.b_exclusive=.*<= 1 in whole features"):
            build()


def test_a_spec_accepts_exactly_what_the_class_accepts(tmp_path):
    import yaml

    from dfc_ray.spaces import SpecError, load_spec

    base = {"pair": {"a": "organism", "b": "organism"}, "layers": [1], "train": {"batch_size": 64},
            "grid": {"dict_size": [100], "k": [4]}}
    for a, ok in ((0.5, True), (0.6, False)):
        shares = {"a_exclusive": a, "b_exclusive": 0.5}
        path = tmp_path / "spec.yaml"
        path.write_text(yaml.safe_dump(base | {"crosscoder": shares}))
        if ok:
            assert load_spec(str(path)).n_trials == 1
        else:
            with pytest.raises(SpecError, match="<= 1 in whole features"):
                load_spec(str(path))


def _step(cc: DedicatedFeatureCrosscoder, x: torch.Tensor, formulation: str, dead_capacity: int | None = None):
    """One loss + backward under `formulation`: (loss parts, gradients, running statistics after)."""
    cc.formulation = formulation
    cc.zero_grad()
    out = cc.loss(x, dead_capacity=dead_capacity)
    out["loss"].backward()
    grads = {name: torch.zeros_like(p) if p.grad is None else p.grad.clone() for name, p in cc.named_parameters()}
    return out, grads, {name: b.clone() for name, b in cc.named_buffers()}


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.mark.parametrize("sparsity, aux_k, l1_mode, share", [
    ("topk", 0, "seed", 0.0), ("topk", 8, "seed", 0.03), ("topk", 8, "partition", 0.10),
    ("batchtopk", 0, "partition", 0.03), ("batchtopk", 8, "seed", 0.10), ("batchtopk", 8, "partition", 0.0),
])
def test_dense_formulation_equals_the_sparse_one(sparsity, aux_k, l1_mode, share):
    """The GPU formulation (dense GEMMs over scattered codes, sync-free AuxK), run here on CPU in fp32, gives
    the sparse path's loss, every parameter's gradient and the same running statistics, to 1e-5 relative."""
    x = data(96, seed=2)
    make_cc = lambda: make(dict_size=100, k=5, sparsity=sparsity, aux_k=aux_k, dead_tokens=8,  # noqa: E731
                           l1_mode=l1_mode, l1_excl=1e-2, l1_shared=2e-2, a_exclusive=share, b_exclusive=share)
    sparse, dense = make_cc(), make_cc()
    for cc in (sparse, dense):
        cc.fit_normalization(x)
        cc.loss(x[:8])  # one step of statistics: every feature that did not fire in it is now dead
    n_dead = int((sparse.rows_since_fired >= 8).sum())
    assert 0 < n_dead < 100
    reference = _step(sparse, x, "sparse")
    # AuxK's candidate set: counted (None), exactly the dead ones, or a larger bucket, all the same loss;
    # "hybrid" (dense encoder side, sparse decoder side) too.
    for formulation, capacity in (("dense", None), ("dense", n_dead), ("dense", 2 * n_dead), ("hybrid", n_dead)):
        state = {k: v.clone() for k, v in dense.state_dict().items()}
        out, grads, buffers = _step(dense, x, formulation, capacity)
        for key, value in reference[0].items():
            assert _relative(out[key], value) <= 1e-5 or float(value) == float(out[key]) == 0, (key, formulation)
        for name, grad in reference[1].items():
            assert _relative(grads[name], grad) <= 1e-5, (name, formulation, capacity)
        for name, buffer in reference[2].items():
            assert torch.equal(buffers[name], buffer), name
        dense.load_state_dict(state)
    if aux_k:
        assert reference[0]["aux"] > 0
        # A capacity left over from a window in which features were dead, with none dead now: no AuxK.
        fresh = make_cc()
        fresh.fit_normalization(x)
        assert _step(fresh, x, "dense", 16)[0]["aux"] == 0
        # With fewer candidates than dead features, AuxK is bounded work: a different but finite loss.
        out = _step(dense, x, "dense", max(1, n_dead // 4))[0]
        assert torch.isfinite(out["aux"]) and out["aux"] > 0


def test_dense_formulation_keeps_exclusivity_structural():
    """The forbidden blocks do not exist in either formulation: after AdamW steps with weight decay in the
    dense one, an A-exclusive feature still reads and writes only A."""
    cc = make(sparsity="topk", aux_k=4, dead_tokens=64)
    cc.formulation = "dense"
    x = data(128)
    cc.fit_normalization(x)
    opt = torch.optim.AdamW(cc.parameters(), lr=1e-2, weight_decay=0.5)
    for _ in range(30):
        opt.zero_grad()
        cc.loss(x[:64], dead_capacity=64)["loss"].backward()
        opt.step()
    assert_exclusive(cc)
    sparse_codes = cc.encode(x)
    cc.formulation = "sparse"
    torch.testing.assert_close(cc.encode(x), sparse_codes, rtol=1e-5, atol=1e-6)
