"""One driver per run folder: `<run>/lease.json` names the driver running it, a heartbeat keeps it fresh, and
every change to it is a compare-and-swap, so two drivers can never both hold a run.

Every write of lease.json (take, heartbeat, release) states the lease it expects to replace, and fails if
the file changed since it was read:

- local folder: the read-compare-write runs under an `flock` of `<run>/.lease.lock` (held for
  milliseconds; the kernel drops it when its process dies, so a killed driver never leaves it held), and
  the new file replaces the old by an atomic rename;
- S3: `If-None-Match: *` (no lease yet) or `If-Match: <ETag of the lease read>` on the PUT, which AWS S3,
  MinIO and moto honour. An endpoint that answers a conditional request with 501 NotImplemented gets the
  fallback: write, wait `settle` seconds and read back, only the last writer going on (two drivers whose
  check of the old holder took longer than `settle` could then both go on; such an endpoint cannot do
  better).

So a driver that read a stale lease, spent seconds checking its holder (`gone`), and then writes, loses
to any driver that wrote in the meantime; and a stalled holder that wakes after a takeover cannot
overwrite its successor's lease with a heartbeat: it finds the lease changed, sets `lost`, and stops.
"""

from __future__ import annotations

import _thread
import contextlib
import fcntl
import json
import math
import os
import socket
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Callable, Iterator

from dfc_ray.fs import RunFolder, redact, s3_object_client, unwritable

LEASE = "lease.json"
"""The run folder's lease: the driver that runs it (`LeaseHolder`), rewritten at every heartbeat."""
LOCK = ".lease.lock"
"""A local run folder's lock file: held (flock) only while lease.json is read, compared and replaced."""
TAKEOVERS = "lease-takeovers.jsonl"
"""One line per lease taken over from a driver that had stopped beating: who took it, from whom, and why."""
LEASE_TIMEOUT_ENV = "DFC_RAY_LEASE_TIMEOUT"
DEFAULT_LEASE_TIMEOUT = 90.0
"""Seconds without a heartbeat after which a lease may be taken over. The holder beats every quarter of
it (at most every 15 s): a stalled heartbeat has three chances before a resume may take the run."""
BEATS_PER_TIMEOUT = 4
"""Heartbeats per timeout: the holder beats every timeout / BEATS_PER_TIMEOUT seconds (at most every 15 s)."""
MIN_BEAT = 0.5
"""Shortest time between heartbeats: a holder never rewrites its lease in a busy loop."""
MIN_LEASE_TIMEOUT = BEATS_PER_TIMEOUT * MIN_BEAT
"""Shortest timeout a driver may state (2 s): `BEATS_PER_TIMEOUT` heartbeats of at least `MIN_BEAT`."""
MAX_LEASE_TIMEOUT = 86400.0
"""Longest timeout a lease may state (a day): a lease whose holder vanished frees its run within it."""
CLOCK_SKEW = 300.0
"""How far in the future a stored heartbeat may lie (drivers' clocks disagree) before the lease is refused
as malformed: a heartbeat far ahead would keep the lease fresh for good."""
LOCK_WAIT = 10.0
"""Seconds to wait for a local lease lock another process holds (it holds it for milliseconds)."""


def check_timeout(value: Any, where: str) -> float:
    """`value` as a lease timeout in seconds within [MIN_LEASE_TIMEOUT, MAX_LEASE_TIMEOUT], else one line."""
    try:
        timeout = float(value)
    except (TypeError, ValueError):
        timeout = math.nan
    if not MIN_LEASE_TIMEOUT <= timeout <= MAX_LEASE_TIMEOUT:
        raise ValueError(f"{where}={value!r}: expected seconds between {MIN_LEASE_TIMEOUT:g} and "
                         f"{MAX_LEASE_TIMEOUT:g} (a timeout spans {BEATS_PER_TIMEOUT} heartbeats of at least "
                         f"{MIN_BEAT:g} s)")
    return timeout


