"""Planted-feature paired activations: data with a known answer for tests and the quick start.

Each planted feature is a random unit direction per model it lives in (shared features have one
direction in A and another in B; A-only features write only to A, B-only only to B) with sparse,
positive activations. Noise, a non-zero mean and a different scale per model make
normalization matter. Everything is a deterministic function of the seed.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

from dfc_ray.config import PlantedConfig
from dfc_ray.crosscoder import DedicatedFeatureCrosscoder

# Offsets that keep the planted directions and rows off the small integer seeds used to
# initialize crosscoders (same seed = same random stream = decoders born on the answer).
DIRECTION_STREAM, ROW_STREAM = 0x5EED0000, 0x7A7A0000  # torch seeds use the low 32 bits


class PlantedFeatures:
    """A fixed set of planted directions and the row sampler that uses them."""

    def __init__(self, cfg: PlantedConfig):
        self.cfg = cfg
        gen = torch.Generator().manual_seed(DIRECTION_STREAM + cfg.seed)

        def unit(n: int) -> Tensor:
            w = torch.randn(n, cfg.d_model, generator=gen)
            return w / w.norm(dim=1, keepdim=True)

        self.shared_a, self.shared_b = unit(cfg.n_shared), unit(cfg.n_shared)
        self.a_only, self.b_only = unit(cfg.n_a_only), unit(cfg.n_b_only)
        self.mean = unit(2) * cfg.mean_shift
        self.scale = torch.tensor([cfg.scale_a, cfg.scale_b])

    def sample(self, rows: int, seed: int) -> Tensor:
        """`rows` paired activations (rows, 2, d_model), fp32, deterministic in `seed`."""
        cfg, gen = self.cfg, torch.Generator().manual_seed(ROW_STREAM + seed)

        def codes(n: int) -> Tensor:
            on = torch.rand(rows, n, generator=gen) < cfg.p_active
            return on * (0.5 + torch.rand(rows, n, generator=gen))

        shared, a_only, b_only = codes(cfg.n_shared), codes(cfg.n_a_only), codes(cfg.n_b_only)
        x_a = shared @ self.shared_a + a_only @ self.a_only
        x_b = shared @ self.shared_b + b_only @ self.b_only
        x = torch.stack([x_a, x_b], dim=1) + cfg.noise * torch.randn(rows, 2, cfg.d_model, generator=gen)
        return (x + self.mean) * self.scale[None, :, None]

    def batches(self, batch_size: int, seed: int = 1) -> Iterator[Tensor]:
        """An endless stream of batches; batch i uses seed (seed, i) so streams are reproducible."""
        i = 0
        while True:
            yield self.sample(batch_size, seed=seed * 1_000_003 + i)
            i += 1

    def write_folder(self, path: str | Path, rows: int, rows_per_file: int = 4096,
                     dtype: torch.dtype = torch.float16, seed: int = 1) -> list[Path]:
        """Write `rows` rows as `part-XXXXX.safetensors` files, each with one tensor `activations`."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        files = []
        for i, start in enumerate(range(0, rows, rows_per_file)):
            n = min(rows_per_file, rows - start)
            file = path / f"part-{i:05d}.safetensors"
            save_file({"activations": self.sample(n, seed=seed * 1_000_003 + i).to(dtype).contiguous()}, str(file))
            files.append(file)
        return files

    def recovery(self, cc: DedicatedFeatureCrosscoder) -> dict[str, float]:
        """Mean over planted features of the best cosine to a decoder row of the matching partition.

        A-only features are matched against the A-exclusive rows (their A part), B-only against
        B-exclusive rows, shared features against shared rows (mean of the A and B cosines). Cosines
        are scale-invariant, so normalized-space decoder rows compare directly to raw directions."""
        dec, part = cc.W_dec.cpu(), cc.partition

        def best_cos(planted: Tensor, rows: Tensor) -> Tensor:
            if len(rows) == 0 or len(planted) == 0:
                return torch.zeros(len(planted), len(rows))
            return planted @ (rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12)).T

        out = {}
        for name, planted, idx, model in (("a_only", self.a_only, part.a_exclusive, 0),
                                           ("b_only", self.b_only, part.b_exclusive, 1)):
            cos = best_cos(planted, dec[idx.cpu(), model])
            out[name] = float(cos.max(1).values.mean()) if cos.numel() else 0.0
        shared = dec[part.shared.cpu()]
        cos = (best_cos(self.shared_a, shared[:, 0]) + best_cos(self.shared_b, shared[:, 1])) / 2
        out["shared"] = float(cos.max(1).values.mean()) if cos.numel() else 0.0
        return out
