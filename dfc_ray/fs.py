"""Files on a plain path, file:// or s3://: the one place that opens filesystems.

The activation store, run folders, reports and plans all read and write through these helpers, so
S3 settings and credential redaction live here once. Endpoint and credentials come from the standard
AWS environment/config (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, instance roles, …) and never enter a
path, a file or a message.

Every S3 client made here (pyarrow's, s3fs's, the one Tune writes through) has connect and read
timeouts and a bounded retry (`S3Settings`, from DFC_RAY_S3_TIMEOUT / DFC_RAY_S3_ATTEMPTS), and
`storage_failure` turns what those clients raise into one line naming the endpoint.

A run folder has one driver at a time: `RunLease` (lease.json, a heartbeat, a takeover record).
"""

from __future__ import annotations

import _thread
import errno
import functools
import json
import os
import re
import socket
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable
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


# ---------------------------------------------------------------- one driver per run folder

LEASE = "lease.json"
"""The run folder's lease: the driver that runs it (`LeaseHolder`), rewritten at every heartbeat."""
TAKEOVERS = "lease-takeovers.jsonl"
"""One line per lease taken over from a driver that had stopped beating: who took it, from whom, and why."""
LEASE_TIMEOUT_ENV = "DFC_RAY_LEASE_TIMEOUT"
DEFAULT_LEASE_TIMEOUT = 90.0
"""Seconds without a heartbeat after which a lease may be taken over. The holder beats every quarter of
it (at most every 15 s): a stalled heartbeat has three chances before a resume may take the run."""


def lease_timeout() -> float:
    """The lease timeout of this process: DFC_RAY_LEASE_TIMEOUT seconds, else DEFAULT_LEASE_TIMEOUT."""
    value = os.environ.get(LEASE_TIMEOUT_ENV)
    try:
        timeout = float(value) if value is not None else DEFAULT_LEASE_TIMEOUT
    except ValueError:
        timeout = -1.0
    if not timeout > 0 or timeout == float("inf"):
        raise ValueError(f"{LEASE_TIMEOUT_ENV}={value!r}: expected seconds > 0")
    return timeout


@dataclass(frozen=True)
class LeaseHolder:
    """What lease.json says about the driver holding a run folder."""

    token: str
    """Unique per acquisition: tells this driver's lease from a successor's."""
    host: str
    pid: int
    started: float
    """Unix time the lease was taken."""
    heartbeat: float
    """Unix time of the holder's last heartbeat (drivers' clocks are assumed to agree within seconds)."""
    timeout: float
    """The holder's stated timeout: seconds without a heartbeat after which its lease may be taken over."""
    job_id: str = ""
    """The holder's Ray job id (hex), once it has joined its cluster."""
    cluster_id: str = ""
    """That cluster's id (hex): a job id means something only on its own cluster."""

    def age(self) -> float:
        """Seconds since the last heartbeat."""
        return max(0.0, time.time() - self.heartbeat)

    def held_for(self) -> float:
        """Seconds since the lease was taken."""
        return max(0.0, time.time() - self.started)

    def describe(self) -> str:
        job = f", Ray job {self.job_id}" if self.job_id else ""
        return f"the driver on host {self.host} (pid {self.pid}{job})"


