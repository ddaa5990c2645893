"""The activation store: paired activations `(rows, 2, d_model)` (model 0 = A, 1 = B) of one layer,
cut into fixed-size shards with a JSON manifest per layer, on a plain path, `file://` or `s3://`.

Layout under a store URI (one harvest, many layers):

    <uri>/layer_013/manifest.json              what is stored; the ONLY source of truth
    <uri>/layer_013/shard-00000.parquet        complete shards, each recorded once written
    <uri>/layer_013/norm-00012.safetensors     streaming normalization statistics of the recorded rows
    <uri>/layer_013/rows-00000.safetensors     each row's provenance (record index, token position)
    <uri>/corpus.safetensors                   the harvest's token ids, once for every layer

A file is part of the store only once the manifest names it: a crashed writer's leftovers are never
read, and a re-opened writer skips the rows its recorded shards already hold (resumable, idempotent).
See docs/store.md for the formats and the reasoning behind them.
"""

from __future__ import annotations

import json
import os
import warnings
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import safetensors
import safetensors.numpy
import safetensors.torch
import torch

from dfc_ray.fs import open_fs, redact, write_file_atomic

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
# Storage numpy dtype of each activation dtype. numpy (and parquet) have no bfloat16: bf16 values
# are stored as their raw 16-bit patterns (uint16) and widened to float32 by a 16-bit shift.
STORAGE_DTYPES = {"float16": np.float16, "bfloat16": np.uint16, "float32": np.float32}
FORMATS = ("parquet", "safetensors")  # also the shard files' extensions
_STATS_BLOCK_ROWS = 4096  # rows per float64 block when fitting statistics (bounds the temporary)
CORPUS = "corpus.safetensors"
"""The harvest's token ids at the store URI's root (`write_corpus`): what a row's provenance points into."""
REHARVEST = ("harvest again into a new store URI (or delete this one) to record each row's record and "
             "token position")
"""How a reader of a store without provenance gets one (the store predates provenance)."""


@dataclass(frozen=True)
class StoreSpec:
    """What one layer of one harvest holds; a re-opened store must match it field for field."""

    layer: int
    """Layer index the activations were read from (output of that block)."""
    d_model: int
    """Width of each model's activation vector."""
    models: tuple[str, str]
    """Names of model A (index 0, the fine-tune) and model B (index 1, its base)."""
    positions: str
    """Which token positions were harvested (protocol string, e.g. "last_prompt_token"), so training
    and evaluation positions can be compared."""
    harvest_hash: str
    """Content hash of the harvest inputs (prompts, pair, settings), given by the harvester; a store
    written from different inputs must never be resumed or reused."""
    dtype: str = "float16"
    """Stored activation dtype: float16, bfloat16 or float32."""
    format: str = "parquet"
    """Shard file format: parquet (fast columnar reads, Ray Data native) or safetensors."""
    shard_rows: int = 16384
    """Rows per shard (the last shard may be shorter); 16384 × 2 × 2048 fp16 is 128 MiB."""
    compression: str = "none"
    """Parquet compression codec; activations barely compress and "none" reads fastest."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "models", tuple(self.models))
        if self.dtype not in STORAGE_DTYPES:
            raise ValueError(f"StoreSpec.dtype={self.dtype!r}: expected one of {sorted(STORAGE_DTYPES)}")
        if self.format not in FORMATS:
            raise ValueError(f"StoreSpec.format={self.format!r}: expected one of {sorted(FORMATS)}")
        if len(self.models) != 2:
            raise ValueError(f"StoreSpec.models={self.models!r}: expected two names (A, B)")
        if self.d_model <= 0 or self.shard_rows <= 0:
            raise ValueError(f"StoreSpec: d_model={self.d_model}, shard_rows={self.shard_rows}: expected > 0")


@dataclass
class Manifest:
    """The JSON manifest of one layer: the spec, the recorded shards and the statistics file."""

    spec: StoreSpec
    """Settings every shard was written with."""
    shards: list[dict] = field(default_factory=list)
    """One `{"file", "rows", "bytes", "crc32"}` per complete shard, in write order, plus `"provenance"`
    (its rows' sidecar file, `write_provenance`) when every row was appended with one."""
    norm_stats: dict | None = None
    """`{"file", "rows"}` of the normalization-statistics sidecar covering every recorded row."""
    complete: bool = False
    """True once the writer closed: only a complete store may be trained on."""

    @property
    def total_rows(self) -> int:
        return sum(s["rows"] for s in self.shards)

    @property
    def has_provenance(self) -> bool:
        """Whether every recorded row knows its record and token position (stores harvested before
        provenance existed do not)."""
        return bool(self.shards) and all("provenance" in s for s in self.shards)

    def to_json(self) -> str:
        spec = asdict(self.spec)
        return json.dumps(
            {"format_version": FORMAT_VERSION, **spec, "models": list(spec["models"]),
             "total_rows": self.total_rows, "complete": self.complete,
             "norm_stats": self.norm_stats, "shards": self.shards},
            indent=1,
        )

    @classmethod
    def from_json(cls, text: str, where: str) -> "Manifest":
        try:
            raw = json.loads(text)
            if raw.get("format_version") != FORMAT_VERSION:
                raise ValueError(f"format_version={raw.get('format_version')!r}, expected {FORMAT_VERSION}")
            names = StoreSpec.__dataclass_fields__
            spec = StoreSpec(**{k: raw[k] for k in names if k in raw})
            man = cls(spec, list(raw["shards"]), raw.get("norm_stats"), bool(raw["complete"]))
        except (KeyError, TypeError, json.JSONDecodeError) as err:
            raise ValueError(f"{where}: unreadable manifest ({type(err).__name__}: {err})") from None
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None
        if raw.get("total_rows") != man.total_rows:
            raise ValueError(f"{where}: total_rows={raw.get('total_rows')} but the shards hold {man.total_rows}")
        return man


@dataclass
class NormStats:
    """Per-model mean and spread of the stored rows, fitted by streaming (Chan et al. merge, float64).

    `scale[m]` makes E||(x_m − mean_m)·scale[m]||² = d_model: the trainer normalizes with it and the
    checkpoint keeps it, so a splice can map reconstructions back to raw activation space.
    """

    count: int
    """Rows seen."""
    mean: np.ndarray
    """(2, d_model) float64 per-model mean."""
    sq_dev_sum: np.ndarray
    """(2,) float64 per-model Σ_rows ||x − mean||² (summed over dims)."""

    @classmethod
    def empty(cls, d_model: int) -> "NormStats":
        return cls(0, np.zeros((2, d_model)), np.zeros(2))

    @classmethod
    def of_rows(cls, rows: np.ndarray) -> "NormStats":
        """Exact statistics of `(n, 2, d)` float rows, merged block by block to bound memory."""
        stats = cls.empty(rows.shape[2])
        for start in range(0, len(rows), _STATS_BLOCK_ROWS):
            block = rows[start:start + _STATS_BLOCK_ROWS].astype(np.float64)
            mean = block.mean(axis=0)
            sq = ((block - mean) ** 2).sum(axis=(0, 2))
            stats = stats.merge(cls(len(block), mean, sq))
        return stats

    @classmethod
    def of_tensor(cls, rows: torch.Tensor) -> "NormStats":
        """`of_rows` on the rows' own device (torch float64, same blocks): mean and sq_dev_sum stay tensors
        there until `to_numpy`, so a harvest on a GPU never copies float64 rows to the host."""
        stats = cls(0, rows.new_zeros((2, rows.shape[2]), dtype=torch.float64),
                    rows.new_zeros(2, dtype=torch.float64))
        for start in range(0, len(rows), _STATS_BLOCK_ROWS):
            block = rows[start:start + _STATS_BLOCK_ROWS].double()
            mean = block.mean(dim=0)
            stats = stats.merge(cls(len(block), mean, ((block - mean) ** 2).sum(dim=(0, 2))))
        return stats

    def to_numpy(self) -> "NormStats":
        if isinstance(self.mean, torch.Tensor):
            return NormStats(self.count, self.mean.cpu().numpy(), self.sq_dev_sum.cpu().numpy())
        return self

    def merge(self, other: "NormStats") -> "NormStats":
        """Statistics of the union of two disjoint row sets (Chan, Golub & LeVeque)."""
        n = self.count + other.count
        if other.count == 0:
            return self
        if self.count == 0:
            return other
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.count / n)
        sq = self.sq_dev_sum + other.sq_dev_sum + (delta**2).sum(axis=1) * (self.count * other.count / n)
        return NormStats(n, mean, sq)

    @property
    def scale(self) -> np.ndarray:
        """(2,) float64 factor so that E||(x − mean)·scale||² = d_model per model."""
        d_model = self.mean.shape[1]
        return np.sqrt(d_model * self.count / np.maximum(self.sq_dev_sum, np.finfo(np.float64).tiny))

    def to_bytes(self) -> bytes:
        return safetensors.numpy.save({
            "count": np.array(self.count, dtype=np.int64), "mean": self.mean,
            "sq_dev_sum": self.sq_dev_sum, "scale": self.scale,
        })

    @classmethod
    def from_bytes(cls, data: bytes) -> "NormStats":
        t = safetensors.numpy.load(data)
        return cls(int(t["count"]), t["mean"], t["sq_dev_sum"])


