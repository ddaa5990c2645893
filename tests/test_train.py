"""The trainer: learning on planted features, groups, divergence, the folder reader and the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from dfc_ray.cli import main
from dfc_ray.crosscoder import DedicatedFeatureCrosscoder, DFCConfig
from dfc_ray.synthetic import PlantedConfig, PlantedFeatures
from dfc_ray.train import METRICS, Member, TrainConfig, folder_batches, scan_activation_folder, train, train_group

PLANTED = PlantedFeatures(PlantedConfig())
D = PLANTED.cfg.d_model


pytestmark = pytest.mark.usefixtures("one_thread")


def dfc(**overrides) -> DFCConfig:
    return DFCConfig(**(dict(d_model=D, dict_size=128, k=6, a_exclusive=0.1, b_exclusive=0.1) | overrides))


def test_learns_planted_features():
    cfg = dfc(l1_mode="partition", l1_shared=2e-2)
    untrained = DedicatedFeatureCrosscoder(cfg)
    result = train(cfg, TrainConfig(steps=600, lr=3e-3, warmup_steps=20, norm_rows=512, log_every=20),
                   PLANTED.batches(128))
    assert result.status == "ok" and result.steps == 600
    assert result.metrics["fvu_a"] < 0.2 and result.metrics["fvu_b"] < 0.2
    assert 5.5 < result.metrics["l0"] <= 6  # TopK: at most k, fewer only if pre-activations <= 0
    before, after = PLANTED.recovery(untrained), PLANTED.recovery(result.model)
    for part in ("a_only", "b_only", "shared"):
        assert after[part] > 0.75 and after[part] > before[part] + 0.2, (part, before, after)


def test_group_matches_separate_training_and_reports_every_step():
    members = [Member("topk", dfc(), TrainConfig(steps=15, lr=3e-3, warmup_steps=5, norm_rows=256)),
               Member("batchtopk", dfc(sparsity="batchtopk", k=4, a_exclusive=0.05),
                      TrainConfig(steps=10, lr=1e-3, weight_decay=0.1, seed=3, norm_rows=128))]
    seen = []
    group = train_group(members, PLANTED.batches(64), on_metrics=lambda name, step, m: seen.append((name, step, m)))
    assert [(n, s) for n, s, _ in seen if n == "batchtopk"] == [("batchtopk", s) for s in range(1, 11)]
    assert len([n for n, _, _ in seen if n == "topk"]) == 15
    assert set(METRICS) <= set(seen[0][2])
    for member, together in zip(members, group):
        alone = train_group([member], PLANTED.batches(64))[0]
        assert together.status == alone.status == "ok" and together.steps == alone.steps
        for (name, a), b in zip(together.model.state_dict().items(), alone.model.state_dict().values()):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)


def test_a_diverging_member_stops_alone(tmp_path):
    members = [Member("sane", dfc(), TrainConfig(steps=8, lr=1e-3, norm_rows=64)),
               Member("absurd", dfc(), TrainConfig(steps=8, lr=1e30, warmup_steps=0, grad_clip=0, norm_rows=64))]
    sane, absurd = train_group(members, PLANTED.batches(64), out_dir=tmp_path)
    assert sane.status == "ok" and sane.steps == 8 and all(math.isfinite(v) for v in sane.metrics.values())
    assert absurd.status == "diverged" and absurd.steps < 8
    assert f"at step {absurd.steps}" in absurd.reason
    record = json.loads((tmp_path / "absurd" / "train.json").read_text())
    assert record["status"] == "diverged" and not (tmp_path / "absurd" / "model.safetensors").exists()
    assert DedicatedFeatureCrosscoder.load(tmp_path / "sane").cfg == members[0].dfc


def test_a_short_stream_is_reported():
    batches = [PLANTED.sample(32, seed=i) for i in range(3)]
    result = train(dfc(), TrainConfig(steps=10, norm_rows=32), batches)
    assert result.status == "data_exhausted" and result.steps == 3 and "3 of 10" in result.reason
    with pytest.raises(ValueError, match=r"expected \(batch, 2, 32\)"):
        train(dfc(), TrainConfig(steps=2), [torch.zeros(8, 3, D)])


def test_lr_schedule():
    cfg = TrainConfig(steps=100, lr=1.0, warmup_steps=10, decay="linear", decay_frac=0.5)
    assert cfg.lr_at(0) == pytest.approx(0.1) and cfg.lr_at(9) == pytest.approx(1.0)
    assert cfg.lr_at(30) == pytest.approx(1.0) and cfg.lr_at(75) == pytest.approx(0.5)
    cosine = TrainConfig(steps=100, lr=1.0, warmup_steps=0, decay="cosine", decay_frac=1.0)
    assert cosine.lr_at(50) == pytest.approx(0.5) and cosine.lr_at(0) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="TrainConfig.decay='step'"):
        TrainConfig(decay="step")


def test_folder_reader_covers_every_row(tmp_path):
    files = PLANTED.write_folder(tmp_path, rows=250, rows_per_file=100, dtype=torch.bfloat16)
    found, d_model, rows = scan_activation_folder(tmp_path)
    assert found == files and d_model == D and rows == 250
    stream = folder_batches(found, batch_size=50, seed=0)
    epoch = torch.cat([next(stream) for _ in range(5)])
    assert epoch.shape == (250, 2, D) and epoch.dtype == torch.float32
    everything = torch.cat([PLANTED.sample(n, seed=1 * 1_000_003 + i).bfloat16().float()
                            for i, n in enumerate((100, 100, 50))])
    assert torch.equal(epoch.flatten(1).sort(0).values, everything.flatten(1).sort(0).values)


def test_cli_trains_on_a_folder(tmp_path, capsys):
    PLANTED.write_folder(tmp_path / "acts", rows=512, rows_per_file=200)
    rc = main(["train", str(tmp_path / "acts"), "--out", str(tmp_path / "out"), "--dict-size", "64", "--k", "4",
               "--steps", "12", "--batch-size", "64", "--lr", "1e-3", "--sparsity", "batchtopk", "--no-progress"])
    assert rc == 0
    record = json.loads((tmp_path / "out" / "crosscoder" / "train.json").read_text())
    assert record["status"] == "ok" and record["steps"] == 12
    cc = DedicatedFeatureCrosscoder.load(tmp_path / "out" / "crosscoder")
    assert cc.cfg.dict_size == 64 and cc.cfg.sparsity == "batchtopk" and len(cc.partition.a_exclusive) == 3
    assert "fvu_a" in capsys.readouterr().out


def test_cli_rejects_bad_input(tmp_path, capsys):
    bad = tmp_path / "bad"
    PLANTED.write_folder(bad, rows=64)
    save_file({"activations": torch.zeros(10, 3, D)}, str(bad / "part-99999.safetensors"))
    assert main(["train", str(bad), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "part-99999.safetensors" in err and "(10, 3, 32)" in err and "\n" not in err
    assert main(["train", str(tmp_path / "missing"), "--out", str(tmp_path / "out")]) == 2
    assert "no such activation folder" in capsys.readouterr().err
    assert main(["train", str(bad), "--example", "--out", str(tmp_path / "out")]) == 2
    assert "exactly one" in capsys.readouterr().err


def test_cli_trains_on_an_activation_store(tmp_path):
    """`dfc-ray train STORE --layer L` reads what `dfc-ray harvest` writes (the store format)."""
    from dfc_ray.store import ShardWriter, StoreSpec

    spec = StoreSpec(layer=2, d_model=D, models=("A=a", "B=b"), positions="last_prompt_token", harvest_hash="t",
                     shard_rows=200)
    with ShardWriter(str(tmp_path / "store"), spec) as writer:
        writer.append(next(PLANTED.batches(512, seed=3)))
    rc = main(["train", str(tmp_path / "store"), "--layer", "2", "--out", str(tmp_path / "out"), "--dict-size", "64",
               "--k", "4", "--steps", "12", "--batch-size", "64", "--lr", "1e-3", "--no-progress"])
    assert rc == 0
    record = json.loads((tmp_path / "out" / "crosscoder" / "train.json").read_text())
    assert record["status"] == "ok" and record["steps"] == 12
    assert main(["train", str(tmp_path / "store"), "--out", str(tmp_path / "out2")]) == 2  # --layer missing
