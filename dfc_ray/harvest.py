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

The work is cut into fixed groups of `batch_size` records. A group is the unit of computation
(one padded batch) and of resumption: `harvest.json` beside the layers records how many rows each
finished group produced, so a re-run starts at the first group whose rows are not all in
recorded shards and replays nothing else. A harvest lives under `<store>/<content hash>/`, the
hash covering the pair, the corpus and every setting, so a second sweep on the same data reuses it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from rich.progress import Progress

from dfc_ray import store
from dfc_ray.config import CorpusSpec, HarvestConfig
from dfc_ray.fs import open_fs, redact, write_file_atomic
from dfc_ray.generation import GenerationConfig, HookContext, generate, residual_hooks
from dfc_ray.pair import load_config, load_model, load_tokenizer, pair_fingerprint
from dfc_ray.tooluse import load_tasks, render_prompt

MIX_LAST_PROMPT_REPEATS = 16
"""Extra copies of each record's last prompt token under positions = mix_last_prompt."""
PROGRESS = "harvest.json"


@dataclass
class Record:
    """One tokenized text: prompt ids, plus response ids once A has answered (else empty)."""

    prompt_ids: list[int]
    response_ids: list[int] = field(default_factory=list)
    is_tool_prompt: bool = False


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


def build_corpus(corpus: CorpusSpec, tokenizer) -> list[Record]:
    """Tokenized records: tool prompts rendered with the chat template, then plain texts."""

    sources = [s.strip() for s in corpus.tasks.split(",") if s.strip()] if corpus.n_tasks > 0 else []
    tasks = [task for source in sources for task in load_tasks(source)][: corpus.n_tasks]
    texts = [render_prompt(tokenizer, task) for task in tasks]
    records = [Record(ids[-corpus.max_tokens:], is_tool_prompt=True)
               for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]] if texts else []
    plain = plain_texts(corpus.plain_text, corpus.n_plain, corpus.seed)
    if plain:
        records += [Record(ids[-corpus.max_tokens:]) for ids in tokenizer(plain, add_special_tokens=False)["input_ids"]]
    if not records:
        raise ValueError("corpus: no records (tasks and plain_text both empty); expected at least one text")
    return records


def content_hash(cfg: HarvestConfig, records: Sequence[Record]) -> str:
    """Key of a harvest: the pair's weights, every record's tokens, and every setting that changes rows."""
    digest = hashlib.sha256(pair_fingerprint(cfg.pair).encode())
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("store", "num_actors", "gpus_per_actor", "resources")}
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