# ---------------------------------------------------------------- locations and files


def layer_dir(layer: int) -> str:
    return f"layer_{layer:03d}"


@dataclass
class _Layer:
    """One layer's folder on a filesystem, with a redacted name for messages."""

    fs: pafs.FileSystem
    path: str
    name: str

    @classmethod
    def at(cls, uri: str, layer: int) -> "_Layer":
        fs, root = open_fs(uri)
        return cls(fs, f"{root}/{layer_dir(layer)}", f"{redact(uri).rstrip('/')}/{layer_dir(layer)}")

    def read(self, file: str) -> bytes:
        with self.fs.open_input_stream(f"{self.path}/{file}") as f:
            return f.read()

    def write_atomic(self, file: str, data: bytes) -> None:
        """Whole file or nothing (fs.write_file_atomic)."""
        write_file_atomic(self.fs, self.path, file, data)

    def read_manifest(self, file: str = MANIFEST) -> Manifest | None:
        try:
            text = self.read(file).decode()
        except FileNotFoundError:
            return None
        except NotADirectoryError:
            raise ValueError(f"{self.name}: a file stands where the store's folders go; expected a folder "
                             "(or nothing) at the store URI") from None
        return Manifest.from_json(text, f"{self.name}/{file}")


# ---------------------------------------------------------------- shard encoding


TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def _to_storage(block: np.ndarray | torch.Tensor, dtype: str) -> torch.Tensor:
    """`(n, 2, d)` rows → a contiguous torch tensor in the storage dtype (bf16 as its int16 bits), cast where
    the rows are: on their device for a tensor (a harvest on a GPU copies only stored bytes to the host),
    by numpy for numpy rows (as the store always rounded them)."""
    if isinstance(block, torch.Tensor):
        t = block.detach().to(TORCH_DTYPES[dtype]).contiguous()
        return t.view(torch.int16) if dtype == "bfloat16" else t
    if dtype == "bfloat16":
        return torch.from_numpy(np.asarray(block)).to(torch.bfloat16).contiguous().view(torch.int16)
    return torch.from_numpy(np.ascontiguousarray(block, dtype=STORAGE_DTYPES[dtype]))


