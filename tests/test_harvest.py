"""Harvesting paired activations: layer semantics, positions under left padding, resume, cache, S3 + Ray."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from dfc_ray import store
from dfc_ray.harvest import (
    MIX_LAST_PROMPT_REPEATS, PARTS_MAX, CorpusSpec, HarvestConfig, PairActivations, Record, build_corpus, harvest,
    left_pad, plan_parts, residual_after_blocks, select_positions)
from dfc_ray.pair import PairSpec, load_tokenizer

REPO = Path(__file__).resolve().parents[1]


def small_config(pair: PairSpec, root: Path, **overrides) -> HarvestConfig:
    corpus = CorpusSpec(tasks="organism:dev", n_tasks=24, plain_text="organism", n_plain=24, max_tokens=256)
    return replace(HarvestConfig(store=str(root), layers=(0, 1), pair=pair, corpus=corpus, batch_size=8,
                                 shard_rows=16, dtype="float32"), **overrides)


def test_layer_is_the_output_of_block_l(tiny_pair):
    """'Layer L' = output of model.layers[L] = hidden_states[L + 1], also under left padding."""
    extractor = PairActivations(small_config(tiny_pair, Path("/unused")))
    records = [Record(list(range(5, 17))), Record(list(range(7, 12)))]
    ids, mask = left_pad(records, extractor.tokenizer.pad_token_id)
    captured = residual_after_blocks(extractor.model_a, ids, mask, [0, 1])
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        reference = extractor.model_a(input_ids=ids, attention_mask=mask, position_ids=position_ids,
                                      output_hidden_states=True).hidden_states
    real = mask.bool()
    for layer in (0, 1):  # (transformers applies the final norm to the LAST entry of hidden_states)
        torch.testing.assert_close(captured[layer][real], reference[layer + 1][real])
    assert not torch.equal(captured[0][real], captured[1][real])


def test_last_prompt_token_is_right_under_left_padding(tiny_pair):
    """Prompts of different lengths in one batch give the same rows as each prompt alone."""
    extractor = PairActivations(small_config(tiny_pair, Path("/unused")))
    records = [Record(list(range(3, 3 + n))) for n in (4, 19, 9, 13)]
    batched = extractor.rows(records)
    for i, record in enumerate(records):
        alone = extractor.rows([record])
        for layer in (0, 1):
            np.testing.assert_allclose(batched[layer][i], alone[layer][0], rtol=1e-4, atol=1e-5)
    # and it really is the LAST prompt token: a different final token changes the row
    changed = extractor.rows([Record(records[0].prompt_ids[:-1] + [99])])
    assert not np.allclose(changed[1][0], batched[1][0])


def test_positions_selection():
    records = [Record([1, 2, 3], [7, 8]), Record([4, 5, 6, 9, 9, 9])]
    width = 6  # record 0 is left-padded by one column
    rows, cols = select_positions(records, width, "last_prompt_token")
    assert rows.tolist() == [0, 1] and cols.tolist() == [3, 5]
    rows, cols = select_positions(records, width, "prompt_and_response")
    assert rows.tolist() == [0, 0, 0, 1] and cols.tolist() == [3, 4, 5, 5]
    norms = torch.ones(2, 2, width)
    norms[1, 1, 0] = 500.0  # an attention sink at record 1's first token, in model B only
    rows, cols = select_positions(records, width, "all_tokens", norms, sink_factor=10.0)
    assert list(zip(rows.tolist(), cols.tolist())) == [(0, 1), (0, 2), (0, 3), (0, 4), (0, 5),
                                                       (1, 1), (1, 2), (1, 3), (1, 4), (1, 5)]
    rows, cols = select_positions(records, width, "prompt", norms, sink_factor=10.0)  # no response tokens
    assert list(zip(rows.tolist(), cols.tolist())) == [(0, 1), (0, 2), (0, 3), (1, 1), (1, 2), (1, 3), (1, 4), (1, 5)]
    rows, cols = select_positions(records, width, "mix_last_prompt", norms, sink_factor=10.0)
    pairs = list(zip(rows.tolist(), cols.tolist()))
    assert pairs[:5] == [(0, 1), (0, 2), (0, 3), (0, 4), (0, 5)]  # all tokens first, then the repeats
    assert pairs.count((0, 3)) == 1 + MIX_LAST_PROMPT_REPEATS and pairs.count((1, 5)) == 1 + MIX_LAST_PROMPT_REPEATS
    assert len(pairs) == 10 + 2 * MIX_LAST_PROMPT_REPEATS
    rows, cols = select_positions(records, width, "text_end")  # the seed study's: each record's last token
    assert rows.tolist() == [0, 1] and cols.tolist() == [5, 5]  # record 0's reply end, not its prompt end (3)


def _per_record_positions(records, width, positions, norms, sink_factor):
    """The selection written record by record (what `select_positions` computes as batch masks)."""
    rows, cols = [], []
    for i, record in enumerate(records):
        start = width - len(record.prompt_ids) - len(record.response_ids)
        last_prompt = width - 1 - len(record.response_ids)
        span = norms[:, i, start:last_prompt + 1 if positions == "prompt" else width]
        keep = (span <= sink_factor * span.median(dim=1, keepdim=True).values).all(0)
        own = [start + j for j in torch.nonzero(keep).flatten().tolist()]
        own += [last_prompt] * MIX_LAST_PROMPT_REPEATS if positions == "mix_last_prompt" else []
        rows, cols = rows + [i] * len(own), cols + own
    return rows, cols


def test_sink_filtered_positions_equal_the_per_record_rule():
    """Random batches (even and odd spans: the median is the lower middle value either way, as torch's)."""
    gen = torch.Generator().manual_seed(0)
    for _ in range(60):
        lengths = torch.randint(1, 12, (int(torch.randint(1, 6, (1,), generator=gen)), 2), generator=gen)
        records = [Record(list(range(p)), list(range(r % 4))) for p, r in lengths.tolist()]
        width = max(len(r.prompt_ids) + len(r.response_ids) for r in records) + 2
        norms = torch.rand(2, len(records), width, generator=gen) * 3
        norms[torch.rand(norms.shape, generator=gen) < 0.15] *= 40  # sinks, in one model or both
        for positions in ("all_tokens", "prompt", "mix_last_prompt"):
            rows, cols = select_positions(records, width, positions, norms, sink_factor=5.0)
            assert (rows.tolist(), cols.tolist()) == _per_record_positions(records, width, positions, norms, 5.0)


def test_parts_cover_the_groups_in_order_with_balanced_tokens():
    records = [Record([1] * 380) for _ in range(200)] + [Record([1] * 40) for _ in range(500)]  # tool, then plain
    parts = plan_parts(records, 32, 1024)
    assert parts[0][0] == 0 and parts[-1][1] == 22 and all(a < b == c for (a, b), (c, _) in zip(parts, parts[1:]))
    tokens = [sum(len(r.prompt_ids) for r in records[32 * a:32 * b]) for a, b in parts]
    assert len(parts) == 11 and max(tokens) < 2.5 * sum(tokens) / len(parts)  # a group is the smallest unit
    assert len(plan_parts(records * 40, 32, 64)) == PARTS_MAX
    assert plan_parts(records, 32, 16384) == [(0, 22)]  # under 8 shards' worth: one part, one writer's layout


def test_forward_stops_after_the_last_harvested_block_of_a_36_block_model():
    """A Qwen2.5-3B-deep model (36 blocks, tiny width) harvested at block 13 runs blocks 0..13 once each and
    nothing after them: not the later blocks, not the final norm, not the lm_head."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(hidden_size=16, num_hidden_layers=36, num_attention_heads=2,
                                         num_key_value_heads=1, intermediate_size=32, vocab_size=64)).eval()
    calls = []
    modules = [*model.model.layers, model.model.norm, model.lm_head]
    handles = [m.register_forward_pre_hook(lambda mod, args, i=i: calls.append(i)) for i, m in enumerate(modules)]
    try:
        ids, mask = left_pad([Record([5, 6, 7, 8]), Record([9, 10])], 0)
        acts = residual_after_blocks(model, ids, mask, [13, 2])
    finally:
        for handle in handles:
            handle.remove()
    assert calls == list(range(14)) and sorted(acts) == [2, 13] and acts[13].shape == (2, 4, 16)


def test_harvest_writes_a_valid_store_and_is_reused(tiny_pair, tmp_path):
    cfg = small_config(tiny_pair, tmp_path)
    result = harvest(cfg, use_ray=False, progress=False)
    assert not result.reused and result.rows == 48  # one row per record at the last prompt token
    for layer in cfg.layers:
        manifest = store.validate_store(result.uri, layer, d_model=32)
        assert manifest.spec.positions == "last_prompt_token"
    again = harvest(cfg, use_ray=False, progress=False)
    assert again.reused and again.uri == result.uri
    other = harvest(replace(cfg, positions="all_tokens"), use_ray=False, progress=False)
    assert other.uri != result.uri and other.rows > 10 * result.rows
    corpus = store.read_corpus(result.uri)
    provenance = np.concatenate([p for _, p in store.iter_shards(result.uri, 1)])
    assert provenance[:, 0].tolist() == list(range(48))  # one row per record, at its last prompt token
    assert provenance[:, 1].tolist() == [len(ids) - 1 for ids in corpus]


def test_every_row_names_its_record_and_token(tiny_pair, tmp_path):
    """Provenance under all_tokens: a row equals its record's activation, run alone, at the recorded position."""
    cfg = small_config(tiny_pair, tmp_path, positions="all_tokens", layers=(1,))
    result = harvest(cfg, use_ray=False, progress=False)
    corpus = store.read_corpus(result.uri)
    x, provenance = (np.concatenate(parts) for parts in zip(*((r.numpy(), p) for r, p in
                                                              store.iter_shards(result.uri, 1))))
    assert store.read_manifest(result.uri, 1).has_provenance and len(corpus) == 48
    extractor = PairActivations(cfg)
    for i in np.random.default_rng(0).choice(len(x), 5, replace=False):
        record, position = provenance[i]
        ids = torch.tensor([corpus[record].tolist()])
        alone = residual_after_blocks(extractor.model_b, ids, torch.ones_like(ids), [1])[1][0, position]
        np.testing.assert_allclose(x[i, 1], alone.numpy(), rtol=1e-4, atol=1e-5)


def test_prompt_and_response_appends_a_reply(tiny_pair, tmp_path):
    corpus = CorpusSpec(tasks="organism:dev", n_tasks=8, plain_text="", with_responses=True, max_new_tokens=4)
    cfg = small_config(tiny_pair, tmp_path, corpus=corpus, positions="prompt_and_response", layers=(1,))
    result = harvest(cfg, use_ray=False, progress=False)
    assert 8 < result.rows <= 8 * 5  # the last prompt token + up to 4 reply tokens per prompt


def _all_rows(uri: str, layer: int) -> np.ndarray:
    return torch.cat(list(store.iter_layer_batches(uri, layer, 1000))).numpy()


def _zero_middle(shard: Path) -> None:
    """Bytes zeroed in the middle of a shard, its size unchanged (footer and row count still read fine)."""
    data = bytearray(shard.read_bytes())
    middle = len(data) // 2
    data[middle - 200:middle + 200] = bytes(400)
    shard.write_bytes(bytes(data))


def _truncate(shard: Path) -> None:
    shard.write_bytes(shard.read_bytes()[:-300])


@pytest.mark.parametrize("damage", [_zero_middle, _truncate], ids=["zeroed", "truncated"])
def test_damaged_shard_is_refused_by_readers_and_reharvested(tiny_pair, tmp_path, damage):
    """A damaged shard of a reused store: a reader refuses it in one line naming the shard; the
    harvest (the store's owner) re-harvests from that shard on, to exactly the clean rows."""
    cfg = small_config(tiny_pair, tmp_path)
    result = harvest(cfg, use_ray=False, progress=False)
    clean = {layer: _all_rows(result.uri, layer) for layer in cfg.layers}
    name = store.read_manifest(result.uri, 1).shards[3]["file"]  # one part's shard, not the first part's
    assert name.startswith("part-") and not name.startswith("part-00000")
    damage(Path(result.uri) / "layer_001" / name)
    store._VERIFIED.clear()  # a new process: nothing checked yet
    with pytest.raises(store.BadShard, match=rf"^\S*layer_001/{name}: [^\n]*(crc32|truncated)[^\n]*$"):
        next(store.iter_layer_batches(result.uri, 1, 10))
    again = harvest(cfg, use_ray=False, progress=False)
    assert not again.reused and again.uri == result.uri and again.rows == result.rows
    for layer in cfg.layers:
        np.testing.assert_array_equal(_all_rows(again.uri, layer), clean[layer])
    assert harvest(cfg, use_ray=False, progress=False).reused


def test_killed_harvest_resumes_to_exactly_the_uninterrupted_rows(tiny_pair, tmp_path):
    killed_root, clean_root = tmp_path / "killed", tmp_path / "clean"
    cfg = small_config(tiny_pair, killed_root, batch_size=2, shard_rows=5, positions="all_tokens")
    script = (
        "import json, sys; from dfc_ray.harvest import *; from dfc_ray.pair import PairSpec\n"
        f"pair = PairSpec(**json.loads({json.dumps(json.dumps(tiny_pair.__dict__))}))\n"
        f"cfg = HarvestConfig(store={str(killed_root)!r}, layers=(0, 1), pair=pair, batch_size=2, shard_rows=5,\n"
        "    dtype='float32', positions='all_tokens', corpus=CorpusSpec(tasks='organism:dev', n_tasks=24,\n"
        "    plain_text='organism', n_plain=24, max_tokens=256))\n"
        "harvest(cfg, use_ray=False, progress=False)\n")
    assert cfg == HarvestConfig(store=str(killed_root), layers=(0, 1), pair=tiny_pair, batch_size=2, shard_rows=5,
                                dtype="float32", positions="all_tokens", corpus=cfg.corpus)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            parts = [json.loads(p.read_text()) for p in killed_root.glob("*/parts/part-*.json")]
            if sum(len(p["group_rows"]) for p in parts) >= 6:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the harvest finished before it could be killed; make it longer"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    (uri,) = [str(p.parent) for p in killed_root.glob("*/harvest.json")]
    with pytest.raises(ValueError, match="incomplete store"):
        store.validate_store(uri, 1)
    resumed = harvest(cfg, use_ray=False, progress=False)
    clean = harvest(replace(cfg, store=str(clean_root)), use_ray=False, progress=False)
    assert resumed.rows == clean.rows
    for layer in cfg.layers:
        np.testing.assert_array_equal(_all_rows(resumed.uri, layer), _all_rows(clean.uri, layer))


def test_harvest_to_s3_through_ray_then_train_a_step(tiny_pair, s3_bucket, ray_cluster, tmp_path, capfd):
    from dfc_ray.crosscoder import DedicatedFeatureCrosscoder, DFCConfig

    cfg = small_config(tiny_pair, tmp_path, store=f"{s3_bucket}/harvests", dtype="float16", num_actors=2)
    result = harvest(cfg, use_ray=True, progress=False)  # two actors, each writing its own parts' shards to S3
    said = capfd.readouterr().err  # Ray Data's notices about how we call it are not the user's business (issue 28)
    assert "``concurrency`` is deprecated" not in said and "Progress bars disabled" not in said, said
    local = harvest(replace(cfg, store=str(tmp_path / "local"), executor="local"), use_ray=False, progress=False)
    assert result.uri.startswith(s3_bucket) and result.rows == local.rows == 48
    assert result.uri.rsplit("/", 1)[1] == local.uri.rsplit("/", 1)[1]  # who computes is not in the content hash
    for layer in cfg.layers:  # the same layout and bytes, whoever computed which part (each at cpu_threads)
        shards = store.read_manifest(result.uri, layer).shards
        assert shards == store.read_manifest(local.uri, layer).shards and len({s["part"] for s in shards}) > 1
        np.testing.assert_array_equal(_all_rows(result.uri, layer), _all_rows(local.uri, layer))
    batches = list(store.iter_ray_batches(result.uri, 1, batch_size=16, shuffle=False, d_model=32))
    assert torch.cat(batches).shape == (48, 2, 32)

    cc = DedicatedFeatureCrosscoder(DFCConfig(d_model=32, dict_size=64, k=4, a_exclusive=0.1, b_exclusive=0.1))
    optimizer = torch.optim.Adam(cc.parameters(), lr=1e-3)
    loss = cc.loss(batches[0])["loss"]
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)


