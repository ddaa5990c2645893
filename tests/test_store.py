"""The activation store on real files, a real S3 endpoint (moto) and a real local Ray cluster."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from dfc_ray.store import (
    NormStats, acts_column, acts_to_numpy, ShardWriter, StoreSpec, iter_layer_batches, iter_ray_batches, iter_shards,
    layer_dataset, load_norm_stats, read_corpus, read_manifest, to_float, validate_store, write_corpus,
)

D = 8
MODELS = ("model-a", "model-b")
REPO = Path(__file__).resolve().parents[1]


def spec(**overrides) -> StoreSpec:
    base = dict(layer=3, d_model=D, models=MODELS, positions="last_prompt_token", harvest_hash="h1", shard_rows=64)
    return StoreSpec(**{**base, **overrides})


def rows(n: int, seed: int = 0, d: int = D) -> np.ndarray:
    """Distinct float32 rows (a row index is folded in, so rows never collide as a multiset)."""
    x = np.random.default_rng(seed).normal(size=(n, 2, d)).astype(np.float32)
    x[:, 0, 0] = np.arange(n)
    return x


def write(uri: str, x: np.ndarray, block: int = 37, **overrides) -> None:
    with ShardWriter(uri, spec(**overrides)) as w:
        for i in range(0, len(x), block):
            w.append(x[i:i + block])


def stored(x: np.ndarray, dtype: str) -> np.ndarray:
    """What reading back must give: the rows rounded to the stored dtype, as float32."""
    t = torch.from_numpy(x).to({"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[dtype])
    return t.float().numpy()


def read_all(uri: str, layer: int = 3, **kw) -> np.ndarray:
    return torch.cat(list(iter_layer_batches(uri, layer, 50, **kw))).numpy()


def as_multiset(x: np.ndarray) -> Counter:
    return Counter(r.tobytes() for r in x.reshape(len(x), -1))


@pytest.mark.parametrize("fmt,dtype,uri_style,source", [
    ("parquet", "float16", "plain", "numpy"),
    ("parquet", "bfloat16", "file", "torch"),
    ("parquet", "float32", "plain", "torch"),
    ("safetensors", "bfloat16", "plain", "numpy"),
    ("safetensors", "float16", "file", "torch"),
])
def test_local_write_validate_read_exact(tmp_path, fmt, dtype, uri_style, source):
    uri = str(tmp_path / "store") if uri_style == "plain" else (tmp_path / "store").as_uri()
    x = rows(300)
    with ShardWriter(uri, spec(format=fmt, dtype=dtype)) as w:
        for i in range(0, 300, 41):
            w.append(torch.from_numpy(x[i:i + 41]) if source == "torch" else x[i:i + 41])
    manifest = validate_store(uri, 3, d_model=D, models=MODELS, checksum=True)
    assert [s["rows"] for s in manifest.shards] == [64, 64, 64, 64, 44]
    assert manifest.total_rows == 300 and manifest.complete
    got = read_all(uri)
    assert got.dtype == np.float32 and got.shape == (300, 2, D)
    np.testing.assert_array_equal(got, stored(x, dtype))  # bit-equal, in order
    shuffled = read_all(uri, shuffle=True, seed=1)
    assert as_multiset(shuffled) == as_multiset(got) and not np.array_equal(shuffled, got)


def test_manifest_fields(tmp_path):
    write(str(tmp_path), rows(100))
    raw = json.loads((tmp_path / "layer_003" / "manifest.json").read_text())
    assert raw["format_version"] == 1 and raw["d_model"] == D and raw["layer"] == 3
    assert raw["models"] == list(MODELS) and raw["positions"] == "last_prompt_token" and raw["harvest_hash"] == "h1"
    assert raw["dtype"] == "float16" and raw["format"] == "parquet" and raw["total_rows"] == 100
    assert [sorted(s) for s in raw["shards"]] == [["bytes", "crc32", "file", "rows"]] * 2
    assert (tmp_path / "layer_003" / raw["norm_stats"]["file"]).is_file()
    # Superseded statistics sidecars are removed: only the one the manifest names is left.
    assert sorted(p.name for p in (tmp_path / "layer_003").glob("norm-*")) == [raw["norm_stats"]["file"]]


def test_streaming_norm_stats_equal_batch_numpy(tmp_path):
    # Large offset, small spread: the naive E[x²] − E[x]² formula would lose most digits here.
    x = rows(5000, d=16) * 0.01 + 50.0
    write(str(tmp_path), x, block=999, d_model=16, dtype="float32", shard_rows=1500)
    back = read_all(str(tmp_path)).astype(np.float64)
    stats = load_norm_stats(str(tmp_path), 3)
    mean = back.mean(axis=0)
    assert stats.count == 5000
    np.testing.assert_allclose(stats.mean, mean, rtol=1e-12)
    np.testing.assert_allclose(stats.sq_dev_sum, ((back - mean) ** 2).sum(axis=(0, 2)), rtol=1e-9)
    normalized = (back - mean) * stats.scale[None, :, None]
    np.testing.assert_allclose((normalized**2).sum(axis=2).mean(axis=0), [16, 16], rtol=1e-9)


def test_norm_stats_merge_is_split_independent():
    x = rows(1000).astype(np.float64)
    whole = NormStats.of_rows(x)
    parts = NormStats.empty(D)
    for a, b in [(0, 1), (1, 333), (333, 334), (334, 1000)]:
        parts = parts.merge(NormStats.of_rows(x[a:b]))
    np.testing.assert_allclose(parts.mean, whole.mean, rtol=1e-12)
    np.testing.assert_allclose(parts.sq_dev_sum, whole.sq_dev_sum, rtol=1e-12)
    assert NormStats.from_bytes(parts.to_bytes()).count == 1000


def test_s3_roundtrip_without_leaking_credentials(s3_bucket, caplog):
    import boto3

    caplog.set_level(logging.DEBUG)
    uri = f"{s3_bucket}/harvest-1"
    x = rows(200)
    write(uri, x, format="parquet", dtype="bfloat16")
    write(uri, rows(70, seed=5), layer=7, format="safetensors")
    validate_store(uri, 3, d_model=D, models=MODELS, checksum=True)
    np.testing.assert_array_equal(read_all(uri), stored(x, "bfloat16"))
    np.testing.assert_array_equal(read_all(uri, 7), stored(rows(70, seed=5), "float16"))

    s3 = boto3.client("s3")
    bucket = s3_bucket.removeprefix("s3://")
    manifest_text = s3.get_object(Bucket=bucket, Key="harvest-1/layer_003/manifest.json")["Body"].read().decode()
    s3.delete_object(Bucket=bucket, Key="harvest-1/layer_003/shard-00001.parquet")
    with pytest.raises(ValueError, match=r"harvest-1/layer_003/shard-00001.parquet: missing") as missing:
        validate_store(uri, 3)
    key, secret = os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"]
    with pytest.raises(FileNotFoundError) as embedded:
        read_manifest(f"s3://{key}:{secret}@{bucket}/nothing-here", 3)
    for text in (manifest_text, str(missing.value), str(embedded.value)):
        assert key not in text and secret not in text
    assert secret not in caplog.text  # at any level; botocore's own DEBUG lines carry the key id
    assert not [r for r in caplog.records if r.levelno >= logging.INFO and key in r.getMessage()]


def test_ray_dataset_gives_every_row_once_per_epoch(ray_cluster, tmp_path):
    x = rows(640)
    write(str(tmp_path), x, shard_rows=64)
    batches = list(iter_ray_batches(str(tmp_path), 3, 64, epochs=2, seed=0, local_shuffle_buffer_size=200,
                                    d_model=D, models=MODELS))
    assert len(batches) == 20 and all(b.dtype == torch.float32 and b.shape == (64, 2, D) for b in batches)
    epochs = [torch.cat(batches[:10]).numpy(), torch.cat(batches[10:]).numpy()]
    want = as_multiset(stored(x, "float16"))
    assert as_multiset(epochs[0]) == want and as_multiset(epochs[1]) == want
    assert not np.array_equal(epochs[0], epochs[1])  # files and rows reshuffled each epoch


def test_ray_reads_safetensors_from_s3(ray_cluster, s3_bucket):
    uri = f"{s3_bucket}/h"
    x = rows(150)
    write(uri, x, format="safetensors", dtype="bfloat16")
    assert layer_dataset(uri, 3).schema().names == ["acts"]
    got = torch.cat(list(iter_ray_batches(uri, 3, 64, shuffle=False, drop_last=True))).numpy()
    assert got.shape == (128, 2, D)
    assert as_multiset(got) <= as_multiset(stored(x, "bfloat16"))


CRASHING_WRITER = textwrap.dedent("""
    import os, signal, sys
    import numpy as np
    sys.path.insert(0, sys.argv[2])
    from tests.test_store import rows, spec
    from dfc_ray.store import ShardWriter
    w = ShardWriter(sys.argv[1], spec())
    x = rows(500)
    for i in range(0, 230, 10):  # 3 shards recorded, 38 rows pending in memory
        w.append(x[i:i + 10])
    os.kill(os.getpid(), signal.SIGKILL)