def _stored_values(rows: torch.Tensor, dtype: str) -> torch.Tensor:
    """`_to_storage`'s output as the values it stands for (bf16 bits viewed as bf16)."""
    return rows.view(torch.bfloat16) if dtype == "bfloat16" else rows


def to_float(rows: np.ndarray, dtype: str) -> np.ndarray:
    """Stored rows → float32 numpy (bf16 bit patterns widened exactly)."""
    if dtype == "bfloat16":
        return (rows.astype(np.uint32) << 16).view(np.float32)
    return rows.astype(np.float32, copy=False)


def to_tensor(rows: np.ndarray, dtype: str) -> torch.Tensor:
    """Stored rows → a new float32 torch tensor (never a view of read-only Arrow memory)."""
    if dtype == "float32":
        return torch.from_numpy(np.array(rows))
    with warnings.catch_warnings():  # rows may be read-only Arrow memory: only the cast below reads it
        warnings.simplefilter("ignore", UserWarning)
        t = torch.from_numpy(rows)
    return (t.view(torch.bfloat16) if dtype == "bfloat16" else t).float()


def acts_column(rows: np.ndarray) -> pa.Array:
    """`(n, 2, d)` stored rows → the `acts` column: one fixed-size binary value per row, [x_A | x_B]."""
    rows = np.ascontiguousarray(rows)
    width = rows.itemsize * rows.shape[1] * rows.shape[2]
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), len(rows), [None, pa.py_buffer(rows)])


def acts_to_numpy(column: pa.ChunkedArray | pa.Array, d_model: int, dtype: str) -> np.ndarray:
    """The `acts` column → `(n, 2, d_model)` numpy in the storage dtype; a view for one chunk."""
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    np_dtype = np.dtype(STORAGE_DTYPES[dtype])
    width = 2 * d_model
    parts = [np.frombuffer(c.buffers()[1], np_dtype, count=len(c) * width, offset=c.offset * width * np_dtype.itemsize)
             for c in chunks if len(c)]
    if not parts:
        return np.empty((0, 2, d_model), np_dtype)
    return (parts[0] if len(parts) == 1 else np.concatenate(parts)).reshape(-1, 2, d_model)


def _encode(rows: np.ndarray, spec: StoreSpec) -> bytes:
    if spec.format == "safetensors":
        t = torch.from_numpy(rows)
        return safetensors.torch.save({"acts": t.view(torch.bfloat16) if spec.dtype == "bfloat16" else t})
    # One non-null FixedSizeBinary column: parquet stores it as FIXED_LEN_BYTE_ARRAY with no per-value
    # levels, so reading is a copy (a FixedSizeList<float16> column decodes repetition levels for every
    # element: >10× slower). No dictionary pages (near-unique values: ~5× slower reads), no statistics.
    schema = pa.schema([pa.field("acts", pa.binary(rows[0].nbytes), nullable=False,
                                 metadata={"dtype": spec.dtype, "shape": f"2,{spec.d_model}"})])
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_arrays([acts_column(rows)], schema=schema), sink, use_dictionary=False,
                   write_statistics=False, compression=spec.compression, row_group_size=len(rows))
    return sink.getvalue().to_pybytes()


def _decode(data: bytes, spec: StoreSpec) -> np.ndarray:
    """Shard bytes → `(rows, 2, d_model)` numpy in the storage dtype."""
    if spec.format == "safetensors":
        (_, t), = safetensors.deserialize(data)
        return np.frombuffer(t["data"], STORAGE_DTYPES[spec.dtype]).reshape(t["shape"])
    table = pq.read_table(pa.BufferReader(data), columns=["acts"])
    return acts_to_numpy(table.column("acts"), spec.d_model, spec.dtype)


def provenance_bytes(provenance: np.ndarray) -> bytes:
    """`(n, 2)` [record index, token position] rows → a safetensors sidecar (`record`, `position`, int32)."""
    return safetensors.numpy.save({"record": np.ascontiguousarray(provenance[:, 0], dtype=np.int32),
                                   "position": np.ascontiguousarray(provenance[:, 1], dtype=np.int32)})


def provenance_of(data: bytes) -> np.ndarray:
    """A provenance sidecar → `(n, 2)` int64 [record index, token position]."""
    t = safetensors.numpy.load(data)
    return np.stack([t["record"], t["position"]], axis=1).astype(np.int64)


def write_corpus(uri: str, token_ids: Sequence[Sequence[int]]) -> None:
    """The harvest's records' token ids, once at the store URI's root (every layer's rows point into it):
    one flat int32 array and each record's offset."""
    fs, root = open_fs(uri)
    lengths = np.array([len(ids) for ids in token_ids], dtype=np.int64)
    flat = np.fromiter((t for ids in token_ids for t in ids), dtype=np.int32, count=int(lengths.sum()))
    if isinstance(fs, pafs.LocalFileSystem):
        fs.create_dir(root, recursive=True)
    write_file_atomic(fs, root, CORPUS, safetensors.numpy.save(
        {"token_ids": flat, "offsets": np.concatenate([[0], np.cumsum(lengths)])}))


def read_corpus(uri: str) -> list[np.ndarray] | None:
    """Each record's token ids (`write_corpus`); None for a harvest that did not keep them."""
    fs, root = open_fs(uri)
    try:
        with fs.open_input_stream(f"{root}/{CORPUS}") as f:
            t = safetensors.numpy.load(f.read())
    except FileNotFoundError:
        return None
    offsets = t["offsets"]
    return [t["token_ids"][offsets[i]:offsets[i + 1]] for i in range(len(offsets) - 1)]


SAFETENSORS_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32"}
"""A safetensors header's dtype → the store's dtype name."""


