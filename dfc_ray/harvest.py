"""Harvest paired activations: prompts → both models → `(rows, 2, d_model)` per layer → the store.

"Layer L" is the residual stream after decoder block L: the output of `model.model.layers[L]`,
which transformers reports as `hidden_states[L + 1]` (`hidden_states[0]` is the embeddings).
Both models run ONE forward per batch for all requested layers and stop right after the deepest.

Positions (`HarvestConfig.positions`):
- `last_prompt_token`: the study's protocol, one row per record — the last token of the rendered
  prompt (for plain text, its last token). Correct under left padding (see `select_positions`).
- `all_tokens`: every real token, minus attention-sink tokens whose norm in either model exceeds
  `sink_factor` × that record's median norm (Qwen models put huge norms on the first token).
- `prompt_and_response`: the last prompt token and every response token (with `with_responses`,
  A's own reply is appended to each tool prompt) — where a tool call is actually produced.
- `prompt`: every prompt token (response tokens excluded), minus attention sinks as in `all_tokens`.
- `mix_last_prompt`: `all_tokens` plus the last prompt token repeated `MIX_LAST_PROMPT_REPEATS` (16)
  more times: a dictionary trained on it sees every position but weights the position steering
  writes to like ~16 tokens of context (about 4% of a 380-token organism prompt's rows instead of
  0.3%). Repeats are exact duplicate rows, so the store grows by 16 rows per record.
- `text_end`: the seed study's training positions (weakness 4): one row per record, its LAST token — a
  plain text's end, a prompt's end, or the end of A's reply when the corpus has responses.

The work is cut into fixed groups of `batch_size` records, and the groups into parts (`plan_parts`: runs
of consecutive groups, a function of the corpus and the hashed settings only). A group is the unit of
computation (one padded batch); a part is the unit of work and of writing: one worker computes its groups
and writes their rows into the part's own shards of every layer (`ShardWriter(part=...)`), so there is no
single writer to wait for, and once every part is complete the driver gathers the parts' manifests into
each layer's manifest (rows in group order). Each part resumes on its own: `parts/part-00003.json`
records how many rows each of its finished groups produced before they can reach a recorded shard, so a
re-run starts at the part's first group whose rows are not all in recorded shards and replays nothing
else; `harvest.json` (the driver's) holds the settings, the parts and every finished group's rows and
node. A harvest lives under `<store>/<content hash>/`, the hash covering the pair, the corpus and every
setting, so a second sweep on the same data reuses it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import queue
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import pyarrow.fs as pafs
import torch
from rich.progress import Progress

from dfc_ray import store
from dfc_ray.config import CorpusSpec, HarvestConfig
from dfc_ray.fs import open_fs, redact, write_file_atomic
from dfc_ray.generation import GenerationConfig, HookContext, generate, residual_hooks
from dfc_ray.pair import check_pair, load_model, load_tokenizer, pair_fingerprint, require_chat_template
from dfc_ray.preflight import free_memory_bytes, human_bytes
from dfc_ray.tooluse import load_tasks, render_prompt

MIX_LAST_PROMPT_REPEATS = 16
"""Extra copies of each record's last prompt token under positions = mix_last_prompt."""
PROGRESS = "harvest.json"
"""The driver's progress file at the harvest's root: settings, parts, each group's rows and node."""


@dataclass
class Record:
    """One tokenized text: prompt ids, plus response ids once A has answered (else empty)."""

    prompt_ids: list[int]
    response_ids: list[int] = field(default_factory=list)
    is_tool_prompt: bool = False
    index: int = -1
    """Its place in the harvest's corpus (`store.write_corpus`), the record a row's provenance names; −1 for
    records made outside a harvest."""