def lease_timeout() -> float:
    """The lease timeout of this process: DFC_RAY_LEASE_TIMEOUT seconds, else DEFAULT_LEASE_TIMEOUT."""
    value = os.environ.get(LEASE_TIMEOUT_ENV)
    return DEFAULT_LEASE_TIMEOUT if value is None else check_timeout(value, LEASE_TIMEOUT_ENV)


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

    @classmethod
    def parse(cls, text: str, where: str) -> "LeaseHolder":
        """lease.json's holder; fields a newer dfc-ray adds are ignored, a field of the wrong type or out of
        bounds (NaN, Infinity, a heartbeat far in the future) is refused in one line naming it."""
        advice = "remove the file if no driver runs this folder"
        try:
            data = json.loads(text)
        except ValueError as err:
            raise ValueError(f"{where}: not valid JSON ({err}); expected the lease a driver writes "
                             f"({advice})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{where}: expected an object (the lease a driver writes), got {type(data).__name__} "
                             f"({advice})")
        now = time.time()
        checks: dict[str, tuple[Callable[[Any], bool], str]] = {
            "token": (lambda v: isinstance(v, str) and bool(v), "a non-empty string"),
            "host": (lambda v: isinstance(v, str), "a string"),
            "pid": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
            "started": (lambda v: _number(v) and math.isfinite(v), "a finite Unix time"),
            "heartbeat": (lambda v: _number(v) and math.isfinite(v) and v <= now + CLOCK_SKEW,
                          f"a finite Unix time, at most {CLOCK_SKEW:g} s ahead of this clock"),
            "timeout": (lambda v: _number(v) and 0 < v <= MAX_LEASE_TIMEOUT,
                        f"seconds > 0 and at most {MAX_LEASE_TIMEOUT:g}"),
            "job_id": (lambda v: isinstance(v, str), "a string"),
            "cluster_id": (lambda v: isinstance(v, str), "a string"),
        }
        known = {}
        for field in fields(cls):
            if field.name not in data:
                if field.name in ("job_id", "cluster_id"):
                    continue
                raise ValueError(f"{where}: no {field.name}; expected the lease a driver writes ({advice})")
            value = data[field.name]
            valid, expected = checks[field.name]
            if not valid(value):
                raise ValueError(f"{where}: {field.name} = {value!r}: expected {expected} ({advice})")
            known[field.name] = value
        return cls(**known)

    def age(self) -> float:
        """Seconds since the last heartbeat."""
        return max(0.0, time.time() - self.heartbeat)

    def held_for(self) -> float:
        """Seconds since the lease was taken."""
        return max(0.0, time.time() - self.started)

    def describe(self) -> str:
        job = f", Ray job {self.job_id}" if self.job_id else ""
        return f"the driver on host {self.host} (pid {self.pid}{job})"

    def dump(self) -> str:
        return json.dumps(asdict(self)) + "\n"


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class _LocalLeaseFile:
    """lease.json in a local folder; a version is the file's text, compared under the folder's lease lock."""

    def __init__(self, run: RunFolder, where: str):
        self.path, self.lock, self.where, self.uri = Path(run.root) / LEASE, Path(run.root) / LOCK, where, run.uri

    def read(self) -> tuple[str | None, Any]:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None, None
        except IsADirectoryError:
            raise ValueError(f"{self.where}: a directory; expected the lease file a driver writes (remove it if "
                             "no driver runs this folder)") from None
        except UnicodeDecodeError:
            text = "\ufffd"  # not JSON: the holder parser names the file
        return text, text

    def replace(self, expected: Any, text: str | None) -> Any:
        """Write `text` (None: remove the lease) if the lease is still `expected`; returns the new version,
        or None when the lease had changed (or, for a removal, True). A folder this user may not write is
        refused in one line."""
        try:
            with self._locked():
                if self.read()[1] != expected:
                    return None
                if text is None:
                    self.path.unlink(missing_ok=True)
                    return True
                tmp = self.path.with_name(f".{LEASE}.tmp-{uuid.uuid4().hex}")
                tmp.write_text(text)
                os.replace(tmp, self.path)
                return text
        except OSError as err:
            raise unwritable(self.uri, err) or err from None

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.lock, "a") as handle:
            deadline = time.monotonic() + LOCK_WAIT
            while True:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise ValueError(f"{self.where}: its lock {LOCK} was held by another process for "
                                         f"{LOCK_WAIT:g} s; expected it held for milliseconds (a stopped "
                                         "process holds it: end it)") from None
                    time.sleep(0.01)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)