def _shard_header(layer: _Layer, file: str, spec: StoreSpec) -> tuple[int, str | None]:
    """Row count and the dtype the shard itself records (None if it records none), from its
    header/footer alone (a few KiB read, even on S3)."""
    path = f"{layer.path}/{file}"
    with layer.fs.open_input_file(path) as f:
        if spec.format == "parquet":
            meta = pq.ParquetFile(f).metadata
            acts = meta.schema.to_arrow_schema().field("acts")
            expected = 2 * spec.d_model * np.dtype(STORAGE_DTYPES[spec.dtype]).itemsize
            if acts.type.byte_width != expected:
                raise ValueError(f"rows are {acts.type.byte_width} bytes wide, expected {expected} "
                                 f"(2 x d_model x {spec.dtype})")
            written = (acts.metadata or {}).get(b"dtype")
            return meta.num_rows, written.decode() if written is not None else None
        n = int.from_bytes(f.read(8), "little")
        if n > 1 << 20:
            raise ValueError(f"safetensors header of {n} bytes")
        header = json.loads(f.read(n))["acts"]
        if header["shape"][1:] != [2, spec.d_model]:
            raise ValueError(f"shape {header['shape']}, expected (rows, 2, {spec.d_model})")
        return header["shape"][0], SAFETENSORS_DTYPES.get(header["dtype"], header["dtype"])


# ---------------------------------------------------------------- writing


def part_name(part: int) -> str:
    """File-name prefix of one part of a harvest (written by one harvest actor)."""
    return f"part-{part:05d}"


class ShardWriter:
    """Appends `(n, 2, d_model)` row blocks of one layer and cuts them into atomic, recorded shards.

    Re-opening a store written with the same spec resumes it: the first `rows_done` rows appended are
    dropped (they are already in recorded shards), so replaying the whole harvest is idempotent. The
    harvest must replay rows in the same order; `harvest_hash` guards against different inputs.
    Use as a context manager: `close()` (on success only) writes the last short shard and marks the
    store complete; after a crash the store stays incomplete and readers refuse it.

    With `part`, the writer owns one part of the layer: its manifest is `part-00003.json` and its files
    `part-00003-shard-00000.parquet`, ..., so writers of different parts (different harvest actors) never
    touch the same file; `gather_parts` then makes the layer's manifest from the parts' in order.

    Encoding is vectorised where the rows are: a torch block is cast to the stored dtype on its device, its
    statistics are taken there (float64, per shard piece), and the stored bytes are copied once into the
    host buffer of the shard being filled.
    """

    def __init__(self, uri: str, spec: StoreSpec, part: int | None = None):
        self.spec = spec
        self.layer = _Layer.at(uri, spec.layer)
        self.prefix = "" if part is None else f"{part_name(part)}-"
        self.part = part
        self.manifest_file = MANIFEST if part is None else f"{part_name(part)}.json"
        if isinstance(self.layer.fs, pafs.LocalFileSystem):
            self.layer.fs.create_dir(self.layer.path, recursive=True)
        found = self.layer.read_manifest(self.manifest_file)
        if found is not None:
            for name in StoreSpec.__dataclass_fields__:
                old, new = getattr(found.spec, name), getattr(spec, name)
                if old != new:
                    raise ValueError(f"{self.layer.name}/{self.manifest_file}: {name} is {old!r} but the writer was "
                                     f"given {new!r}; resume with the same settings or write to a new store URI")
        self.manifest = found or Manifest(spec)
        self.stats = (NormStats.from_bytes(self.layer.read(self.manifest.norm_stats["file"]))
                      if self.manifest.norm_stats else NormStats.empty(spec.d_model))
        self._skip = self.manifest.total_rows
        self._buffer: np.ndarray | None = None  # the shard being filled, in the storage dtype
        self._provenance = np.empty((spec.shard_rows, 2), np.int64)  # its rows' [record, position]
        self._traced = True  # every row of the shard being filled came with its provenance
        self._filled = 0
        self._buffer_stats = NormStats.empty(spec.d_model)  # of the rows in the buffer

    @property
    def rows_done(self) -> int:
        """Rows in recorded shards: a harvester may `skip(rows_done)` instead of recomputing them."""
        return self.manifest.total_rows

    def skip(self, n: int) -> None:
        """Count `n` already-recorded rows as replayed without appending them."""
        if not 0 <= n <= self._skip:
            raise ValueError(f"ShardWriter.skip({n}): only {self._skip} recorded rows are left to skip")
        self._skip -= n

    def append(self, block: np.ndarray | torch.Tensor, provenance: np.ndarray | None = None) -> None:
        """Append `(n, 2, d_model)` rows; `provenance` `(n, 2)` gives each row's [record index, token
        position] (a shard records it only when all its rows came with one)."""
        shape = tuple(block.shape)
        if len(shape) != 3 or shape[1:] != (2, self.spec.d_model):
            raise ValueError(f"ShardWriter.append: block shape {shape}, expected (n, 2, {self.spec.d_model})")
        if provenance is not None and tuple(provenance.shape) != (shape[0], 2):
            raise ValueError(f"ShardWriter.append: provenance shape {tuple(provenance.shape)}, "
                             f"expected ({shape[0]}, 2)")
        skipped = min(self._skip, shape[0])
        self._skip -= skipped
        if skipped == shape[0]:
            return
        if self.manifest.complete:
            raise ValueError(f"{self.layer.name}: store is complete with {self.manifest.total_rows} rows; "
                             f"more rows were appended (different harvest? use a new store URI)")
        rows = _to_storage(block[skipped:], self.spec.dtype)
        if self._buffer is None:
            self._buffer = np.empty((self.spec.shard_rows, 2, self.spec.d_model), STORAGE_DTYPES[self.spec.dtype])
        host = torch.from_numpy(self._buffer.view(np.int16) if self.spec.dtype == "bfloat16" else self._buffer)
        start = 0
        while start < len(rows):
            piece = rows[start:start + self.spec.shard_rows - self._filled]
            self._buffer_stats = self._buffer_stats.merge(
                NormStats.of_tensor(_stored_values(piece, self.spec.dtype)))
            host[self._filled:self._filled + len(piece)].copy_(piece)  # the one device-to-host copy
            if provenance is None:
                self._traced = False
            else:
                first = skipped + start
                self._provenance[self._filled:self._filled + len(piece)] = provenance[first:first + len(piece)]
            self._filled += len(piece)
            start += len(piece)
            if self._filled == self.spec.shard_rows:
                self._flush()

    def close(self) -> Manifest:
        """Write the last (short) shard and mark the store complete; a no-op on a complete store."""
        if self.manifest.complete:
            return self.manifest
        if self._skip:
            raise ValueError(f"{self.layer.name}: the store already holds {self.manifest.total_rows} rows but only "
                             f"{self.manifest.total_rows - self._skip} were appended (a different harvest?)")
        if self._filled:
            self._flush()
        self.manifest.complete = True
        self._write_manifest(previous_stats=None)
        return self.manifest

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()

    def _flush(self) -> None:
        """Write the buffered rows as one shard, then record it (and the statistics of every recorded row)."""
        assert self._buffer is not None
        shard = self._buffer[:self._filled]
        index = len(self.manifest.shards)
        file = f"{self.prefix}shard-{index:05d}.{self.spec.format}"
        data = _encode(shard, self.spec)
        self.layer.write_atomic(file, data)
        self.stats = self.stats.merge(self._buffer_stats.to_numpy())
        self._filled, self._buffer_stats = 0, NormStats.empty(self.spec.d_model)
        previous = self.manifest.norm_stats
        stats_file = f"{self.prefix}norm-{index + 1:05d}.safetensors"
        self.layer.write_atomic(stats_file, self.stats.to_bytes())
        record = {"file": file, "rows": len(shard), "bytes": len(data), "crc32": f"{zlib.crc32(data):08x}"}
        if self._traced:
            record["provenance"] = f"{self.prefix}rows-{index:05d}.safetensors"
            self.layer.write_atomic(record["provenance"], provenance_bytes(self._provenance[:len(shard)]))
        self._traced = True
        self.manifest.shards.append(record if self.part is None else record | {"part": self.part})
        self.manifest.norm_stats = {"file": stats_file, "rows": self.stats.count}
        self._write_manifest(previous_stats=previous)

    def _write_manifest(self, previous_stats: dict | None) -> None:
        self.layer.write_atomic(self.manifest_file, self.manifest.to_json().encode())
        if previous_stats is not None:  # superseded sidecar; a leftover is harmless (unreferenced)
            self.layer.fs.delete_file(f"{self.layer.path}/{previous_stats['file']}")