def test_harvest_bytes_do_not_depend_on_the_callers_thread_count(tiny_pair, tmp_path, monkeypatch):
    """Rows are computed at `cpu_threads`, whatever the caller (driver or Ray actor) runs with and however many
    threads of the driver compute groups at once: on the test pair, float32 rows at 1 and 3 threads differ in
    their last bits without it (docs/store.md)."""
    cfg = small_config(tiny_pair, tmp_path, shard_rows=1024)  # one part of six groups: the threads share it
    assert len(plan_parts(build_corpus(cfg.corpus, load_tokenizer(tiny_pair)), cfg.batch_size, cfg.shard_rows)) == 1
    before = torch.get_num_threads()
    crcs = []
    try:
        for threads in (3, 1):
            torch.set_num_threads(threads)
            result = harvest(replace(cfg, store=str(tmp_path / f"t{threads}")), use_ray=False, progress=False)
            assert torch.get_num_threads() == threads  # the caller's count is restored
            crcs.append([[s["crc32"] for s in store.read_manifest(result.uri, layer).shards] for layer in cfg.layers])
        # three threads of the driver (its own count 3) computing groups at once: the first three start together
        start, computing = threading.Barrier(3, timeout=60), []
        rows_of = PairActivations.rows_and_provenance

        def together(self, records):
            computing.append(threading.current_thread().name)
            if len(computing) <= 3:
                start.wait()
            return rows_of(self, records)

        monkeypatch.setattr(PairActivations, "rows_and_provenance", together)
        torch.set_num_threads(3)
        threads = harvest(replace(cfg, store=str(tmp_path / "threads"), num_actors=3), use_ray=False, progress=False)
        assert torch.get_num_threads() == 3 and len(set(computing)) == 3
        crcs.append([[s["crc32"] for s in store.read_manifest(threads.uri, layer).shards] for layer in cfg.layers])
    finally:
        torch.set_num_threads(before)
    assert crcs[0] == crcs[1] == crcs[2]
    progress = json.loads((Path(result.uri) / "harvest.json").read_text())
    assert progress["config"]["cpu_threads"] == 1 and progress["torch"] == torch.__version__