class RunLease:
    """One driver per run folder. `acquire` writes lease.json (host, pid, Ray job, heartbeat) or refuses
    in one line naming the holder and its lease's age; a lease whose heartbeat is older than its stated
    timeout, or whose holder the caller shows to be gone, is taken over and the takeover recorded in
    lease-takeovers.jsonl. A thread beats until `release`; if it finds the lease taken by another driver
    it sets `lost` (who holds it now) and interrupts the main thread, which must then stop writing to the run.

    Two drivers acquiring at the same moment: each writes, waits `settle` seconds and reads back; only
    the one whose write landed last finds its own token, the other is refused."""

    def __init__(self, run: RunFolder, timeout: float | None = None):
        self.run = run
        self.timeout = lease_timeout() if timeout is None else timeout
        self.settle = min(1.0, self.timeout / 4)
        self.holder: LeaseHolder | None = None
        self.lost: str | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()  # the heartbeat and set_job both rewrite `holder`
        self._thread: threading.Thread | None = None

    def current(self) -> LeaseHolder | None:
        """The lease as stored (None: the folder is free, or its lease.json is unreadable and counts as free)."""
        text = self.run.read_text(LEASE)
        try:
            return LeaseHolder(**json.loads(text)) if text else None
        except (TypeError, ValueError):
            return None

    def acquire(self, gone: Callable[[LeaseHolder], str | None] = lambda held: None) -> str | None:
        """Take the lease; returns why an earlier holder's lease was taken over (None: the folder was free).
        `gone(holder)`: why a live-looking holder has ended (e.g. its Ray job ended), or None."""
        held = self.current()
        why = None
        if held is not None:
            age = held.age()
            why = (f"its last heartbeat is {age:.0f} s old, more than its timeout of {held.timeout:g} s"
                   if age > held.timeout else gone(held))
            if why is None:
                raise ValueError(f"{redact(self.run.uri)}: in use by {held.describe()} for {held.held_for():.0f} s, "
                                 f"last heartbeat {age:.0f} s ago; expected one driver per run folder: wait until it "
                                 f"ends, or until its lease is {held.timeout:g} s without a heartbeat "
                                 f"({LEASE_TIMEOUT_ENV} of that driver)")
        now = time.time()
        mine = LeaseHolder(uuid.uuid4().hex, socket.gethostname(), os.getpid(), now, now, self.timeout)
        self._write(mine)
        time.sleep(self.settle)
        found = self.current()
        if found is None or found.token != mine.token:
            who = found.describe() if found else "another driver"
            raise ValueError(f"{redact(self.run.uri)}: taken at the same moment by {who}; expected one driver "
                             "per run folder")
        self.holder = mine
        if held is not None:
            records = (self.run.read_text(TAKEOVERS) or "")
            record = {"at": now, "by": asdict(mine), "from": asdict(held), "why": why}
            self.run.write_text(TAKEOVERS, records + json.dumps(record) + "\n")
        self._thread = threading.Thread(target=self._beat, name="dfc-ray-lease", daemon=True)
        self._thread.start()
        return why

    def set_job(self, job_id: str, cluster_id: str) -> None:
        """Record the holder's Ray job and cluster once it has joined one."""
        with self._lock:
            if self.holder is not None:
                self.holder = replace(self.holder, job_id=job_id, cluster_id=cluster_id)
                self._write(self.holder)

    def release(self) -> None:
        """Stop the heartbeat and remove lease.json, if it is still this driver's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
        if self.holder is None:
            return
        mine, self.holder = self.holder, None
        try:
            held = self.current()
            if held is not None and held.token == mine.token:
                self.run.delete(LEASE)
        except Exception:  # storage away (an outage): the lease goes stale and the next driver takes it over
            pass

    def _write(self, holder: LeaseHolder) -> None:
        self.run.write_text(LEASE, json.dumps(asdict(holder)) + "\n")

    def _beat(self) -> None:
        interval = min(15.0, self.timeout / 4)
        while not self._stop.wait(interval):
            try:
                held = self.current()
                with self._lock:
                    if self._stop.is_set() or self.holder is None:
                        return
                    if held is None or held.token != self.holder.token:
                        self.lost = held.describe() if held else "nobody (lease.json was removed)"
                        print(f"{redact(self.run.uri)}: the run's lease is now held by {self.lost}; this driver "
                              "stops", file=sys.stderr, flush=True)
                        _thread.interrupt_main()
                        return
                    self.holder = replace(self.holder, heartbeat=time.time())
                    self._write(self.holder)
            except Exception:  # storage away for a moment: the next beat tries again
                continue