def begin_parts(uri: str, spec: StoreSpec) -> None:
    """Before parts are written: a layer without a complete manifest gets an empty, incomplete one, so a
    reader refuses it as incomplete (not as missing) until `gather_parts` replaces it."""
    where = _Layer.at(uri, spec.layer)
    found = where.read_manifest()
    if found is None or not found.complete:
        if isinstance(where.fs, pafs.LocalFileSystem):
            where.fs.create_dir(where.path, recursive=True)
        where.write_atomic(MANIFEST, Manifest(spec).to_json().encode())


def gather_parts(uri: str, layer: int, parts: int) -> Manifest:
    """The layer's manifest made from its `parts` part manifests (`ShardWriter(part=...)`), in part order:
    their shards in sequence, their statistics merged (Chan et al.), marked complete. Every part must be
    complete; one that is not (or is missing: a store not shared by every harvest node) is named."""
    where = _Layer.at(uri, layer)
    manifests = []
    for part in range(parts):
        name = f"{where.name}/{part_name(part)}.json"
        manifest = where.read_manifest(f"{part_name(part)}.json")
        if manifest is None:
            raise FileNotFoundError(f"{name}: missing; the harvest actors write their own shards, so the store "
                                    "must be one every node of the cluster reaches (s3:// or a shared folder)")
        if not manifest.complete:
            raise ValueError(f"{name}: incomplete part ({manifest.total_rows} rows); re-run the harvest to resume it")
        manifests.append(manifest)
    stats = NormStats.empty(manifests[0].spec.d_model)
    for manifest in manifests:
        if manifest.norm_stats is not None:
            stats = stats.merge(NormStats.from_bytes(where.read(manifest.norm_stats["file"])))
    gathered = Manifest(manifests[0].spec, [shard for m in manifests for shard in m.shards], complete=True)
    stats_file = f"norm-{len(gathered.shards):05d}.safetensors"
    where.write_atomic(stats_file, stats.to_bytes())
    gathered.norm_stats = {"file": stats_file, "rows": stats.count}
    where.write_atomic(MANIFEST, gathered.to_json().encode())
    return gathered


# ---------------------------------------------------------------- validation and reading


def check_store_root(uri: str) -> None:
    """A local store root that is a file, or lies under one, refused in one line before any work (the
    harvest would load the pair first and then fail in pyarrow); other URIs are left to their reads."""
    fs, root = open_fs(uri)
    if not isinstance(fs, pafs.LocalFileSystem):
        return
    existing = next(p for p in (Path(root), *Path(root).parents) if p.exists())  # "/" exists
    if not existing.is_dir():
        raise ValueError(f"store {redact(uri)!r}: {existing} is a file; expected a folder (created if missing)")


def read_manifest(uri: str, layer: int) -> Manifest:
    where = _Layer.at(uri, layer)
    manifest = where.read_manifest()
    if manifest is None:
        raise FileNotFoundError(f"{where.name}/{MANIFEST}: no activation store for layer {layer} (not harvested?)")
    return manifest


def load_norm_stats(uri: str, layer: int) -> NormStats:
    """The normalization statistics of a complete, validated layer."""
    manifest = validate_store(uri, layer)
    return NormStats.from_bytes(_Layer.at(uri, layer).read(manifest.norm_stats["file"]))


