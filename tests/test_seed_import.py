"""`dfc-ray import-seed`: the seed study's checkpoints (config.json + model.pt) become dfc-ray checkpoints
whose encode/decode equal the study's own forward, and every bad input ends in one line."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dfc_ray.cli import main
from dfc_ray.crosscoder import DedicatedFeatureCrosscoder
from dfc_ray.seed import import_seed, read_import_record, require_known_normalization
from dfc_ray.store import ShardWriter, StoreSpec

D_MODEL, DICT, K = 8, 40, 5


class StudyCrosscoder:
    """The study's forward, re-implemented from its description (not from dfc-ray's code)."""

    def __init__(self, state: dict, k: int):
        self.s, self.k = state, k

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        pre = torch.einsum("bmd,mdf->bf", x, self.s["W_enc"]) + self.s["b_enc"]  # enc_mask NOT applied
        acts = torch.relu(pre)
        top = acts.topk(self.k, dim=1)
        return torch.zeros_like(acts).scatter(1, top.indices, top.values)

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        w_dec = self.s["W_dec"]
        if "dec_mask" in self.s:
            w_dec = w_dec * self.s["dec_mask"][:, :, None]
        return torch.einsum("bf,fmd->bmd", f, w_dec) + self.s["b_dec"]


def study_state(share: float | None, seed: int = 0) -> dict:
    """A study-format state dict; n = int(D × share) per exclusive partition, forbidden encoder and
    decoder weights zero (as the study initialised and trained them)."""
    gen = torch.Generator().manual_seed(seed)
    state = {"W_enc": torch.randn(2, D_MODEL, DICT, generator=gen), "b_enc": torch.randn(DICT, generator=gen) * 0.1,
             "W_dec": torch.randn(DICT, 2, D_MODEL, generator=gen), "b_dec": torch.randn(2, D_MODEL, generator=gen)}
    if share is not None:
        n = int(DICT * share)
        enc_mask = torch.ones(2, DICT)
        enc_mask[1, :n] = 0
        enc_mask[0, n:2 * n] = 0
        state["enc_mask"], state["dec_mask"] = enc_mask, enc_mask.T.clone()
        state["W_enc"] *= enc_mask[:, None, :]
        state["W_dec"] *= state["dec_mask"][:, :, None]
    return state


def write_study(folder: Path, state: dict, **config) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"activation_dim": D_MODEL, "dict_size": DICT, "k": K, **config}))
    torch.save(state, folder / "model.pt")
    return folder


def acts(n: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 2, D_MODEL, generator=torch.Generator().manual_seed(seed)) * 3 + 0.5


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["import-seed", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("share", [0.1, 0.05, None], ids=["dfc-10%", "dfc-5%", "plain"])
def test_imported_encode_decode_equal_the_study_forward(tmp_path, capsys, share):
    state = study_state(share)
    n = int(DICT * share) if share else 0
    src = write_study(tmp_path / "study", state, **({"n_a": n, "n_b": n} if share else {}))
    code, out, err = run_cli(capsys, src, "--out", tmp_path / "ckpt")
    assert code == 0, err
    assert "normalization: unknown" in out

    cc = DedicatedFeatureCrosscoder.load(tmp_path / "ckpt")
    study = StudyCrosscoder(state, K)
    assert (cc.cfg.n_a_exclusive, cc.cfg.n_b_exclusive) == (n, n)
    x = acts()
    f = cc.encode(x)
    torch.testing.assert_close(f, study.encode(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cc.decode(f), study.decode(study.encode(x)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cc(x), study.decode(study.encode(x)), rtol=1e-5, atol=1e-5)
    assert (f > 0).sum(1).max() <= K

    record = read_import_record(str(tmp_path / "ckpt"))
    assert record["normalization"] == "unknown" and record["norm_from"] is None and record["dropped"] == {}
    assert record["partition"] == {"n_a": n, "n_b": n, "n_shared": DICT - 2 * n,
                                   "from": "masks" if share else "plain crosscoder (no masks)"}
    with pytest.raises(ValueError, match="normalization unknown"):
        require_known_normalization(str(tmp_path / "ckpt"), allow_raw=False)
    assert require_known_normalization(str(tmp_path / "ckpt"), allow_raw=True) == "unknown"


def test_native_checkpoint_counts_as_trained(tmp_path):
    import_seed(str(write_study(tmp_path / "s", study_state(0.1))), str(tmp_path / "imported"))
    DedicatedFeatureCrosscoder.load(tmp_path / "imported").save(tmp_path / "native")
    assert require_known_normalization(str(tmp_path / "native"), allow_raw=False) == "trained"


def test_norm_from_a_harvest(tmp_path, capsys):
    """With --norm-from the checkpoint takes raw activations: the study's forward on (x − μ)·s, mapped back."""
    rng = np.random.default_rng(0)
    rows = (rng.standard_normal((500, 2, D_MODEL)) * np.array([2.0, 5.0])[None, :, None] + 1.5).astype(np.float32)
    store = str(tmp_path / "store")
    spec = StoreSpec(layer=13, d_model=D_MODEL, models=("a-rl", "b-base"), positions="text_end", harvest_hash="h",
                     dtype="float32", shard_rows=128)
    with ShardWriter(store, spec) as writer:
        writer.append(rows)
    state = study_state(0.1)
    src = write_study(tmp_path / "study", state, n_a=4, n_b=4)
    code, out, err = run_cli(capsys, src, "--out", tmp_path / "ckpt", "--norm-from", store, "--layer", 13)
    assert code == 0, err
    assert "harvest statistics" in out

    cc = DedicatedFeatureCrosscoder.load(tmp_path / "ckpt")
    mean = torch.from_numpy(rows.astype(np.float64).mean(0)).float()
    scale = (D_MODEL / ((torch.from_numpy(rows).double() - mean.double()) ** 2).sum(-1).mean(0)).sqrt().float()
    x = torch.from_numpy(rows[:50])
    study = StudyCrosscoder(state, K)
    f_study = study.encode((x - mean) * scale[:, None])
    torch.testing.assert_close(cc.encode(x), f_study, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cc(x), study.decode(f_study) / scale[:, None] + mean, rtol=1e-4, atol=1e-4)
    record = read_import_record(str(tmp_path / "ckpt"))
    assert record["normalization"] == "harvest"
    assert record["norm_from"] == {"store": store, "layer": 13, "rows": 500, "models": ["a-rl", "b-base"]}
    assert require_known_normalization(str(tmp_path / "ckpt"), allow_raw=False) == "harvest"