class _S3LeaseFile:
    """lease.json on S3; a version is the object's ETag, the condition of the next write (If-Match)."""

    def __init__(self, run: RunFolder, where: str, settle: float):
        self.client, self.bucket, prefix = s3_object_client(run.uri)
        self.key = f"{prefix}/{LEASE}" if prefix else LEASE
        self.where, self.settle = where, settle
        self.conditional = True  # until the endpoint says it does not implement conditional writes

    def read(self) -> tuple[str | None, Any]:
        try:
            answer = self.client.get_object(Bucket=self.bucket, Key=self.key)
        except self.client.exceptions.NoSuchKey:
            return None, None
        return answer["Body"].read().decode(errors="replace"), answer["ETag"]

    def replace(self, expected: Any, text: str | None) -> Any:
        """As `_LocalLeaseFile.replace`, by a conditional request."""
        from botocore.exceptions import ClientError  # deferred: only S3 runs need botocore

        if not self.conditional:
            return self._unconditional(text)
        condition = {"IfMatch": expected} if expected is not None else {"IfNoneMatch": "*"}
        try:
            if text is None:
                self.client.delete_object(Bucket=self.bucket, Key=self.key, **condition)
                return True
            return self.client.put_object(Bucket=self.bucket, Key=self.key, Body=text.encode(), **condition)["ETag"]
        except self.client.exceptions.NoSuchKey:
            return None
        except ClientError as err:
            code = err.response.get("Error", {}).get("Code", "")
            if code in ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey"):
                return None
            if code != "NotImplemented":
                raise
            self.conditional = False
            return self._unconditional(text)

    def _unconditional(self, text: str | None) -> Any:
        """The fallback for an endpoint without conditional writes: write, settle, and read back."""
        if text is None:
            self.client.delete_object(Bucket=self.bucket, Key=self.key)
            return True
        self.client.put_object(Bucket=self.bucket, Key=self.key, Body=text.encode())
        time.sleep(self.settle)
        found, version = self.read()
        return version if found == text else None


HELD: dict[str, "RunLease"] = {}
"""Run URI → the lease this process holds on it (`still_held`)."""


def still_held(run_uri: str) -> bool:
    """Whether this process may still write to the run: it holds no lease there (a caller outside a sweep), or
    the lease it holds is still its own, read now (a driver that stalled may have been taken over)."""
    lease = HELD.get(run_uri)
    return lease is None or lease.check()