@dataclass
class HarvestResult:
    uri: str
    """Where the layers are: pass it with a layer to `store.iter_ray_batches` / `validate_store`."""
    layers: tuple[int, ...]
    rows: int
    """Rows per layer (the same for every layer)."""
    reused: bool
    """True when a complete harvest with the same content hash was found and nothing was computed."""
    d_model: int
    models: tuple[str, str]
    nodes: tuple[str, ...] = ()
    """Ray node ids of the actors that computed the groups (every attempt's; empty in-process or reused)."""


# ---------------------------------------------------------------- corpus


def plain_texts(source: str, n: int, seed: int) -> list[str]:
    if not source or n <= 0:
        return []
    if source == "organism":
        # deferred: the organism package loads transformers
        from dfc_ray.organism.world import plain_text

        return plain_text(n, seed)
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"corpus.plain_text: {source!r} is not 'organism' or an existing .txt/.jsonl file")
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    if path.suffix == ".jsonl":
        try:
            lines = [json.loads(line)["text"] for line in lines]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{path}: expected one JSON object with a 'text' field per line ({err})") from None
    return lines[:n]


def default_bos(tokenizer) -> list[int]:
    """[BOS id] when the tokenizer puts a BOS first by default (`tokenizer(text)`: Llama, Mistral, Gemma), else []
    (Qwen, OLMo-2, the organism). Plain texts start with it, as the model saw text in training; chat prompts
    carry their BOS in the template instead and are tokenized without special tokens."""
    bos = tokenizer.bos_token_id
    if bos is None or tokenizer("a")["input_ids"][:1] != [bos]:
        return []
    return [] if tokenizer("a", add_special_tokens=False)["input_ids"][:1] == [bos] else [bos]


def plain_text_ids(tokenizer, texts: Sequence[str], max_tokens: int | None = None) -> list[list[int]]:
    """Plain texts as token ids the way every stage feeds them to the models: `default_bos` first, no other
    special token (the harvest's records, the splice loss, the steering ranking's negatives). A text longer than
    `max_tokens` keeps its BOS and its last tokens."""
    if not texts:
        return []
    bos = default_bos(tokenizer)
    keep = None if max_tokens is None else max(0, max_tokens - len(bos))
    return [bos + (ids[len(ids) - keep:] if keep is not None and len(ids) > keep else ids)
            for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


def build_corpus(corpus: CorpusSpec, tokenizer, dialect: str = "auto") -> list[Record]:
    """Tokenized records: tool prompts rendered with the chat template, then plain texts (after `default_bos`)."""

    sources = [s.strip() for s in corpus.tasks.split(",") if s.strip()] if corpus.n_tasks > 0 else []
    tasks = [task for source in sources for task in load_tasks(source)][: corpus.n_tasks]
    if tasks:
        require_chat_template(tokenizer, "corpus.tasks")
    texts = [render_prompt(tokenizer, task, dialect) for task in tasks]  # dialect: pair.dialect (tools fallback)
    records = [Record(ids[-corpus.max_tokens:], is_tool_prompt=True)
               for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]] if texts else []
    plain = plain_texts(corpus.plain_text, corpus.n_plain, corpus.seed)
    records += [Record(ids) for ids in plain_text_ids(tokenizer, plain, corpus.max_tokens)]
    if not records:
        raise ValueError("corpus: no records (tasks and plain_text both empty); expected at least one text")
    return records


def content_hash(cfg: HarvestConfig, records: Sequence[Record]) -> str:
    """Key of a harvest: the pair's weights, every record's tokens, and every setting that changes rows."""
    digest = hashlib.sha256(pair_fingerprint(cfg.pair).encode())
    settings = {k: v for k, v in asdict(cfg).items()
                if k not in ("store", "executor", "num_actors", "gpus_per_actor", "resources")}
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    for record in records:
        digest.update(np.asarray(record.prompt_ids, dtype=np.int64).tobytes() + b"|")
    return digest.hexdigest()[:16]


# ---------------------------------------------------------------- activations


class _StopForward(Exception):
    """Raised by the capture hook after the deepest requested block: the rest of the model is skipped."""


