"""Files on a plain path, file:// or s3://: the one place that opens filesystems.

The activation store, run folders, reports and plans all read and write through these helpers, so
S3 settings and credential redaction live here once. Endpoint and credentials come from the standard
AWS environment/config (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, instance roles, …) and never enter a
path, a file or a message.

Every S3 client made here (pyarrow's, s3fs's, the one Tune writes through) has connect and read
timeouts and a bounded retry (`S3Settings`, from DFC_RAY_S3_TIMEOUT / DFC_RAY_S3_ATTEMPTS), and
`storage_failure` turns what those clients raise into one line naming the endpoint.

A run folder has one driver at a time: `dfc_ray.sweep.lease.RunLease` (lease.json, written through
`s3_object_client` on S3 for its conditional writes).
"""

from __future__ import annotations

import errno
import functools
import os
import posixpath
import re
import sys
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import pyarrow.fs as pafs

TIMEOUT_ENV = "DFC_RAY_S3_TIMEOUT"
ATTEMPTS_ENV = "DFC_RAY_S3_ATTEMPTS"
_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID")


@dataclass(frozen=True)
class S3Settings:
    """How this process reaches S3: read from the environment each time a client is made."""

    endpoint: str | None
    """AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL (e.g. http://127.0.0.1:9000); None: AWS itself."""
    region: str | None
    """AWS_REGION or AWS_DEFAULT_REGION; None: resolved from the bucket (AWS) or us-east-1 (endpoint)."""
    timeout: float = 5.0
    """Seconds to connect, and seconds without a byte before a request is abandoned (DFC_RAY_S3_TIMEOUT).
    With 3 attempts a server that accepts and never answers is given up after ~17 s (docs/failure-modes.md)."""
    attempts: int = 3
    """Tries per request, the first included, with the SDKs' standard backoff (DFC_RAY_S3_ATTEMPTS)."""

    @classmethod
    def from_env(cls) -> "S3Settings":
        env = os.environ
        try:
            timeout = float(env.get(TIMEOUT_ENV, cls.timeout))
            attempts = int(env.get(ATTEMPTS_ENV, cls.attempts))
        except ValueError:
            raise ValueError(f"{TIMEOUT_ENV}={env.get(TIMEOUT_ENV)!r}, {ATTEMPTS_ENV}={env.get(ATTEMPTS_ENV)!r}: "
                             "expected seconds > 0 and an integer >= 1") from None
        if not (timeout > 0 and attempts >= 1):
            raise ValueError(f"{TIMEOUT_ENV}={timeout:g}, {ATTEMPTS_ENV}={attempts}: expected seconds > 0 and >= 1")
        return cls(env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None,
                   env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or None, timeout, attempts)

    @property
    def where(self) -> str:
        """The endpoint for messages (credentials never appear in it)."""
        return redact(self.endpoint) if self.endpoint else f"AWS S3 ({self.region or 'region of the bucket'})"

    def pyarrow_fs(self, bucket: str, access_key: str | None = None, secret_key: str | None = None
                   ) -> pafs.S3FileSystem:
        """pyarrow's S3 client for `bucket`; keys given only when the URI carried them."""
        endpoint = urlparse(self.endpoint) if self.endpoint else None
        region = self.region or ("us-east-1" if endpoint else _bucket_region(bucket))
        return pafs.S3FileSystem(
            access_key=access_key, secret_key=secret_key, region=region,
            endpoint_override=endpoint.netloc if endpoint else None, scheme=endpoint.scheme if endpoint else "https",
            connect_timeout=self.timeout, request_timeout=self.timeout,
            retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=self.attempts))

    def require_credentials(self, uri: str) -> None:
        """Refuse early, in one line, when no AWS credentials can be found at all (env, profile,
        instance role): otherwise the SDKs send unsigned requests and fail later, less clearly."""
        if not _have_credentials(tuple(os.environ.get(k, "") for k in (*_SECRET_ENV, "AWS_PROFILE"))):
            raise ValueError(f"{redact(uri)}: no AWS credentials found for S3 endpoint {self.where}; expected "
                             "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or an instance role")


