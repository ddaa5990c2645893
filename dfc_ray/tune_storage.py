"""Where Ray Tune keeps a sweep's experiment state (`RunConfig.storage_path/storage_filesystem`),
and the Optuna journal of an S3 run folder.

Tune writes through pyarrow. For s3:// it would build pyarrow's native S3 filesystem, whose
multipart upload of Tune's empty `.validate_storage_marker` fails against some S3 implementations
(moto answers `CompleteMultipartUpload … INTERNAL_FAILURE`), so a run folder on S3 never started.
We hand Tune the same s3fs client the store and run folder already write with (one PUT per small
file, the AWS environment's endpoint and credentials), wrapped as a pyarrow filesystem; the storage
path is then bucket-relative. Tune pickles the filesystem into every trial, and s3fs clients
pickle by their arguments, so each node builds its own client from its own AWS environment.

Optuna's journal backend needs a local file (append + lock). For an S3 run the journal lives in
`<run>/optuna.journal`: a resumed driver (a new job, maybe on another machine) downloads it, and
the searcher uploads it after every finished trial, so the study survives the driver's machine.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pyarrow.fs as pafs

from dfc_ray.fs import RunFolder, s3fs_client

JOURNAL = "optuna.journal"


def tune_storage(run_uri: str) -> tuple[str, pafs.FileSystem | None]:
    """(storage_path, storage_filesystem) for Tune: a local path as is (Tune's own local
    filesystem), an s3://bucket/prefix as `bucket/prefix` on a pyarrow view of the s3fs client."""
    if not run_uri.startswith("s3://"):
        return run_uri, None
    return run_uri.removeprefix("s3://").rstrip("/"), pafs.PyFileSystem(pafs.FSSpecHandler(s3fs_client()))


def local_journal(run: RunFolder) -> Path:
    """The journal file the Optuna study appends to: in the run folder when it is local, else a
    fresh local copy of `<run>/optuna.journal` (empty when the run has none yet)."""
    if run.is_local:
        return Path(run.path(JOURNAL))
    copy = Path(tempfile.mkdtemp(prefix="dfc-ray-optuna-")) / JOURNAL
    copy.write_bytes((run.read_text(JOURNAL) or "").encode())
    return copy


class JournalUploader:
    """Copies the local journal of an S3 run back to `<run>/optuna.journal` (one PUT of a few kB).
    The searcher calls it right after the study records a finished trial (sweep/search.py), so a
    killed driver loses at most the trials still running, and the copy never lags results.jsonl."""

    def __init__(self, run_uri: str, journal: Path) -> None:
        self.run_uri, self.journal = run_uri, journal

    def __call__(self) -> None:
        RunFolder(self.run_uri).write_text(JOURNAL, self.journal.read_bytes())