def test_a_local_harvest_refuses_more_copies_of_the_pair_than_memory_holds(tiny_pair, tmp_path):
    """`num_actors` threads each hold a copy of the pair: copies that cannot fit are refused in one line before
    any group is computed, and a re-run with fewer threads harvests the same store."""
    cfg = small_config(tiny_pair, tmp_path)
    with pytest.raises(ValueError, match=r"harvest.num_actors=1000000000 with harvest.executor 'local': 999999999 "
                                         r"more copies of the pair need .* free; expected fewer threads"):
        harvest(replace(cfg, num_actors=10**9), use_ray=False, progress=False)
    assert not list(tmp_path.glob("*/layer_*/*rows*"))  # no rows computed
    done = harvest(replace(cfg, num_actors=2), use_ray=False, progress=False)
    assert done.rows == 48 and not done.reused and list(tmp_path.glob("*/layer_*/*rows*"))


def test_compare_layers_accepts_rounding_and_catches_real_divergence(tiny_pair, tmp_path):
    """Across hardware the promise is the layout plus values within the store dtype's rounding and the
    float32 drift (store.compare_layers); other rows, another order or a dropped part are refused."""
    cfg = small_config(tiny_pair, tmp_path, dtype="float16")
    one = harvest(cfg, use_ray=False, progress=False)
    three = harvest(replace(cfg, cpu_threads=3), use_ray=False, progress=False)  # other kernels' sums
    assert one.uri != three.uri  # the thread count is part of the content hash
    for layer in cfg.layers:
        same = store.compare_layers(one.uri, three.uri, layer)
        assert same.rows == 48 and 0 <= same.worst <= 1
        assert store.compare_layers(one.uri, one.uri, layer).identical
    reordered = harvest(replace(cfg, corpus=replace(cfg.corpus, seed=cfg.corpus.seed + 1)), use_ray=False,
                        progress=False)  # other plain texts: same layout, other rows
    with pytest.raises(ValueError, match=r"row \d+ differs by .* expected the same activations"):
        store.compare_layers(one.uri, reordered.uri, 1)
    shorter = harvest(replace(cfg, corpus=replace(cfg.corpus, n_plain=8)), use_ray=False, progress=False)
    with pytest.raises(ValueError, match="layouts differ at shard"):
        store.compare_layers(one.uri, shorter.uri, 1)


