"""The CUDA path's Triton kernels, run on CPU tensors by Triton's interpreter: each primitive against plain
torch, and the whole sparse formulation with the kernels against the CPU one (embedding_bag)."""

from __future__ import annotations

import pytest
import torch

from dfc_ray import kernels
from dfc_ray.crosscoder import DedicatedFeatureCrosscoder, DFCConfig
from dfc_ray.synthetic import PlantedConfig, PlantedFeatures

pytest.importorskip("triton")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def interpreted(monkeypatch):
    """The kernels on CPU tensors, through the interpreter that tests/conftest.py turns on without a GPU."""
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: benchmarks/train_throughput.py times the kernels on it")
    monkeypatch.setattr(kernels, "FORCE", True)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_segment_sum_and_gathered_dots_match_torch(interpreted, dtype):
    gen = torch.Generator().manual_seed(0)
    y = torch.randn(40, 300, generator=gen).to(dtype)  # 300: not a multiple of the 128-wide tiles
    keys = torch.randint(0, 9, (150,), generator=gen).sort().values
    keys[-7:] = 9  # entries past the last segment are not counted
    idx = torch.randint(0, 40, (150,), generator=gen)
    idx[::11] = -1  # absent entries
    w = torch.randn(150, generator=gen)
    offsets = kernels.segment_offsets(keys, 9)
    assert offsets.tolist()[-1] == 143 and (offsets[1:] >= offsets[:-1]).all()
    out = kernels.segment_sum(offsets, idx, w, y, torch.float32)
    expected = torch.zeros(9, 300, dtype=torch.float64)
    for t in range(150):
        if keys[t] < 9 and idx[t] >= 0:
            expected[keys[t]] += w[t].double() * y[idx[t]].double()
    assert out.dtype == torch.float32 and _relative(out, expected) < (1e-6 if dtype == torch.float32 else 1e-6)
    assert (out[8] == expected[8].float()).all() or _relative(out[8], expected[8]) < 1e-6

    a_idx, b_idx = torch.randint(0, 40, (70,), generator=gen), torch.randint(0, 25, (70,), generator=gen)
    b_idx[::5] = -1
    b = torch.randn(25, 300, generator=gen).to(dtype)
    dots = kernels.gathered_dots(a_idx, b_idx, y, b)
    ref = (y[a_idx].double() * b[b_idx.clamp_min(0)].double()).sum(1) * (b_idx >= 0)
    assert _relative(dots, ref) < 1e-6 and (dots[::5] == 0).all()


@pytest.mark.parametrize("sparsity, aux_k, share", [("topk", 0, 0.10), ("topk", 8, 0.0), ("batchtopk", 8, 0.03)])
def test_the_sparse_formulation_with_kernels_equals_the_cpu_one(interpreted, monkeypatch, sparsity, aux_k, share):
    """Loss, every gradient and the running statistics: the kernels (as on CUDA; sparse, and hybrid's decoder)
    vs embedding_bag (CPU)."""
    x = PlantedFeatures(PlantedConfig(d_model=16, n_shared=24, n_a_only=6, n_b_only=6)).sample(48, 1)
    cfg = DFCConfig(d_model=16, dict_size=64, k=4, sparsity=sparsity, aux_k=aux_k, dead_tokens=8,
                    a_exclusive=share, b_exclusive=share, l1_excl=1e-2, l1_shared=1e-2)
    results = []
    for use_kernels, formulation in ((False, "sparse"), (True, "sparse"), (True, "hybrid")):
        monkeypatch.setattr(kernels, "FORCE", use_kernels)
        cc = DedicatedFeatureCrosscoder(cfg, seed=3)
        cc.formulation = formulation
        cc.fit_normalization(x)
        cc.loss(x[:8])  # makes features dead, so AuxK takes part
        out = cc.loss(x)
        out["loss"].backward()
        grads = {n: torch.zeros_like(p) if p.grad is None else p.grad for n, p in cc.named_parameters()}
        results.append((out, grads, dict(cc.named_buffers()), cc.forward(x).detach()))
    (out0, g0, b0, r0) = results[0]
    for out1, g1, b1, r1 in results[1:]:
        for key, value in out0.items():
            assert _relative(out1[key], value) <= 1e-5 or float(value) == float(out1[key]) == 0, key
        for name, grad in g0.items():
            assert _relative(g1[name], grad) <= 1e-5, name
        assert all(torch.equal(b1[name], buffer) for name, buffer in b0.items())
        assert _relative(r1, r0) <= 1e-6