class RunLease:
    """One driver per run folder. `acquire` writes lease.json (host, pid, Ray job, heartbeat) or refuses
    in one line naming the holder and its lease's age; a lease whose heartbeat is older than its stated
    timeout, or whose holder the caller shows to be gone, is taken over and the takeover recorded in
    lease-takeovers.jsonl. A thread beats until `release`; if it finds the lease taken by another driver
    it sets `lost` (who holds it now) and interrupts the main thread, which must then stop writing to the run.
    Every write is a compare-and-swap (module docstring)."""

    def __init__(self, run: RunFolder, timeout: float | None = None):
        self.run = run
        self.timeout = lease_timeout() if timeout is None else check_timeout(timeout, "lease timeout")
        self.settle = min(1.0, self.timeout / BEATS_PER_TIMEOUT)
        where = f"{redact(run.uri)}/{LEASE}"
        self.file = _LocalLeaseFile(run, where) if run.is_local else _S3LeaseFile(run, where, self.settle)
        self.where = where
        self.holder: LeaseHolder | None = None
        self.lost: str | None = None
        self._version: Any = None
        self._stop = threading.Event()
        self._lock = threading.Lock()  # the heartbeat and set_job both rewrite `holder`
        self._thread: threading.Thread | None = None

    def current(self) -> LeaseHolder | None:
        """The lease as stored (None: the folder is free); a malformed one is refused in one line."""
        return self._read()[0]

    def _read(self) -> tuple[LeaseHolder | None, Any]:
        text, version = self.file.read()
        return (LeaseHolder.parse(text, self.where) if text is not None else None), version

    def acquire(self, gone: Callable[[LeaseHolder], str | None] = lambda held: None) -> str | None:
        """Take the lease; returns why an earlier holder's lease was taken over (None: the folder was free).
        `gone(holder)`: why a live-looking holder has ended (e.g. its Ray job ended), or None. The write
        succeeds only if lease.json is still what was read before these checks."""
        held, version = self._read()
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
        written = self.file.replace(version, mine.dump())
        if written is None:
            try:
                found = self.current()
            except ValueError:
                found = None
            who = found.describe() if found else "another driver"
            raise ValueError(f"{redact(self.run.uri)}: taken at the same moment by {who}; expected one driver "
                             "per run folder")
        self.holder, self._version = mine, written
        HELD[self.run.uri] = self
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
                self._swap(replace(self.holder, job_id=job_id, cluster_id=cluster_id))

    def check(self) -> bool:
        """Whether lease.json still names this driver (read now); sets `lost` when it does not."""
        if self.lost is not None or self.holder is None:
            return self.lost is None
        try:
            held = self.current()
        except ValueError:
            held = None
        if held is not None and held.token == self.holder.token:
            return True
        self.lost = held.describe() if held else "nobody (lease.json was removed)"
        return False

    def release(self) -> None:
        """Stop the heartbeat and remove lease.json, if it is still this driver's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
        HELD.pop(self.run.uri, None)
        if self.holder is None:
            return
        mine, self.holder = self.holder, None
        try:
            held, version = self._read()
            if held is not None and held.token == mine.token:
                self.file.replace(version, None)
        except Exception:  # storage away (an outage): the lease goes stale and the next driver takes it over
            pass

    def _swap(self, holder: LeaseHolder) -> bool:
        """Rewrite this driver's lease as `holder` if lease.json is still the one it last wrote. A write that
        failed only because this driver's own last write landed unseen (an S3 reply lost) is retried from a
        fresh read; a lease now naming another driver is `lost`."""
        written = self.file.replace(self._version, holder.dump())
        if written is None:
            try:
                held, version = self._read()
            except ValueError:
                held, version = None, None
            if held is None or held.token != holder.token:
                self.lost = held.describe() if held else "nobody (lease.json was removed)"
                return False
            written = self.file.replace(version, holder.dump())
            if written is None:
                return True  # changed again in between: the next heartbeat decides
        self.holder, self._version = holder, written
        return True

    def _beat(self) -> None:
        interval = min(15.0, max(MIN_BEAT, self.timeout / BEATS_PER_TIMEOUT))
        while not self._stop.wait(interval):
            try:
                with self._lock:
                    if self._stop.is_set() or self.holder is None:
                        return
                    if not self._swap(replace(self.holder, heartbeat=time.time())):
                        print(f"{redact(self.run.uri)}: the run's lease is now held by {self.lost}; this driver "
                              "stops", file=sys.stderr, flush=True)
                        _thread.interrupt_main()
                        return
            except Exception:  # storage away for a moment: the next beat tries again
                continue
