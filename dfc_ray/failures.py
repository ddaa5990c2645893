"""What a failed trial leaves behind, and what a sweep's exit code says about its trials.

Ray Tune 2.60 writes a failed trial's traceback to the trial's `error.txt` (`Trial.error_file`, in
the driver's staging folder) and keeps no message on the Trial object; `trial_error` reads that file
so results.jsonl keeps the exception's type and last line, and the sweep copies the full text into
the run folder. `lost_to_infrastructure` tells a trial the cluster lost (its node or a judge died)
from one that failed on its own: the sweep runs the former again. docs/failure-modes.md lists the
exit codes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

EXIT_OK = 0
EXIT_BAD_INPUT = 2
"""Bad input or unreachable storage: one line on stderr, nothing (more) was run."""
EXIT_SOME_FAILED = 3
"""The sweep finished and wrote its report, but at least one trial failed."""
EXIT_ALL_FAILED = 4
"""The sweep finished, and every trial failed."""
EXIT_INTERRUPTED = 130
"""Ctrl-C (SIGINT) stopped the command; a sweep wrote its report and named the trials that did not finish."""

_EXCEPTION_LINE = re.compile(
    r"^([A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt|Warning|Failure|Unavailable)\w*)(?:: (.*))?$")


INFRASTRUCTURE_ERRORS = frozenset({
    "NodeDiedError", "ActorDiedError", "WorkerCrashedError", "RayActorError", "ActorUnavailableError",
    "LocalRayletDiedError", "OwnerDiedError", "ObjectLostError", "ObjectFetchTimedOutError",
    "ObjectReconstructionFailedError", "ReplicaUnavailable", "PoolMissingError",
})
"""Exception types (class names, as results.jsonl's `error_type` keeps them) that mean the cluster lost
the trial, not that the trial failed: its node, its actor process or an object it needed died, or a
judge replica it waited on stayed down or its judges' pool was gone (actors/pool.py's ReplicaUnavailable,
PoolMissingError). Running the trial again can succeed. Anything else (ValueError, a diverged loss, an S3
error) is the trial's own outcome, except storage that did not answer (`STORAGE_UNAVAILABLE`)."""

STORAGE_UNAVAILABLE = re.compile(r"AWS Error NETWORK_CONNECTION|curlCode: (?:7|28)\b|"
                                 r"Could not connect to the endpoint URL|(?:Read|Connect) timeout on endpoint URL")
"""An S3 request that timed out or found nobody listening, as pyarrow (curl) and botocore word it,
after the retries of `dfc_ray.fs.S3Settings`: the storage was away (an outage, docs/cluster.md), and
the trial can succeed once it is back. S3 answers that refuse (access denied, no such bucket) stay
the trial's own failure."""


JUDGES_GONE = re.compile(r"pool '[^']*': no actor '[^']*' in namespace")
"""A trial that found its judges' pool gone, as recorded before PoolMissingError had its own type (a
ValueError then): lost to the cluster too, so a resume runs it again."""


@dataclass(frozen=True)
class TrialError:
    """Why a trial raised, read from the traceback text Tune saved."""

    type: str
    """The exception's class name (the innermost one the traceback ends with), e.g. "ValueError"."""
    message: str
    """The exception's last line without its type (may be empty)."""
    traceback: str
    """The whole text Tune saved, every failure of the trial."""


def trial_error(trial: Any) -> TrialError:
    """The reason of a Tune trial that raised; a trial without a readable error file says so."""
    path = getattr(trial, "error_file", None)
    try:
        text = Path(path).read_text() if path else ""
    except OSError:
        text = ""
    return parse_traceback(text)


_FAILURE_HEADER = re.compile(r"^Failure # \d+ \(occurred at .*\)$", re.MULTILINE)
"""The line Tune writes before each failure of a trial in its error file."""
_RAY_MESSAGES = ((re.compile(r"^The actor died unexpectedly before finishing this task\."), "ActorDiedError"),
                 (re.compile(r"^The actor experienced an error before finishing this task\."), "RayActorError"),
                 (re.compile(r"^The worker died unexpectedly while executing this task\."), "WorkerCrashedError"),
                 (re.compile(r"^The actor \w+ is unavailable: "), "ActorUnavailableError"))
"""Ray's messages for a lost actor or worker process. Tune writes `str(exc)`, without the type, when
a trial's own actor is lost (no traceback to end with `Type: message`), so these name the type."""


def parse_traceback(text: str) -> TrialError:
    """Type and last line of a trial's last failure in the text Tune saved (one block per failure):
    Ray wraps the user's exception in a RayTaskError whose text ends with the original
    `Type: message` line; a lost actor or worker is told by Ray's own message (`_RAY_MESSAGES`)."""
    last = _FAILURE_HEADER.split(text)[-1]
    lines = [line.strip() for line in last.splitlines() if line.strip()]
    for line in reversed(lines):
        if match := _EXCEPTION_LINE.match(line):
            return TrialError(match.group(1).rsplit(".", 1)[-1], match.group(2) or "", text)
    for pattern, kind in _RAY_MESSAGES:
        if lines and pattern.match(lines[0]):
            return TrialError(kind, lines[0], text)
    return TrialError("UnknownError", lines[-1] if lines else "no traceback was saved", text)


def lost_to_infrastructure(record: dict[str, Any]) -> bool:
    """Whether a results.jsonl record is a trial the cluster lost (INFRASTRUCTURE_ERRORS, S3 that did
    not answer: STORAGE_UNAVAILABLE, judges that vanished: JUDGES_GONE). Records written before `error_type`
    existed are judged by their `error` text's leading `Type:`."""
    if record.get("status") != "failed":
        return False
    error = str(record.get("error", ""))
    kind = record.get("error_type") or error.split(":", 1)[0].strip()
    return (kind.rsplit(".", 1)[-1] in INFRASTRUCTURE_ERRORS or bool(STORAGE_UNAVAILABLE.search(error))
            or bool(JUDGES_GONE.search(error)))


def sweep_exit_code(statuses: Iterable[str]) -> int:
    """0 when every trial is "ok", EXIT_ALL_FAILED when none is, else EXIT_SOME_FAILED."""
    statuses = list(statuses)
    failed = sum(status != "ok" for status in statuses)
    if not failed:
        return EXIT_OK
    return EXIT_ALL_FAILED if failed == len(statuses) else EXIT_SOME_FAILED