@functools.lru_cache(maxsize=8)
def _have_credentials(env_key: tuple[str, ...]) -> bool:
    """botocore's credential chain (env, config files, instance metadata: 1 s timeout), once per
    distinct credential environment."""
    import botocore.session  # deferred: only S3 runs need it

    return botocore.session.get_session().get_credentials() is not None


@functools.lru_cache(maxsize=64)
def _bucket_region(bucket: str) -> str:
    return pafs.resolve_s3_region(bucket)


def storage_failure(err: BaseException) -> str | None:
    """One line for an S3 failure raised by pyarrow or botocore/s3fs (endpoint named, secrets
    scrubbed), or None when `err` is not one: the CLI prints it instead of a traceback."""
    text = str(err)
    botocore_error = "botocore" in sys.modules and isinstance(err, sys.modules["botocore"].exceptions.BotoCoreError)
    if not (botocore_error or (isinstance(err, OSError) and ("AWS Error" in text or "curlCode" in text))):
        return None
    settings = S3Settings.from_env()
    if "curlCode: 28" in text or "Timeout" in type(err).__name__ or "timed out" in text.lower():
        problem = f"not answering (no reply within {settings.timeout:g} s, {settings.attempts} attempts; {TIMEOUT_ENV})"
    elif "curlCode: 7" in text or "Could not connect" in text or "EndpointConnectionError" in type(err).__name__:
        problem = "unreachable (connection refused or no route)"
    elif any(word in text for word in ("ACCESS_DENIED", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                                       "NoCredentials")) or "Credentials" in type(err).__name__:
        problem = "refused the credentials"
    else:
        problem = "failed"
    detail = text.splitlines()[0] if text else type(err).__name__
    for name in _SECRET_ENV:
        if secret := os.environ.get(name):
            detail = detail.replace(secret, "***")
    return f"S3 endpoint {settings.where} {problem}: {detail[:300]}"


def redact(uri: str) -> str:
    """The URI without any `user:secret@` part, safe for messages and logs."""
    return re.sub(r"^([a-z0-9]+://)[^/@]*@", r"\1", uri)


def open_fs(uri: str) -> tuple[pafs.FileSystem, str]:
    """pyarrow filesystem + path for a plain path, file:///… or s3://bucket/prefix."""
    if uri.startswith("s3://"):
        settings = S3Settings.from_env()
        path = uri[len("s3://"):]
        netloc, slash, rest = path.partition("/")
        user, _, bucket = netloc.rpartition("@")  # s3://key:secret@bucket/… is accepted, never echoed
        path = bucket + slash + rest
        if not user:
            settings.require_credentials(uri)
        key, _, secret = (unquote(part) for part in user.partition(":"))
        fs = settings.pyarrow_fs(bucket, key or None, secret or None)
    elif uri.startswith("file://"):
        fs, path = pafs.FileSystem.from_uri(uri)
    elif "://" in uri:
        raise ValueError(f"store uri {redact(uri)!r}: expected a plain path, file:///path or s3://bucket/prefix")
    else:
        fs, path = pafs.LocalFileSystem(), os.path.abspath(uri)
    return fs, path.rstrip("/")


def s3fs_client():
    """s3fs client for writes, built from the current AWS environment (not fsspec's instance cache)."""
    import s3fs  # deferred: only S3 runs need it

    settings = S3Settings.from_env()
    retries = {"max_attempts": settings.attempts, "mode": "standard"}
    client = s3fs.S3FileSystem(skip_instance_cache=True, config_kwargs={
        "connect_timeout": settings.timeout, "read_timeout": settings.timeout, "retries": retries})
    client.retries = 1  # botocore retries (bounded above); s3fs's own loop would multiply them
    return client