class BadShard(ValueError):
    """A recorded shard that is missing or whose bytes do not match the manifest (size, rows, crc32);
    `index` is its position in the manifest, so the store's owner can re-harvest from there."""

    def __init__(self, message: str, index: int):
        super().__init__(message)
        self.index = index


_CRC_CHUNK = 8 << 20  # bytes per read while checksumming: bounds memory, large enough for S3
_VERIFIED: set[tuple[str, int, str]] = set()
"""(uri, layer, crc32 of the manifest) of layers whose shards this process has checksummed: a reader
pays the full check once per store and layer, and a rewritten manifest is checked again."""


def shard_crc32(layer: "_Layer", file: str) -> str:
    """crc32 of a shard file, streamed in chunks (never holds a whole shard)."""
    crc = 0
    with layer.fs.open_input_stream(f"{layer.path}/{file}") as f:
        while chunk := f.read(_CRC_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def validate_store(uri: str, layer: int, *, d_model: int | None = None, models: Sequence[str] | None = None,
                   checksum: bool = True) -> Manifest:
    """Check a layer before training on it; the first problem found raises ONE ValueError naming it.

    Compares the manifest with the crosscoder's expectations (layer, d_model, model names), refuses an
    incomplete store, and checks that every recorded shard exists with its recorded size and row count
    (header/footer reads) and, when `checksum`, its crc32 (a full read, once per process for a given
    manifest: docs/BENCHMARKS.md has its cost). A bad shard raises `BadShard`. Unrecorded files are
    ignored.
    """
    where = _Layer.at(uri, layer)
    manifest = read_manifest(uri, layer)
    spec, name = manifest.spec, f"{where.name}/{MANIFEST}"
    expected = {"layer": layer, "d_model": d_model, "models": tuple(models) if models is not None else None}
    for key, want in expected.items():
        if want is not None and getattr(spec, key) != want:
            raise ValueError(f"{name}: {key} is {getattr(spec, key)!r} but the crosscoder expects {want!r}")
    if not manifest.complete:
        raise ValueError(f"{name}: incomplete store ({manifest.total_rows} rows in {len(manifest.shards)} shards, "
                         f"writer never closed); re-run the harvest to resume it")
    stats = manifest.norm_stats
    if manifest.total_rows == 0 or stats is None or stats["rows"] != manifest.total_rows:
        raise ValueError(f"{name}: normalization statistics cover {stats and stats['rows']} rows, "
                         f"expected {manifest.total_rows} (> 0)")
    sizes = {os.path.basename(i.path): i.size for i in where.fs.get_file_info(pafs.FileSelector(where.path))
             if i.type == pafs.FileType.File}
    if stats["file"] not in sizes:
        raise ValueError(f"{where.name}/{stats['file']}: missing (the manifest records it for {stats['rows']} rows)")
    key = (uri, layer, f"{zlib.crc32(manifest.to_json().encode()):08x}")
    for index, rec in enumerate(manifest.shards):
        path = f"{where.name}/{rec['file']}"
        if rec["file"] not in sizes:
            raise BadShard(f"{path}: missing (the manifest records it with {rec['rows']} rows)", index)
        if sizes[rec["file"]] != rec["bytes"]:
            raise BadShard(f"{path}: {sizes[rec['file']]} bytes on storage but the manifest records "
                           f"{rec['bytes']} (truncated or overwritten)", index)
        try:
            rows, written = _shard_header(where, rec["file"], spec)
        except (OSError, ValueError, pa.ArrowException, KeyError, json.JSONDecodeError) as err:
            raise BadShard(f"{path}: corrupt shard ({err})", index) from None
        if rows != rec["rows"]:
            raise BadShard(f"{path}: {rows} rows but the manifest records {rec['rows']}", index)
        if written is not None and written != spec.dtype:  # same width, other numbers: never read it as this
            raise ValueError(f"{name}: dtype is {spec.dtype!r} but {rec['file']} was written as {written!r}; "
                             "expected the manifest to describe its shards (edited by hand?)")
        if checksum and key not in _VERIFIED and (crc := shard_crc32(where, rec["file"])) != rec["crc32"]:
            raise BadShard(f"{path}: corrupt shard (crc32 {crc}, the manifest records {rec['crc32']}); "
                           f"re-run the harvest to rewrite it", index)
    if checksum:
        _VERIFIED.add(key)
    return manifest


UNIT_ROUNDOFF = {"float16": 2.0 ** -11, "bfloat16": 2.0 ** -8, "float32": 2.0 ** -24}
"""Half an ulp at 1.0 of each store dtype: the most one rounding to it moves a value, relative."""
COMPUTE_DRIFT = 1e-5
"""How far float32 forward passes of one pair on different hardware may drift apart, relative to the row's
RMS (kernels that sum in another order; measured ≤ 3e-7 between thread counts on the test pairs)."""


@dataclass(frozen=True)
class LayerComparison:
    """How two harvests of one layer compare (`compare_layers`)."""

    rows: int
    identical: bool
    """Every shard has the same crc32: the same bytes."""
    worst: float
    """The largest |a − b| over its tolerance among all values (0 when identical; ≤ 1 within tolerance)."""


def compare_layers(uri_a: str, uri_b: str, layer: int, *, drift: float = COMPUTE_DRIFT) -> LayerComparison:
    """Two harvests of one layer made from the same inputs, e.g. on different machines: a one-line ValueError
    unless the layout is equal (every shard's file, rows and part) and every value agrees within
    `2·u·|b| + drift·rms(b's row)` — `u` the store dtype's unit roundoff (each side rounded once), `drift`
    the float32 computation's (COMPUTE_DRIFT). On one machine with the same settings a harvest's bytes are
    equal (docs/store.md, "What one content hash promises"); this is the promise across hardware."""
    a, b = validate_store(uri_a, layer), validate_store(uri_b, layer)
    where = f"{redact(uri_a)} vs {redact(uri_b)}, {layer_dir(layer)}"
    if a.spec.dtype != b.spec.dtype or a.spec.d_model != b.spec.d_model:
        raise ValueError(f"{where}: dtype/d_model {a.spec.dtype}/{a.spec.d_model} vs {b.spec.dtype}/{b.spec.d_model}; "
                         "expected harvests of the same settings")
    layout = [[(s["file"], s["rows"], s.get("part")) for s in m.shards] for m in (a, b)]
    if layout[0] != layout[1]:
        first = next((i for i, (x, y) in enumerate(zip(*layout, strict=False)) if x != y), min(map(len, layout)))
        raise ValueError(f"{where}: layouts differ at shard {first} ({len(layout[0])} vs {len(layout[1])} shards); "
                         "expected the same shards, rows and parts")
    if [s["crc32"] for s in a.shards] == [s["crc32"] for s in b.shards]:
        return LayerComparison(a.total_rows, True, 0.0)
    u, worst, row = UNIT_ROUNDOFF[a.spec.dtype], 0.0, 0
    in_order = [_layer_batches(uri, m, 4096, False, None, 1, False) for uri, m in ((uri_a, a), (uri_b, b))]
    for x, y in zip(*in_order, strict=True):
        rms = y.pow(2).mean(dim=-1, keepdim=True).sqrt()
        excess = (x - y).abs() / (2 * u * y.abs() + drift * rms).clamp_min(torch.finfo(torch.float32).tiny)
        if excess.max().item() > 1:
            bad = int(excess.amax(dim=(1, 2)).argmax())
            raise ValueError(f"{where}: row {row + bad} differs by {(x - y)[bad].abs().max().item():.3g}, beyond the "
                             f"tolerance 2·{u:.3g}·|b| + {drift:g}·rms(row); expected the same activations")
        worst, row = max(worst, excess.max().item()), row + len(x)
    return LayerComparison(a.total_rows, False, worst)


def drop_shards_from(uri: str, layer: int, index: int) -> None:
    """Forget shard `index` of the layer's manifest (a bad shard found on reuse) and every later shard its
    writer wrote, so that writer, re-opened, resumes from there and rewrites them: its manifest keeps the
    verified shards before it, gets statistics refitted from those, and is marked incomplete. For a part's
    shard that is the part's manifest, and the layer's gathered manifest is removed (`gather_parts` makes it
    again once the part is complete)."""
    where = _Layer.at(uri, layer)
    manifest = read_manifest(uri, layer)
    part = manifest.shards[index].get("part")
    if part is None:
        _truncate(where, MANIFEST, manifest, index, "")
        return
    own = where.read_manifest(f"{part_name(part)}.json")
    bad = manifest.shards[index]["file"]
    local = next((i for i, rec in enumerate(own.shards) if rec["file"] == bad), None) if own else None
    if own is None or local is None:
        raise ValueError(f"{where.name}/{part_name(part)}.json: does not record {bad}, which {MANIFEST} has from it")
    _truncate(where, f"{part_name(part)}.json", own, local, f"{part_name(part)}-")
    where.fs.delete_file(f"{where.path}/{MANIFEST}")


def _truncate(where: _Layer, file: str, manifest: Manifest, index: int, prefix: str) -> None:
    """`file` (a manifest) keeps its shards before `index`, with statistics refitted from them, incomplete."""
    kept = manifest.shards[:index]
    stats = NormStats.empty(manifest.spec.d_model)
    for rec in kept:
        stats = stats.merge(NormStats.of_rows(to_float(_decode(where.read(rec["file"]), manifest.spec),
                                                       manifest.spec.dtype)))
    manifest.shards, manifest.complete, manifest.norm_stats = kept, False, None
    if kept:
        stats_file = f"{prefix}norm-{len(kept):05d}.safetensors"
        where.write_atomic(stats_file, stats.to_bytes())
        manifest.norm_stats = {"file": stats_file, "rows": stats.count}
    where.write_atomic(file, manifest.to_json().encode())


def _batches(chunks: Iterator[np.ndarray], batch_size: int, drop_last: bool) -> Iterator[np.ndarray]:
    """Re-cut a stream of row arrays into `batch_size` batches (the last may be short)."""
    carry: list[np.ndarray] = []
    held = 0
    for rows in chunks:
        carry.append(rows)
        held += len(rows)
        if held < batch_size:
            continue
        rows = np.concatenate(carry)
        cut = len(rows) - len(rows) % batch_size
        yield from np.split(rows[:cut], cut // batch_size)
        carry, held = [rows[cut:]], len(rows) - cut
    if held and not drop_last:
        yield np.concatenate(carry)


def check_full_batch(manifest: Manifest, uri: str, batch_size: int, drop_last: bool) -> None:
    """A reader that drops short batches over a layer holding fewer rows than one batch would yield
    nothing, epoch after epoch, while a trainer waits forever: refused in one line instead. Both readers
    (and so every trial, `dfc-ray train` and the ablation's twins) pass here before their first batch."""
    if drop_last and manifest.total_rows < batch_size:
        raise ValueError(f"{redact(uri).rstrip('/')}/{layer_dir(manifest.spec.layer)}: {manifest.total_rows} rows, "
                         f"fewer than one batch of {batch_size}; expected a larger harvest or a smaller batch_size")


def iter_layer_batches(uri: str, layer: int, batch_size: int, *, shuffle: bool = False, seed: int | None = None,
                       epochs: int = 1, drop_last: bool = False, d_model: int | None = None,
                       models: Sequence[str] | None = None) -> Iterator[torch.Tensor]:
    """Plain local iterator (pyarrow only, no Ray): `(batch, 2, d_model)` float32 tensors.

    In order by default; `shuffle` permutes the shard order and the rows inside each shard per epoch.
    The store is validated when this is called, before the first batch is asked for.
    """
    manifest = validate_store(uri, layer, d_model=d_model, models=models)
    check_full_batch(manifest, uri, batch_size, drop_last)
    return _layer_batches(uri, manifest, batch_size, shuffle, seed, epochs, drop_last)


def _layer_batches(uri: str, manifest: Manifest, batch_size: int, shuffle: bool, seed: int | None, epochs: int,
                   drop_last: bool) -> Iterator[torch.Tensor]:
    where, spec = _Layer.at(uri, manifest.spec.layer), manifest.spec
    rng = np.random.default_rng(seed)

    def epoch_rows() -> Iterator[np.ndarray]:
        order = rng.permutation(len(manifest.shards)) if shuffle else range(len(manifest.shards))
        for i in order:
            rows = _decode(where.read(manifest.shards[i]["file"]), spec)
            yield rows[rng.permutation(len(rows))] if shuffle else rows

    for _ in range(epochs):
        for rows in _batches(epoch_rows(), batch_size, drop_last):
            yield to_tensor(rows, spec.dtype)


def iter_shards(uri: str, layer: int) -> Iterator[tuple[torch.Tensor, np.ndarray | None]]:
    """A validated layer shard by shard, in manifest order (the order rows were harvested): `(rows, 2,
    d_model)` float32 and each row's [record index, token position] (None for a store without provenance,
    `Manifest.has_provenance`). Feature cards stream a layer through it once."""
    manifest = validate_store(uri, layer)
    where, spec = _Layer.at(uri, layer), manifest.spec
    for shard in manifest.shards:
        rows = to_tensor(_decode(where.read(shard["file"]), spec), spec.dtype)
        yield rows, provenance_of(where.read(shard["provenance"])) if "provenance" in shard else None


def layer_dataset(uri: str, layer: int, *, shuffle: bool = True, seed: int | None = None,
                  d_model: int | None = None, models: Sequence[str] | None = None,
                  override_num_blocks: int | None = None, num_cpus: float | None = None) -> "ray.data.Dataset":  # noqa: F821
    """A validated layer as a Ray Dataset with one `acts` column (see `acts_column`; `acts_to_numpy`).

    `shuffle` reorders the shard files (differently on each execution; reproducibly from `seed`).
    Only the manifest's shards are read, never a directory listing. `num_cpus` per read task: inside
    Tune trials keep CPUs free for these tasks or they wait forever.
    """
    # deferred: Ray Data loads only for a Ray reader
    import ray.data

    manifest = validate_store(uri, layer, d_model=d_model, models=models)
    spec = manifest.spec
    fs, root = open_fs(uri)
    paths = [f"{root}/{layer_dir(layer)}/{s['file']}" for s in manifest.shards]
    files = ray.data.FileShuffleConfig(seed=seed) if shuffle else None
    args = {"filesystem": fs, "shuffle": files, "override_num_blocks": override_num_blocks, "num_cpus": num_cpus}
    if spec.format == "parquet":
        return ray.data.read_parquet(paths, **args)
    return ray.data.read_binary_files(paths, **args).map_batches(
        _SafetensorsToArrow(spec), batch_format="pyarrow", batch_size=None, num_cpus=num_cpus)


@dataclass
class _SafetensorsToArrow:
    """Ray Data UDF: a batch of safetensors shard files → the parquet shards' `acts` column layout."""

    spec: StoreSpec

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = [_decode(b.as_py(), self.spec) for b in batch.column("bytes")]
        return pa.table({"acts": acts_column(np.concatenate(rows))})


def iter_ray_batches(uri: str, layer: int, batch_size: int, *, epochs: int | None = 1, seed: int | None = None,
                     shuffle: bool = True, local_shuffle_buffer_size: int | None = None, drop_last: bool = False,
                     prefetch_batches: int = 2, **dataset_args) -> Iterator[torch.Tensor]:
    """The trainer's input through Ray Data: `(batch, 2, d_model)` float32 tensors, `epochs` passes
    (None: forever), files reshuffled and rows mixed in a local buffer each epoch when `shuffle`.
    `dataset_args` go to `layer_dataset` (d_model/models to validate against, read settings)."""
    check_full_batch(read_manifest(uri, layer), uri, batch_size, drop_last)  # the rest is checked by layer_dataset
    return _ray_batches(uri, layer, batch_size, epochs, seed, shuffle, local_shuffle_buffer_size, drop_last,
                        prefetch_batches, dataset_args)


def _ray_batches(uri: str, layer: int, batch_size: int, epochs: int | None, seed: int | None, shuffle: bool,
                 local_shuffle_buffer_size: int | None, drop_last: bool, prefetch_batches: int,
                 dataset_args: dict) -> Iterator[torch.Tensor]:
    # deferred: Ray Data loads only for a Ray reader
    from ray.data.collate_fn import ArrowBatchCollateFn

    ds = layer_dataset(uri, layer, shuffle=shuffle, seed=seed, **dataset_args)
    spec = read_manifest(uri, layer).spec

    class ActsCollate(ArrowBatchCollateFn):
        """Arrow batch → `(n, 2, d_model)` float32 tensor: a numpy view of the list values, one cast."""

        def __call__(self, batch: pa.Table) -> torch.Tensor:
            return to_tensor(acts_to_numpy(batch.column("acts"), spec.d_model, spec.dtype), spec.dtype)

    epoch = 0
    while epochs is None or epoch < epochs:
        yield from ds.iter_torch_batches(
            batch_size=batch_size, collate_fn=ActsCollate(), drop_last=drop_last, prefetch_batches=prefetch_batches,
            local_shuffle_buffer_size=local_shuffle_buffer_size if shuffle else None,
            local_shuffle_seed=None if seed is None else seed + epoch)
        epoch += 1