""")


def test_resume_after_sigkill_equals_uninterrupted_run(tmp_path):
    crashed, clean = str(tmp_path / "crashed"), str(tmp_path / "clean")
    proc = subprocess.run([sys.executable, "-c", CRASHING_WRITER, crashed, str(REPO)], capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    layer = Path(crashed) / "layer_003"
    assert read_manifest(crashed, 3).total_rows == 192
    with pytest.raises(ValueError, match="incomplete store"):
        validate_store(crashed, 3)
    # What a kill in the middle of a shard write leaves: an unrecorded shard and a temp file.
    (layer / "shard-00003.parquet").write_bytes(b"half a shard")
    (layer / ".shard-00004.parquet.tmp-dead").write_bytes(b"junk")
    with pytest.raises(ValueError, match="incomplete store"):
        next(iter_layer_batches(crashed, 3, 10))

    x = rows(500)
    writer = ShardWriter(crashed, spec())
    assert writer.rows_done == 192
    writer.skip(100)  # a harvester may skip recomputing recorded rows...
    for i in range(100, 500, 50):  # ...and replay the rest: recorded ones are dropped
        writer.append(x[i:i + 50])
    writer.close()
    write(clean, x)
    assert read_manifest(crashed, 3).to_json() == read_manifest(clean, 3).to_json()  # same bytes (crc32s)
    np.testing.assert_array_equal(read_all(crashed), stored(x, "float16"))

    # Replaying a complete store is a no-op; different settings are refused by name.
    before = (layer / "manifest.json").read_text()
    write(crashed, x)
    assert (layer / "manifest.json").read_text() == before
    with pytest.raises(ValueError, match="harvest_hash is 'h1' but the writer was given 'h2'"):
        ShardWriter(crashed, spec(harvest_hash="h2"))
    with pytest.raises(ValueError, match="more rows were appended"):
        write(crashed, rows(501))


def test_dropped_writer_resumes_in_process(tmp_path):
    x = rows(400)
    w = ShardWriter(str(tmp_path), spec())
    w.append(x[:150])
    del w  # no close: two shards recorded, 22 rows lost with the writer
    assert read_manifest(str(tmp_path), 3).total_rows == 128
    short = ShardWriter(str(tmp_path), spec())
    short.append(x[:100])
    with pytest.raises(ValueError, match="already holds 128 rows but only 100 were appended"):
        short.close()
    write(str(tmp_path), x, block=64)
    np.testing.assert_array_equal(read_all(str(tmp_path)), stored(x, "float16"))


def test_provenance_rides_beside_unchanged_shards_and_survives_a_resume(tmp_path):
    """Each row's [record, position] goes to a sidecar per shard; the shard files are byte for byte those of a
    store without provenance; a writer dropped mid-shard and replayed keeps rows and provenance aligned."""
    x, prov = rows(160), np.stack([np.arange(160) // 3, np.arange(160) % 3 + 5], axis=1)
    plain, traced = str(tmp_path / "plain"), str(tmp_path / "traced")
    write(plain, x)
    dropped = ShardWriter(traced, spec())
    dropped.append(x[:100], prov[:100])
    del dropped  # one shard recorded, 36 rows lost with the writer
    with ShardWriter(traced, spec()) as w:
        for i in range(0, 160, 37):
            w.append(x[i:i + 37], prov[i:i + 37])
    manifest = read_manifest(traced, 3)
    assert manifest.has_provenance and not read_manifest(plain, 3).has_provenance
    for shard in manifest.shards:
        assert (tmp_path / "traced/layer_003" / shard["file"]).read_bytes() == \
            (tmp_path / "plain/layer_003" / shard["file"]).read_bytes()
    got = list(iter_shards(traced, 3))
    np.testing.assert_array_equal(np.concatenate([p for _, p in got]), prov)
    np.testing.assert_array_equal(torch.cat([r for r, _ in got]).numpy(), stored(x, "float16"))
    assert {p is None for _, p in iter_shards(plain, 3)} == {True}
    with ShardWriter(str(tmp_path / "mixed"), spec()) as w:  # one block without: its shard records none
        w.append(x[:64], prov[:64])
        w.append(x[64:100])
    assert [("provenance" in s) for s in read_manifest(str(tmp_path / "mixed"), 3).shards] == [True, False]
    write_corpus(traced, [[5, 6, 7], [], [9]])
    assert [c.tolist() for c in read_corpus(traced)] == [[5, 6, 7], [], [9]] and read_corpus(plain) is None


@pytest.fixture
def three_shards(tmp_path):
    uri = str(tmp_path / "s")
    write(uri, rows(160))  # shards of 64, 64, 32 rows
    return uri, tmp_path / "s" / "layer_003"


def test_truncated_shard_is_named(three_shards):
    uri, layer = three_shards
    shard = layer / "shard-00001.parquet"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"layer_003/shard-00001.parquet: \d+ bytes on storage .*truncated"):
        validate_store(uri, 3)
    with pytest.raises(ValueError, match="shard-00001.parquet"):
        next(iter_layer_batches(uri, 3, 10))


def test_missing_shard_is_named(three_shards):
    uri, layer = three_shards
    (layer / "shard-00002.parquet").unlink()
    with pytest.raises(ValueError, match=r"layer_003/shard-00002.parquet: missing"):
        validate_store(uri, 3)


def test_corrupt_shard_caught_by_checksum(three_shards):
    uri, layer = three_shards
    shard = layer / "shard-00000.parquet"
    data = bytearray(shard.read_bytes())
    data[200] ^= 0xFF  # inside the data page: same size, footer intact
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"shard-00000.parquet: corrupt shard \(crc32"):
        validate_store(uri, 3, checksum=True)


def test_unreadable_shard_of_right_size_is_named(three_shards):
    uri, layer = three_shards
    shard = layer / "shard-00002.parquet"
    shard.write_bytes(b"\0" * shard.stat().st_size)
    with pytest.raises(ValueError, match="shard-00002.parquet: corrupt shard"):
        validate_store(uri, 3)


def test_config_mismatches_are_named(three_shards):
    uri, layer = three_shards
    with pytest.raises(ValueError, match="d_model is 8 but the crosscoder expects 16"):
        validate_store(uri, 3, d_model=16)
    with pytest.raises(ValueError, match="models is"):
        validate_store(uri, 3, models=("model-b", "model-a"))
    with pytest.raises(FileNotFoundError, match="layer_004/manifest.json"):
        validate_store(uri, 4)
    shutil.copytree(layer, layer.parent / "layer_004")  # a layer folder holding another layer's data
    with pytest.raises(ValueError, match="layer_004/manifest.json: layer is 3 but the crosscoder expects 4"):
        validate_store(uri, 4)
    with pytest.raises(ValueError, match=r"block shape \(5, 2, 7\), expected \(n, 2, 8\)"):
        ShardWriter(uri + "-new", spec()).append(np.zeros((5, 2, 7)))
    with pytest.raises(ValueError, match="StoreSpec.dtype='int8'"):
        spec(dtype="int8")


def test_unrecorded_shard_is_never_read(three_shards):
    uri, layer = three_shards
    shutil.copy(layer / "shard-00000.parquet", layer / "shard-00003.parquet")  # a crashed writer's leftover
    validate_store(uri, 3, checksum=True)
    np.testing.assert_array_equal(read_all(uri), stored(rows(160), "float16"))


def test_to_float_widens_bf16_bits_exactly():
    x = torch.randn(50, 2, D).to(torch.bfloat16)
    bits = x.view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(to_float(bits, "bfloat16"), x.float().numpy())


def test_acts_column_views_sliced_chunks():
    x = rows(10).astype(np.float16)
    col = acts_column(x)
    assert col.type.byte_width == 2 * D * 2 and col.null_count == 0
    chunked = pa.chunked_array([col.slice(2, 3), col.slice(7, 0), col.slice(7, 2)])
    np.testing.assert_array_equal(acts_to_numpy(chunked, D, "float16"), x[[2, 3, 4, 7, 8]])
    assert acts_to_numpy(col.slice(0, 0), D, "float16").shape == (0, 2, D)