def residual_after_blocks(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                          layers: Sequence[int]) -> dict[int, torch.Tensor]:
    """Residual stream after each block in `layers` — `(batch, seq, d_model)` — from one forward that
    stops after the deepest one. Left padding is handled by explicit position ids."""

    captured: dict[int, torch.Tensor] = {}
    deepest = max(layers)

    def capture(layer: int):
        def hook(hidden: torch.Tensor, ctx) -> None:
            captured[layer] = hidden.detach()
            if layer == deepest:
                raise _StopForward
        return hook

    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    context = HookContext.for_forward(attention_mask)
    with torch.inference_mode(), residual_hooks(model, {layer: capture(layer) for layer in layers}, context):
        try:
            model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
        except _StopForward:
            pass
    return captured


def left_pad(records: Sequence[Record], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), each row = prompt + response, padded on the LEFT."""
    rows = [r.prompt_ids + r.response_ids for r in records]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row)
        mask[i, width - len(row):] = 1
    return ids, mask


SINK_POSITIONS = ("all_tokens", "prompt", "mix_last_prompt")
"""Positions whose rows drop attention sinks (they need the per-token norms)."""


def select_positions(records: Sequence[Record], width: int, positions: str,
                     norms: torch.Tensor | None = None, sink_factor: float = 10.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(row index, column index) of the harvested positions in a left-padded batch of `width` columns,
    record by record, columns ascending (mix_last_prompt's repeats after each record's own columns).

    With left padding every row ends at column width-1, so a record's last prompt token sits at
    column width-1-len(response). `norms` is `(2, batch, width)` (per model) for the sink filter; the
    selection is computed on its device as masks over the whole batch (no per-token Python).
    """
    device = norms.device if norms is not None else torch.device("cpu")
    n_response = torch.tensor([len(r.response_ids) for r in records], device=device)
    start = width - n_response - torch.tensor([len(r.prompt_ids) for r in records], device=device)
    last_prompt = width - 1 - n_response
    batch = torch.arange(len(records), device=device)
    if positions == "last_prompt_token":
        return batch, last_prompt
    if positions == "text_end":
        return batch, torch.full_like(batch, width - 1)
    columns = torch.arange(width, device=device)[None]
    if positions == "prompt_and_response":
        rows, cols = (columns >= last_prompt[:, None]).nonzero(as_tuple=True)
        return rows, cols
    # all_tokens / prompt / mix_last_prompt, minus attention sinks (each model's median norm, this record)
    assert norms is not None
    stop = last_prompt + 1 if positions == "prompt" else torch.full_like(batch, width)
    span = (columns >= start[:, None]) & (columns < stop[:, None])
    median = norms.float().masked_fill(~span, float("nan")).nanmedian(dim=2, keepdim=True).values
    rows, cols = (span & (norms <= sink_factor * median).all(0)).nonzero(as_tuple=True)
    if positions == "mix_last_prompt":
        rows = torch.cat([rows, batch.repeat_interleave(MIX_LAST_PROMPT_REPEATS)])
        cols = torch.cat([cols, last_prompt.repeat_interleave(MIX_LAST_PROMPT_REPEATS)])
        rows, order = rows.sort(stable=True)
        cols = cols[order]
    return rows, cols


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with exactly `n` torch intra-op threads, then restore the caller's count.

    A CPU matmul's blocking (hence the order of its float sums) follows the thread count: measured on the
    tiny test pair, 1 and 3 threads give rows that differ by up to 1e-6 in float32, enough to flip a float16
    rounding on some CPUs. Ray gives each actor as many threads as CPUs it reserved, the driver has all of
    the machine's; fixing the count here makes a part's bytes the same whoever computes it."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class PairActivations:
    """Hosts the pair (one replica) and turns groups of records into paired activation rows.

    Used as a Ray Data actor UDF (`map_batches`, one part of the harvest per call, written to the store by
    this actor), or called in-process by `harvest(..., use_ray=False)`. Weights are loaded here from the
    spec: they never travel through the object store.
    """

    model_a: Any
    """transformers causal LMs (their `.config` is read)."""
    model_b: Any

    def __init__(self, cfg: HarvestConfig, uri: str | None = None):
        self.cfg, self.uri = cfg, uri
        self.model_a, self.model_b = load_model(cfg.pair, "a"), load_model(cfg.pair, "b")
        self.tokenizer = load_tokenizer(cfg.pair)
        self.device = next(self.model_a.parameters()).device

    @classmethod
    def of_models(cls, cfg: HarvestConfig, model_a: torch.nn.Module, model_b: torch.nn.Module,
                  tokenizer) -> "PairActivations":
        """An extractor over models already in memory (benchmarks on random weights); `cfg.pair` is unused."""
        extractor = cls.__new__(cls)
        extractor.cfg, extractor.uri = cfg, None
        extractor.model_a, extractor.model_b, extractor.tokenizer = model_a, model_b, tokenizer
        extractor.device = next(model_a.parameters()).device
        return extractor

    def with_responses(self, records: list[Record]) -> list[Record]:
        """A's own greedy replies appended to tool prompts (plain text gets none)."""

        prompts = [r for r in records if r.is_tool_prompt]
        if not prompts:
            return records
        texts = self.tokenizer.batch_decode([r.prompt_ids for r in prompts], skip_special_tokens=False)
        config = GenerationConfig(max_new_tokens=self.cfg.corpus.max_new_tokens, batch_size=len(prompts))
        for record, out in zip(prompts, generate(self.model_a, self.tokenizer, texts, config)):
            record.response_ids = list(out.token_ids)
        return records

    def rows(self, records: list[Record]) -> dict[int, torch.Tensor]:
        """Layer → `(rows, 2, d_model)` tensor on the pair's device, in its dtype, for one group (one padded
        batch); `ShardWriter.append` casts and copies it."""
        return self.rows_and_provenance(records)[0]

    def rows_and_provenance(self, records: list[Record]) -> tuple[dict[int, torch.Tensor], np.ndarray]:
        """`rows`, and each row's [record index, token position] `(rows, 2)` (the position counts from the
        record's first token, prompt then response), which the store keeps beside the rows."""
        if self.cfg.corpus.with_responses:
            records = self.with_responses(records)
        ids, mask = left_pad(records, self.tokenizer.pad_token_id)
        ids, mask = ids.to(self.device), mask.to(self.device)
        acts = [residual_after_blocks(model, ids, mask, self.cfg.layers) for model in (self.model_a, self.model_b)]
        deepest = max(self.cfg.layers)
        norms = torch.stack([acts[m][deepest].float().norm(dim=-1) for m in (0, 1)]) \
            if self.cfg.positions in SINK_POSITIONS else None
        rows, cols = select_positions(records, ids.shape[1], self.cfg.positions, norms, self.cfg.sink_factor)
        rows, cols = rows.to(self.device), cols.to(self.device)
        first = ids.shape[1] - mask.sum(1)  # left padding: each record starts after its pad columns
        provenance = torch.stack([torch.tensor([r.index for r in records], device=self.device)[rows],
                                  cols - first[rows]], dim=1).cpu().numpy()
        return {layer: torch.stack([acts[m][layer][rows, cols] for m in (0, 1)], dim=1)
                for layer in self.cfg.layers}, provenance

    def run_part(self, uri: str, part: int, groups: list[list[Record]], node: str = "",
                 on_group: Callable[[], None] | None = None,
                 helpers: Sequence[PairActivations] = ()) -> dict[str, list]:
        """Compute (or resume) one part: its groups' rows into its own shards of every layer. Its progress
        file records each group's rows before they can reach a recorded shard, so a re-run starts at the
        first group not wholly in recorded shards and replays nothing else. `helpers`: other extractors in this
        process computing groups beside this one (`_computed`). Returns the progress."""
        specs = _store_specs(self.cfg, uri, int(self.model_a.config.get_text_config().hidden_size))
        writers = {layer: store.ShardWriter(uri, spec, part) for layer, spec in specs.items()}
        progress = _read_json(uri, _part_progress(part)) or {"group_rows": [], "group_nodes": []}
        start, before = _resume_point(progress["group_rows"], min(w.rows_done for w in writers.values()))
        progress = {key: values[:start] for key, values in progress.items()}
        for writer in writers.values():
            writer.skip(before)
        for rows, provenance in self._computed(groups[start:], helpers):
            progress["group_rows"].append(len(next(iter(rows.values()))))
            progress["group_nodes"].append(node)
            _write_json(uri, _part_progress(part), progress)  # before the rows can reach a recorded shard
            for layer, writer in writers.items():
                writer.append(rows[layer], provenance)
            if on_group is not None:
                on_group()
        for writer in writers.values():
            writer.close()
        return progress

    def _computed(self, groups: list[list[Record]],
                  helpers: Sequence[PairActivations]) -> Iterator[tuple[dict[int, torch.Tensor], np.ndarray]]:
        """Each group's `rows_and_provenance`, in order, at `cpu_threads` torch threads. With helpers, this
        extractor and they compute groups at once, one thread each (each has its own copy of the pair: the
        capture hooks live on the model), at most two groups per thread ahead of the caller; torch releases the
        GIL in its kernels, so two threads keep two cores busy. The count is set once, before the threads
        start: each takes it at its first kernel and nothing changes it under them, so the bytes are one
        thread's."""
        with torch_threads(self.cfg.cpu_threads):
            if not helpers:
                yield from map(self.rows_and_provenance, groups)
                return
            free: queue.SimpleQueue[PairActivations] = queue.SimpleQueue()
            for extractor in (self, *helpers):
                free.put(extractor)

            def compute(group: list[Record]) -> tuple[dict[int, torch.Tensor], np.ndarray]:
                extractor = free.get()  # as many threads as extractors: never waits
                try:
                    return extractor.rows_and_provenance(group)
                finally:
                    free.put(extractor)

            pool = ThreadPoolExecutor(1 + len(helpers), thread_name_prefix="harvest")
            pending: deque[Future[tuple[dict[int, torch.Tensor], np.ndarray]]] = deque()
            try:
                for group in groups:
                    pending.append(pool.submit(compute, group))
                    if len(pending) == 2 * (1 + len(helpers)):
                        yield pending.popleft().result()
                while pending:
                    yield pending.popleft().result()
            finally:  # Ctrl-C or a failed group: the groups not begun are dropped (a re-run resumes them)
                pool.shutdown(wait=True, cancel_futures=True)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Ray Data UDF: a batch holding ONE part (`part`, `groups` as JSON) → that part written to the store;
        returns its progress."""
        (part,), (payload,) = batch["part"], batch["groups"]
        import ray  # deferred: this method only runs inside Ray Data

        node = ray.get_runtime_context().get_node_id()
        assert self.uri is not None
        if _read_json(self.uri, PROGRESS) is None:
            raise ValueError(f"{redact(self.uri)}/{PROGRESS}: not visible from node {node}; the harvest actors write "
                             "their own shards, so the store must be one every node reaches (s3:// or a shared folder)")
        groups = [[Record(**r) for r in group] for group in json.loads(payload)]
        progress = self.run_part(self.uri, int(part), groups, node)
        return {"part": np.array([part], dtype=np.int64), "progress": np.array([json.dumps(progress)])}


# ---------------------------------------------------------------- the pipeline


PARTS_MAX = 64
"""A harvest is cut into at most this many parts (runs of consecutive groups), each computed and written by one
actor into its own shards: enough for 8 actors to balance."""
PART_SHARDS = 8
"""A part holds about this many shards' worth of tokens: a gathered layer has one short shard per 8 full ones,
and a harvest smaller than that is one part, written exactly as one writer always wrote it (so a fresh
organism48 harvest has the shards, hence the shuffled batches and the numbers, of earlier runs)."""
PARTS_DIR = "parts"


def plan_parts(records: Sequence[Record], batch_size: int, shard_rows: int) -> list[tuple[int, int]]:
    """(first group, end group) of each part: PART_SHARDS × shard_rows prompt tokens or more each, balanced by
    tokens (the work of a group grows with them), at least one group each, at most PARTS_MAX parts. A function
    of the corpus and the settings in the content hash only (not of the number of actors), so a harvest
    resumed with other resources keeps its layout."""
    group_tokens = np.array([sum(len(r.prompt_ids) for r in records[i:i + batch_size])
                             for i in range(0, len(records), batch_size)])
    n_parts = max(1, min(len(group_tokens), PARTS_MAX, int(group_tokens.sum()) // (PART_SHARDS * shard_rows)))
    # cut where the running token count crosses each part's share; every part keeps at least one group
    cuts = np.searchsorted(np.cumsum(group_tokens), group_tokens.sum() * np.arange(1, n_parts) / n_parts) + 1
    ends = [0]
    for cut in [*cuts.tolist(), len(group_tokens)]:
        ends.append(min(max(cut, ends[-1] + 1), len(group_tokens) - (n_parts - len(ends))))
    return list(zip(ends[:-1], ends[1:]))


def _groups(records: list[Record], batch_size: int) -> list[list[Record]]:
    return [records[i:i + batch_size] for i in range(0, len(records), batch_size)]


def _store_specs(cfg: HarvestConfig, uri: str, d_model: int) -> dict[int, store.StoreSpec]:
    models = (f"A={cfg.pair.a}", f"B={cfg.pair.b}")
    return {layer: store.StoreSpec(layer=layer, d_model=d_model, models=models, positions=cfg.positions,
                                   harvest_hash=uri.rsplit("/", 1)[1], dtype=cfg.dtype, format=cfg.format,
                                   shard_rows=cfg.shard_rows) for layer in cfg.layers}


def _part_progress(part: int) -> str:
    return f"{PARTS_DIR}/{store.part_name(part)}.json"


def _read_json(uri: str, file: str) -> dict | None:
    fs, root = open_fs(uri)
    try:
        with fs.open_input_stream(f"{root}/{file}") as handle:
            return json.loads(handle.read())
    except FileNotFoundError:
        return None


def _write_json(uri: str, file: str, data: dict) -> None:
    fs, root = open_fs(uri)
    folder, _, name = f"{root}/{file}".rpartition("/")
    if isinstance(fs, pafs.LocalFileSystem):
        fs.create_dir(folder, recursive=True)
    write_file_atomic(fs, folder, name, json.dumps(data, default=str, indent=1).encode())


def _write_progress(uri: str, cfg: HarvestConfig, parts: list[tuple[int, int]], done: dict[int, dict]) -> None:
    """harvest.json: the settings, the torch version, the parts, and each group's rows and node (null until its part
    is done)."""
    n_groups = parts[-1][1]
    rows: list[int | None] = [None] * n_groups
    nodes: list[str | None] = [None] * n_groups
    for part, progress in done.items():
        first = parts[part][0]
        rows[first:first + len(progress["group_rows"])] = progress["group_rows"]
        nodes[first:first + len(progress["group_nodes"])] = progress["group_nodes"]
    _write_json(uri, PROGRESS, {"config": asdict(cfg) | {"store": redact(cfg.store)}, "torch": torch.__version__,
                                "parts": parts, "group_rows": rows, "group_nodes": nodes})


def _resume_point(group_rows: list[int], rows_done: int) -> tuple[int, int]:
    """(first group to compute, rows before it) such that every row before that group is recorded."""
    start = before = 0
    for n in group_rows:
        if before + n > rows_done:
            break
        before += n
        start += 1
    return start, before


def _part_done(uri: str, layers: Sequence[int], part: int) -> dict | None:
    """The part's progress if every layer's part manifest is complete, else None (it must run or resume)."""
    for layer in layers:
        manifest = store._Layer.at(uri, layer).read_manifest(f"{store.part_name(part)}.json")
        if manifest is None or not manifest.complete:
            return None
    return _read_json(uri, _part_progress(part))


def _run_parts(cfg: HarvestConfig, uri: str, groups: list[list[Record]], parts: list[tuple[int, int]],
               todo: list[int], use_ray: bool, on_group: Callable[[], None]) -> Iterator[tuple[int, dict]]:
    """(part, its progress) for every part in `todo` as it finishes: in this process, or one Ray Data task per
    part on an actor pool of `num_actors` replicas (GPU when the cluster has GPUs) that write their own shards."""
    if not todo:
        return
    if not use_ray:
        extractor = PairActivations(cfg)
        _check_copies_fit(cfg, extractor)
        helpers = [PairActivations(cfg) for _ in range(cfg.num_actors - 1)]
        for part in todo:
            first, end = parts[part]
            yield part, extractor.run_part(uri, part, groups[first:end], on_group=on_group, helpers=helpers)
        return
    # deferred: Ray starts only for a Ray harvest
    import ray
    import ray.data
    from ray.util.debug import log_once

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # our own progress bar shows the groups
    log_once("ray_data_progress_manager_disabled")  # spends Ray Data's one "Progress bars disabled" warning:
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # we turned them off, it is not news to the user
    gpus = cfg.gpus_per_actor if cfg.gpus_per_actor >= 0 else (1 if ray.cluster_resources().get("GPU", 0) else 0)
    items = [{"part": part, "groups": json.dumps([[asdict(r) for r in group] for group in groups[slice(*parts[part])]])}
             for part in todo]
    ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        PairActivations, fn_constructor_kwargs={"cfg": cfg, "uri": uri}, batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=min(cfg.num_actors, len(items))), num_gpus=gpus,
        num_cpus=0 if gpus else 1,
        resources=cfg.resources or None, batch_format="numpy")
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for part, progress in zip(batch["part"], batch["progress"]):  # Ray Data may merge finished parts
            yield int(part), json.loads(str(progress))


def _check_copies_fit(cfg: HarvestConfig, extractor: PairActivations) -> None:
    """ValueError (one line) when the further copies of the pair a local harvest's threads hold (`num_actors` −
    1 beside `extractor`'s) would not fit in the free memory of their device."""
    if cfg.num_actors < 2:
        return
    params = [p for model in (extractor.model_a, extractor.model_b) for p in model.parameters()]
    needed = (cfg.num_actors - 1) * sum(p.numel() * p.element_size() for p in params)
    device = params[0].device
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else free_memory_bytes()
    if free is not None and needed > free:
        raise ValueError(f"harvest.num_actors={cfg.num_actors} with harvest.executor 'local': {cfg.num_actors - 1} "
                         f"more copies of the pair need {human_bytes(needed)} but {human_bytes(free)} of "
                         f"{device.type} memory is free; expected fewer threads (num_actors) or executor 'ray'")