def s3_object_client(uri: str) -> tuple[Any, str, str]:
    """A plain botocore S3 client (the `S3Settings` endpoint, timeouts and retries; keys from the URI when it
    carries them) and the bucket and key `uri` names: for the requests pyarrow and s3fs do not offer, such as
    conditional writes (If-Match / If-None-Match)."""
    import botocore.config  # deferred: only S3 runs need botocore

    settings = S3Settings.from_env()
    netloc, _, key = uri[len("s3://"):].partition("/")
    user, _, bucket = netloc.rpartition("@")
    if not user:
        settings.require_credentials(uri)
    access, _, secret = (unquote(part) for part in user.partition(":"))
    config = botocore.config.Config(connect_timeout=settings.timeout, read_timeout=settings.timeout,
                                    retries={"max_attempts": settings.attempts, "mode": "standard"})
    region = settings.region or ("us-east-1" if settings.endpoint else _bucket_region(bucket))
    with _SESSION_LOCK:  # a botocore session makes one client at a time
        client = _botocore_session().create_client(
            "s3", endpoint_url=settings.endpoint, region_name=region, aws_access_key_id=access or None,
            aws_secret_access_key=secret or None, config=config)
    return client, bucket, key.strip("/")


_SESSION_LOCK = threading.Lock()


@functools.lru_cache(maxsize=1)
def _botocore_session():
    """One botocore session per process: loading its service models costs about a second."""
    import botocore.session  # deferred: only S3 runs need botocore

    return botocore.session.get_session()


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


def within(uri: str, root: str) -> bool:
    """Whether `uri` lies in `root` (or is it): local paths resolved (no `..`, no symlink out), S3 keys
    normalised, credentials ignored. Paths a file names (results.jsonl) are data: this keeps them inside the
    storage a command was given."""
    def resolved(u: str) -> str:
        u = redact(u)
        if u.startswith("s3://"):
            return "s3://" + posixpath.normpath(u[len("s3://"):])
        return os.path.realpath(unquote(urlparse(u).path) if u.startswith("file://") else u)

    target, base = resolved(uri), resolved(root)
    return target == base or target.startswith(base.rstrip("/") + "/")


UNWRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)
"""OSError numbers that mean "this process may not write here" (permissions, an immutable folder, a
read-only file system): a user's setting, told in one line rather than a traceback."""


def unwritable(uri: str, err: OSError) -> ValueError | None:
    """One line for a write refused by the file system (`UNWRITABLE`), else None."""
    if err.errno not in UNWRITABLE:
        return None
    return ValueError(f"{redact(uri)}: cannot write there ({os.strerror(err.errno)}); expected a folder this user "
                      "can write")


class RunFolder:
    """Small text files of a run on a local path or s3:// (credentials never enter paths or logs)."""

    def __init__(self, uri: str, create: bool = True):
        """`create=False`: an existing run is expected (a resume), so a mistyped path makes no folder."""
        self.uri = uri.rstrip("/")
        self.fs, self.root = open_fs(self.uri)
        if self.is_local and create:
            try:
                Path(self.root).mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise unwritable(self.uri, err) or err from None

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
        """Whole file or nothing (temp + rename locally, one PUT on S3); a folder this user may not write is
        refused in one line."""
        folder, _, base = self.path(name).rpartition("/")
        try:
            if self.is_local:
                Path(folder).mkdir(parents=True, exist_ok=True)
            write_file_atomic(self.fs, folder, base, text.encode() if isinstance(text, str) else text)
        except OSError as err:
            raise unwritable(self.uri, err) or err from None

    def delete(self, name: str) -> None:
        """Remove `<run>/<name>` (nothing happens when it is absent)."""
        try:
            self.fs.delete_file(self.path(name))
        except FileNotFoundError:
            pass

    def check_writable(self) -> None:
        """Refuse, in one line, a local folder this user cannot write (before any work that would end in a write);
        S3 permissions show on the first write."""
        if self.is_local:
            probe = f".write-check-{uuid.uuid4().hex}"
            self.write_text(probe, "")
            self.delete(probe)

    def upload_dir(self, local: Path, name: str = "") -> str:
        """Copy a local folder's files (a checkpoint, report files) to <run>/<name>; returns its URI."""
        for file in sorted(p for p in local.iterdir() if p.is_file()):
            self.write_text(f"{name}/{file.name}" if name else file.name, file.read_bytes())
        return f"{self.uri}/{name}" if name else self.uri