def test_an_in_place_edit_of_the_weights_last_mib_means_a_new_harvest(tiny_pair, tmp_path, monkeypatch):
    """The harvest cache key hashes every byte of the weights (issue 29): B retrained in place — its
    model.safetensors' last MiB rewritten, same size, even with its mtime put back — is a new harvest, not the
    old activations "reused (same content hash)". The per-file hashes are cached beside the models' mirrors."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from dfc_ray.pair import HASH_CACHE, pair_fingerprint

    monkeypatch.setenv("DFC_RAY_CACHE", str(tmp_path / "cache"))
    a_config = Qwen2Config.from_pretrained(tiny_pair.a)
    torch.manual_seed(3)  # a B of the tiny pair's width whose weights file is larger than 1 MiB
    Qwen2ForCausalLM(replace_config(a_config, intermediate_size=2048)).save_pretrained(tmp_path / "b")
    weights = tmp_path / "b" / "model.safetensors"
    assert weights.stat().st_size > 2 << 20
    pair = replace(tiny_pair, b=str(tmp_path / "b"))
    cfg = small_config(pair, tmp_path / "store", layers=(1,))
    first = harvest(cfg, use_ray=False, progress=False)
    assert harvest(cfg, use_ray=False, progress=False).reused
    assert str(weights.resolve()) in json.loads((tmp_path / "cache" / HASH_CACHE).read_text())

    before, stat = pair_fingerprint(pair), weights.stat()
    with weights.open("r+b") as handle:  # the last MiB rewritten in place with other float32 weights
        handle.seek(-(1 << 20), os.SEEK_END)
        handle.write((np.random.default_rng(0).standard_normal(1 << 18) * 0.02).astype(np.float32).tobytes())
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same size, same mtime
    assert weights.stat().st_size == stat.st_size and pair_fingerprint(pair) != before
    second = harvest(cfg, use_ray=False, progress=False)
    assert not second.reused and second.uri != first.uri


def test_s3_weights_are_keyed_by_their_objects_etags(s3_bucket):
    """An s3:// pair's key names its objects' content (ETags) without downloading them: the same bytes give the
    same key, a rewritten object of the same size another."""
    import boto3

    from dfc_ray.pair import PairSpec, pair_fingerprint

    bucket = s3_bucket[len("s3://"):]
    client = boto3.client("s3")
    weights = np.random.default_rng(0).standard_normal(1 << 18).astype(np.float32).tobytes()
    for role in ("a", "b"):
        client.put_object(Bucket=bucket, Key=f"{role}/config.json", Body=b"{}")
        client.put_object(Bucket=bucket, Key=f"{role}/model.safetensors", Body=weights)
    pair = PairSpec(a=f"{s3_bucket}/a", b=f"{s3_bucket}/b")
    before = pair_fingerprint(pair)
    assert pair_fingerprint(pair) == before
    client.put_object(Bucket=bucket, Key="b/model.safetensors", Body=weights[:-4] + b"\0\0\0\0")
    assert pair_fingerprint(pair) != before


def replace_config(config, **changes):
    """A copy of a transformers config with `changes`."""
    return type(config).from_dict(config.to_dict() | changes)