PROGRESS_POLL_S = 2.0
"""How often the driver reads the parts' progress files while Ray workers harvest (the bar's updates)."""


@contextlib.contextmanager
def _watch_parts(uri: str, todo: list[int], seen: Callable[[int], None], on: bool) -> Iterator[None]:
    """While Ray workers run the parts in `todo`, call `seen(groups done)` every `PROGRESS_POLL_S` from their
    progress files (each worker rewrites its part's after every group), so the bar moves within a part, not
    only when a whole part ends."""
    if not on:
        yield
        return
    stop = threading.Event()

    def count() -> None:
        try:
            seen(sum(len((_read_json(uri, _part_progress(part)) or {}).get("group_rows", [])) for part in todo))
        except (OSError, ValueError):  # a store that did not answer this time: the next poll asks again
            pass

    def poll() -> None:
        while not stop.wait(PROGRESS_POLL_S):
            count()

    watcher = threading.Thread(target=poll, name="harvest-progress", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        stop.set()
        watcher.join()
        count()


def harvest(cfg: HarvestConfig, *, use_ray: bool = True, progress: bool = True) -> HarvestResult:
    """Run (or resume, or reuse) a harvest and return where its layers are.

    The groups are cut into parts (`plan_parts`); each part is computed and written by one worker into its
    own shards of every layer, then the driver gathers the parts' manifests into each layer's manifest.
    With `use_ray`, the workers are a Ray Data actor pool (`num_actors` replicas, GPU when the cluster has
    GPUs) and the driver writes nothing but the progress and the manifests; without, one process does all.
    """

    tokenizer = load_tokenizer(cfg.pair)
    records = build_corpus(cfg.corpus, tokenizer, cfg.pair.dialect)
    uri = f"{cfg.store.rstrip('/')}/{content_hash(cfg, records)}"
    models = (f"A={cfg.pair.a}", f"B={cfg.pair.b}")
    d_model = int(check_pair(cfg.pair).hidden_size)  # one line for a pair it cannot run, before any weights
    manifests = {}
    for layer in cfg.layers:  # every layer is checked (crc32 of each shard): a bad one is re-harvested
        try:
            manifests[layer] = store.validate_store(uri, layer, d_model=d_model, models=models)
        except store.BadShard as bad:
            logging.getLogger(__name__).warning(f"{bad}; re-harvesting layer {layer} from that shard on")
            store.drop_shards_from(uri, layer, bad.index)
        except (FileNotFoundError, ValueError):
            pass
    if len(manifests) == len(cfg.layers):
        return HarvestResult(uri, cfg.layers, manifests[cfg.layers[0]].total_rows, True, d_model, models)

    for index, record in enumerate(records):  # what each row's provenance names
        record.index = index
    store.write_corpus(uri, [r.prompt_ids for r in records])
    groups = _groups(records, cfg.batch_size)
    previous = _read_json(uri, PROGRESS) or {}
    parts = [tuple(p) for p in previous["parts"]] if "parts" in previous else \
        plan_parts(records, cfg.batch_size, cfg.shard_rows)
    done = {part: found for part in range(len(parts)) if (found := _part_done(uri, cfg.layers, part)) is not None}
    _write_progress(uri, cfg, parts, done)  # the actors check that they see it (a store every node reaches)
    for spec in _store_specs(cfg, uri, d_model).values():
        store.begin_parts(uri, spec)
    todo = [part for part in range(len(parts)) if part not in done]
    with Progress(disable=not progress, transient=True) as bar:
        finished = sum(parts[part][1] - parts[part][0] for part in done)
        task = bar.add_task(f"harvest {len(records)} records → {redact(uri)}", total=len(groups), completed=finished)
        with _watch_parts(uri, todo, lambda seen: bar.update(task, completed=finished + seen), use_ray and progress):
            for part, part_progress in _run_parts(cfg, uri, groups, parts, todo, use_ray,
                                                  on_group=lambda: bar.advance(task)):
                done[part] = part_progress
                _write_progress(uri, cfg, parts, done)
    for layer in cfg.layers:
        store.gather_parts(uri, layer, len(parts))
    nodes = {node for part in done.values() for node in part["group_nodes"]}
    return HarvestResult(uri, cfg.layers, sum(sum(p["group_rows"]) for p in done.values()), False, d_model, models,
                         tuple(sorted(nodes - {""})))