def test_leaky_weights_refused_then_dropped_and_recorded(tmp_path, capsys):
    state = study_state(0.1)
    state["W_enc"][1, :, 2] = 0.5  # A-exclusive feature 2 reads B: norm 0.5·sqrt(8)
    state["W_enc"][0, 3, 5] = 0.01  # B-exclusive feature 5 reads A, smaller
    state["W_dec"][1, 1] = 0.2  # A-exclusive feature 1 writes B (the study's decode masked it)
    src = write_study(tmp_path / "study", state)

    code, _, err = run_cli(capsys, src, "--out", tmp_path / "refused")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "encoder: A-exclusive reading B at feature 2" in err and f"{0.5 * 8 ** 0.5:.4g}" in err
    assert not (tmp_path / "refused").exists()

    code, _, err = run_cli(capsys, src, "--out", tmp_path / "ckpt", "--allow-leaky")
    assert code == 0, err
    dropped = read_import_record(str(tmp_path / "ckpt"))["dropped"]
    assert set(dropped) == {"encoder: A-exclusive reading B", "encoder: B-exclusive reading A",
                            "decoder: A-exclusive writing B"}
    assert dropped["encoder: B-exclusive reading A"]["max_feature"] == 5
    assert dropped["decoder: A-exclusive writing B"] == pytest.approx(
        {"features": 1, "max_norm": 0.2 * 8 ** 0.5, "max_feature": 1, "total_norm": 0.2 * 8 ** 0.5})

    # The import equals the study's forward with the dropped ENCODER weights zeroed; the dropped decoder
    # weight never mattered (the study's decode masked it).
    cleaned = {name: t.clone() for name, t in state.items()}
    cleaned["W_enc"] *= state["enc_mask"][:, None, :]
    cc, x = DedicatedFeatureCrosscoder.load(tmp_path / "ckpt"), acts()
    study_clean, study_raw = StudyCrosscoder(cleaned, K), StudyCrosscoder(state, K)
    torch.testing.assert_close(cc.encode(x), study_clean.encode(x), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(cc.encode(x), study_raw.encode(x), atol=1e-3)
    f = study_raw.encode(x)
    torch.testing.assert_close(cc.decode(f), study_raw.decode(f), rtol=1e-5, atol=1e-5)


class _WritesMarker:
    """A pickle that runs code on load: unpickling calls `_write_marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return _write_marker, (str(self.marker),)


def _write_marker(path: str) -> None:
    Path(path).write_text("code ran")


def test_pickle_holding_code_is_refused_never_run(tmp_path, capsys):
    marker = tmp_path / "marker"
    state = {**study_state(0.1), "extra": _WritesMarker(marker)}
    src = write_study(tmp_path / "study", state)
    # The file really runs code for a plain torch.load, so the refusal below is meaningful.
    torch.load(src / "model.pt", weights_only=False)
    assert marker.read_text() == "code ran"
    marker.unlink()

    code, _, err = run_cli(capsys, src, "--out", tmp_path / "ckpt")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "not a weights-only torch state dict" in err
    assert not marker.exists() and not (tmp_path / "ckpt").exists()


def _truncated(folder: Path) -> None:
    data = (folder / "model.pt").read_bytes()
    (folder / "model.pt").write_bytes(data[: len(data) // 2])


def _wrong_shape(folder: Path) -> None:
    state = study_state(0.1)
    state["W_dec"] = state["W_dec"][:, :, :-1]
    torch.save(state, folder / "model.pt")


def _no_config(folder: Path) -> None:
    (folder / "config.json").unlink()


def _masks_disagree_with_config(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "n_a": 5}))


def _one_mask_only(folder: Path) -> None:
    state = study_state(0.1)
    del state["dec_mask"]
    torch.save(state, folder / "model.pt")


def _plain_but_config_says_dfc(folder: Path) -> None:
    torch.save(study_state(None), folder / "model.pt")


def _masks_out_of_order(folder: Path) -> None:
    state = study_state(0.1)
    for name, dim in (("enc_mask", 1), ("dec_mask", 0)):
        state[name] = state[name].roll(3, dims=dim)
    torch.save(state, folder / "model.pt")


def _not_a_state_dict(folder: Path) -> None:
    torch.save([torch.zeros(3)], folder / "model.pt")


@pytest.mark.parametrize("breaker, message", [
    (_truncated, "model.pt: not a weights-only torch state dict"),
    (_wrong_shape, "tensor 'W_dec' has shape (40, 2, 7); config.json (activation_dim=8, dict_size=40) implies"),
    (_no_config, "not a seed-study checkpoint (no config.json)"),
    (_masks_disagree_with_config, "config.json has n_a=5 but the masks give n_a=4"),
    (_one_mask_only, "missing ['dec_mask']"),
    (_plain_but_config_says_dfc, "config.json has n_a=4 but model.pt has no masks"),
    (_masks_out_of_order, "the masks do not order features as A-exclusive, then B-exclusive"),
    (_not_a_state_dict, "expected a state dict of named tensors, got list"),
])
def test_bad_checkpoints_give_one_line(tmp_path, capsys, breaker, message):
    src = write_study(tmp_path / "study", study_state(0.1), n_a=4, n_b=4)
    breaker(src)
    code, _, err = run_cli(capsys, src, "--out", tmp_path / "ckpt")
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert message in err
    assert not (tmp_path / "ckpt").exists()


def test_bad_arguments_give_one_line(tmp_path, capsys):
    src = write_study(tmp_path / "study", study_state(0.1))
    code, _, err = run_cli(capsys, src, "--out", tmp_path / "ckpt", "--norm-from", tmp_path / "store")
    assert code == 2 and "--norm-from and --layer go together" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(capsys, src, "--out", tmp_path / "ckpt", "--norm-from", tmp_path / "nostore", "--layer", 3)
    assert code == 2 and len(err.strip().splitlines()) == 1 and not (tmp_path / "ckpt").exists()
    assert run_cli(capsys, src, "--out", tmp_path / "ckpt")[0] == 0
    code, _, err = run_cli(capsys, src, "--out", tmp_path / "ckpt")
    assert code == 2 and "already holds a checkpoint" in err


def test_s3_source_and_target(tmp_path, capsys, s3_bucket):
    import s3fs

    state = study_state(0.05)
    src = write_study(tmp_path / "study", state)
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    for name in ("config.json", "model.pt"):
        fs.put_file(str(src / name), f"{s3_bucket[5:]}/seed/ckpt-a/{name}")
    code, _, err = run_cli(capsys, f"{s3_bucket}/seed/ckpt-a", "--out", f"{s3_bucket}/imported")
    assert code == 0, err
    local = tmp_path / "downloaded"
    fs.get(f"{s3_bucket[5:]}/imported/", str(local), recursive=True)
    cc, x = DedicatedFeatureCrosscoder.load(local), acts()
    torch.testing.assert_close(cc.encode(x), StudyCrosscoder(state, K).encode(x), rtol=1e-5, atol=1e-5)
    assert read_import_record(f"{s3_bucket}/imported")["source"] == f"{s3_bucket}/seed/ckpt-a"

    code, _, err = run_cli(capsys, f"{s3_bucket}/no/such/prefix", "--out", tmp_path / "ckpt")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert f"{s3_bucket}/no/such/prefix: not a seed-study checkpoint (no config.json)" in err
    assert "dfc-ray-test-secret" not in err
