"""Files on a plain path, file:// or s3://: the one place that opens filesystems.

The activation store, run folders, reports and plans all read and write through these helpers, so
S3 settings and credential redaction live here once. Endpoint and credentials come from the standard
AWS environment/config (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, instance roles, …) and never enter a
path, a file or a message.
"""

from __future__ import annotations

import os
import re
import uuid
from pathlib import Path

import pyarrow.fs as pafs


def redact(uri: str) -> str:
    """The URI without any `user:secret@` part, safe for messages and logs."""
    return re.sub(r"^([a-z0-9]+://)[^/@]*@", r"\1", uri)


def open_fs(uri: str) -> tuple[pafs.FileSystem, str]:
    """pyarrow filesystem + path for a plain path, file:///… or s3://bucket/prefix."""
    if uri.startswith(("s3://", "file://")):
        fs, path = pafs.FileSystem.from_uri(uri)
    elif "://" in uri:
        raise ValueError(f"store uri {redact(uri)!r}: expected a plain path, file:///path or s3://bucket/prefix")
    else:
        fs, path = pafs.LocalFileSystem(), os.path.abspath(uri)
    return fs, path.rstrip("/")


def s3fs_client():
    """s3fs client for writes, built from the current AWS environment (not fsspec's instance cache)."""
    import s3fs  # deferred: only S3 runs need it

    return s3fs.S3FileSystem(skip_instance_cache=True)


def write_file_atomic(fs: pafs.FileSystem, folder: str, file: str, data: bytes) -> None:
    """Whole file or nothing at `folder/file`: a local file goes to a temp name, then is renamed; on
    S3 an object appears only once its PUT completes (s3fs sends one PUT below 100 MiB, a multipart
    upload above, which S3 also publishes only when complete)."""
    target = f"{folder}/{file}"
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = f"{folder}/.{file}.tmp-{uuid.uuid4().hex}"
        with fs.open_output_stream(tmp) as f:
            f.write(data)
        fs.move(tmp, target)
    else:
        s3fs_client().pipe_file(target, data)


def absolute(uri: str) -> str:
    """A local path made absolute (trials run in their own working directories); URIs unchanged."""
    return uri if "://" in uri else os.path.abspath(uri)


class RunFolder:
    """Small text files of a run on a local path or s3:// (credentials never enter paths or logs)."""

    def __init__(self, uri: str):
        self.uri = uri.rstrip("/")
        self.fs, self.root = open_fs(self.uri)
        if self.is_local:
            Path(self.root).mkdir(parents=True, exist_ok=True)

    @property
    def is_local(self) -> bool:
        return not self.uri.startswith("s3://")

    def path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def read_text(self, name: str) -> str | None:
        try:
            with self.fs.open_input_stream(self.path(name)) as handle:
                return handle.read().decode()
        except FileNotFoundError:
            return None

    def write_text(self, name: str, text: str | bytes) -> None:
        """Whole file or nothing (temp + rename locally, one PUT on S3)."""
        folder, _, base = self.path(name).rpartition("/")
        if self.is_local:
            Path(folder).mkdir(parents=True, exist_ok=True)
        write_file_atomic(self.fs, folder, base, text.encode() if isinstance(text, str) else text)

    def upload_dir(self, local: Path, name: str = "") -> str:
        """Copy a local folder's files (a checkpoint, report files) to <run>/<name>; returns its URI."""
        for file in sorted(p for p in local.iterdir() if p.is_file()):
            self.write_text(f"{name}/{file.name}" if name else file.name, file.read_bytes())
        return f"{self.uri}/{name}" if name else self.uri