def select_positions(records: Sequence[Record], width: int, positions: str,
                     norms: torch.Tensor | None = None, sink_factor: float = 10.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(row index, column index) of the harvested positions in a left-padded batch of `width` columns.

    With left padding every row ends at column width-1, so a record's last prompt token sits at
    column width-1-len(response). `norms` is `(2, batch, width)` (per model) for the sink filter.
    """
    row_index, col_index = [], []
    for i, record in enumerate(records):
        end, n_resp = width, len(record.response_ids)
        start = width - len(record.prompt_ids) - n_resp
        last_prompt = end - 1 - n_resp
        if positions == "last_prompt_token":
            cols = [last_prompt]
        elif positions == "text_end":
            cols = [end - 1]
        elif positions == "prompt_and_response":
            cols = list(range(last_prompt, end))
        else:  # all_tokens / prompt / mix_last_prompt, minus attention sinks (each model's median norm, this record)
            assert norms is not None
            stop = last_prompt + 1 if positions == "prompt" else end
            record_norms = norms[:, i, start:stop]
            keep = (record_norms <= sink_factor * record_norms.median(dim=1, keepdim=True).values).all(0)
            cols = [start + j for j in torch.nonzero(keep).flatten().tolist()]
            if positions == "mix_last_prompt":
                cols += [last_prompt] * MIX_LAST_PROMPT_REPEATS
        row_index += [i] * len(cols)
        col_index += cols
    return torch.tensor(row_index, dtype=torch.long), torch.tensor(col_index, dtype=torch.long)


class PairActivations:
    """Hosts the pair (one replica) and turns groups of records into paired activation rows.

    Used as a Ray Data actor UDF (`map_batches`), or called in-process by `harvest(..., use_ray=False)`.
    Weights are loaded here from the spec: they never travel through the object store.
    """

    def __init__(self, cfg: HarvestConfig):
        self.cfg = cfg
        self.model_a, self.model_b = load_model(cfg.pair, "a"), load_model(cfg.pair, "b")
        self.tokenizer = load_tokenizer(cfg.pair)
        self.device = next(self.model_a.parameters()).device

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

    def rows(self, records: list[Record]) -> dict[int, np.ndarray]:
        """Layer → `(rows, 2, d_model)` float32 array for one group (one padded batch)."""
        if self.cfg.corpus.with_responses:
            records = self.with_responses(records)
        ids, mask = left_pad(records, self.tokenizer.pad_token_id)
        ids, mask = ids.to(self.device), mask.to(self.device)
        acts = [residual_after_blocks(model, ids, mask, self.cfg.layers) for model in (self.model_a, self.model_b)]
        deepest = max(self.cfg.layers)
        norms = torch.stack([acts[m][deepest].float().norm(dim=-1).cpu() for m in (0, 1)])
        rows, cols = select_positions(records, ids.shape[1], self.cfg.positions, norms, self.cfg.sink_factor)
        return {layer: torch.stack([acts[m][layer][rows.to(self.device), cols.to(self.device)] for m in (0, 1)], dim=1)
                .float().cpu().numpy() for layer in self.cfg.layers}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Ray Data UDF: a batch holding ONE group (`group`, `records` as JSON) → its rows, tagged."""
        (group,), (payload,) = batch["group"], batch["records"]
        import ray  # deferred: this method only runs inside Ray Data

        out = self.rows([Record(**r) for r in json.loads(payload)])
        n = len(next(iter(out.values())))
        return {"group": np.full(n, group, dtype=np.int64), "group_rows": np.full(n, n, dtype=np.int64),
                "node": np.full(n, ray.get_runtime_context().get_node_id()),
                **{f"layer_{layer}": rows for layer, rows in out.items()}}


# ---------------------------------------------------------------- the pipeline


def _groups(records: list[Record], batch_size: int) -> list[list[Record]]:
    return [records[i:i + batch_size] for i in range(0, len(records), batch_size)]


def _read_progress(uri: str) -> tuple[list[int], list[str]]:
    """(rows of each group written so far, node id that computed each; "" when in-process)."""
    fs, root = open_fs(uri)
    try:
        with fs.open_input_stream(f"{root}/{PROGRESS}") as handle:
            progress = json.loads(handle.read())
    except FileNotFoundError:
        return [], []
    rows = list(progress["group_rows"])
    return rows, list(progress.get("group_nodes", [""] * len(rows)))


def _write_progress(uri: str, cfg: HarvestConfig, group_rows: list[int], group_nodes: list[str]) -> None:
    data = json.dumps({"config": asdict(cfg) | {"store": redact(cfg.store)}, "group_rows": group_rows,
                       "group_nodes": group_nodes}, default=str, indent=1).encode()
    fs, root = open_fs(uri)
    write_file_atomic(fs, root, PROGRESS, data)


def _resume_point(group_rows: list[int], rows_done: int) -> tuple[int, int]:
    """(first group to compute, rows before it) such that every row before that group is recorded."""
    start = before = 0
    for n in group_rows:
        if before + n > rows_done:
            break
        before += n
        start += 1
    return start, before


def _iter_group_outputs(cfg: HarvestConfig, groups: list[list[Record]], start: int,
                        use_ray: bool) -> Iterator[tuple[int, dict[int, np.ndarray], str]]:
    """(group index, layer → rows, Ray node id that computed it or "") for groups[start:], in order."""
    todo = groups[start:]
    if not todo:
        return
    if not use_ray:
        extractor = PairActivations(cfg)
        for offset, group in enumerate(todo):
            yield start + offset, extractor.rows(group), ""
        return
    # deferred: Ray starts only for a Ray harvest
    import ray
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # rows must reach the writers in group order
    ctx.enable_progress_bars = False  # our own progress bar shows the groups
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    gpus = cfg.gpus_per_actor if cfg.gpus_per_actor >= 0 else (1 if ray.cluster_resources().get("GPU", 0) else 0)
    items = [{"group": start + i, "records": json.dumps([asdict(r) for r in g])} for i, g in enumerate(todo)]
    ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        PairActivations, fn_constructor_kwargs={"cfg": cfg}, batch_size=1, concurrency=cfg.num_actors,
        num_gpus=gpus, num_cpus=0 if gpus else 1, resources=cfg.resources or None, batch_format="numpy")
    pending: dict[int, list[dict[str, np.ndarray]]] = {}
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        # Ray Data may split or merge the blocks of consecutive groups: regroup by tag and count.
        for group in np.unique(batch["group"]):
            part = {k: v[batch["group"] == group] for k, v in batch.items()}
            pending.setdefault(int(group), []).append(part)
            if sum(len(p["group"]) for p in pending[int(group)]) == int(part["group_rows"][0]):
                parts = pending.pop(int(group))
                rows = {layer: np.concatenate([p[f"layer_{layer}"] for p in parts]) for layer in cfg.layers}
                yield int(group), rows, str(parts[0]["node"][0])


def harvest(cfg: HarvestConfig, *, use_ray: bool = True, progress: bool = True) -> HarvestResult:
    """Run (or resume, or reuse) a harvest and return where its layers are.

    With `use_ray`, the pair is hosted by a Ray Data actor pool (`num_actors` replicas, GPU when the
    cluster has GPUs) and the driver only writes shards; without, everything runs in this process.
    """

    tokenizer = load_tokenizer(cfg.pair)
    records = build_corpus(cfg.corpus, tokenizer)
    uri = f"{cfg.store.rstrip('/')}/{content_hash(cfg, records)}"
    models = (f"A={cfg.pair.a}", f"B={cfg.pair.b}")
    d_model = int(load_config(cfg.pair, "a").hidden_size)
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

    writers = {layer: store.ShardWriter(uri, store.StoreSpec(
        layer=layer, d_model=d_model, models=models, positions=cfg.positions, harvest_hash=uri.rsplit("/", 1)[1],
        dtype=cfg.dtype, format=cfg.format, shard_rows=cfg.shard_rows)) for layer in cfg.layers}
    groups = _groups(records, cfg.batch_size)
    group_rows, group_nodes = _read_progress(uri)
    start, before = _resume_point(group_rows, min(w.rows_done for w in writers.values()))
    group_rows, group_nodes = group_rows[:start], group_nodes[:start]
    for writer in writers.values():
        writer.skip(before)
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task(f"harvest {len(records)} records → {redact(uri)}", total=len(groups), completed=start)
        for group, rows, node in _iter_group_outputs(cfg, groups, start, use_ray):
            group_rows.append(len(rows[cfg.layers[0]]))
            group_nodes.append(node)
            _write_progress(uri, cfg, group_rows, group_nodes)  # before the rows can reach a recorded shard
            for layer, writer in writers.items():
                writer.append(rows[layer])
            bar.update(task, completed=group + 1)
    for writer in writers.values():
        writer.close()
    return HarvestResult(uri, cfg.layers, sum(group_rows), False, d_model, models,
                         tuple(sorted(set(group_nodes) - {""})))
