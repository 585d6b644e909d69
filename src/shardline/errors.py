"""Every error shardline raises, grouped by cause.

`ShardlineError` is the root; the CLI prints ``str(exc)`` of any subclass as a
one-line message and exits non-zero. Errors from botocore, aiohttp and the OS
are translated into these at the boundary (``raise ... from exc``), so callers
never need to know which library failed.
"""

from __future__ import annotations

__all__ = [
    "AuthenticationError",
    "CommandExitError",
    "CommandFailedError",
    "ConfigurationError",
    "CoverageError",
    "ExchangeNetworkError",
    "ExchangeRefusedError",
    "ExchangeTimeoutError",
    "ExchangeUnavailable",
    "FrameTooLargeError",
    "InputError",
    "JobCancelledError",
    "JobFailedError",
    "JobNotFoundError",
    "LeaseLostError",
    "LineTooLongError",
    "LocalProtocolError",
    "MarkerConflictError",
    "NotAcceptingJobsError",
    "ObjectChangedError",
    "ProtocolError",
    "RemoteProtocolError",
    "RetryableStorageError",
    "ShardFailedError",
    "ShardlineError",
    "SourceAccessError",
    "SourceNotFoundError",
    "StaleAttemptError",
    "StorageError",
    "StorageNetworkError",
    "StorageThrottledError",
    "StorageTimeoutError",
    "TimeBudgetError",
]


class ShardlineError(Exception):
    """Root of every error shardline raises on purpose."""


# --- configuration and input: the user can fix these -------------------------


class ConfigurationError(ShardlineError):
    """Invalid settings: bad shard count, delimiter, endpoint, missing table."""


class InputError(ShardlineError):
    """The input object itself is unusable."""


class SourceNotFoundError(InputError):
    """The file, bucket or key does not exist."""


class SourceAccessError(InputError):
    """The source exists but cannot be read (permissions, not a file)."""


class ObjectChangedError(InputError):
    """The object's ETag (or a local file's identity) changed mid-job."""


class LineTooLongError(InputError):
    """A line exceeds the configured ``max_line_bytes``; names its offset."""

    def __init__(self, *, offset: int, limit: int, starts_earlier: bool = False) -> None:
        where = f"line holding offset {offset} (it starts earlier)" if starts_earlier else f"line at offset {offset}"
        super().__init__(f"{where} is longer than max_line_bytes={limit} (--max-line-bytes)")
        self.offset = offset
        self.limit = limit
        #: `offset` is inside the line, not its start (a shard found it before finding where it starts).
        self.starts_earlier = starts_earlier


# --- storage (S3, DynamoDB, local disk) ---------------------------------------


class StorageError(ShardlineError):
    """A storage request failed for good."""


class RetryableStorageError(StorageError):
    """A transient storage failure: the one retry loop tries again."""


class StorageTimeoutError(RetryableStorageError):
    """A storage request got no (complete) answer in time."""


class StorageNetworkError(RetryableStorageError):
    """A storage request failed on the way: reset, refused, a body cut short, a 5xx."""


class StorageThrottledError(RetryableStorageError):
    """The storage service asked us to slow down (429, SlowDown, throttling)."""


class MarkerConflictError(StorageError):
    """A boundary marker already exists with a different value: corruption."""


# --- the exchange protocol ----------------------------------------------------


class ProtocolError(ShardlineError):
    """A frame or session violated the exchange protocol."""


class LocalProtocolError(ProtocolError):
    """We tried to send something the protocol forbids (a bug on our side)."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something malformed, unexpected or unauthenticated."""


class ExchangeUnavailable(ShardlineError):
    """A worker cannot talk to the coordinator's exchange right now."""


class ExchangeTimeoutError(ExchangeUnavailable):
    """The exchange did not answer (connect, handshake, ACK) in time."""


class ExchangeNetworkError(ExchangeUnavailable):
    """The connection to the exchange could not be made or was lost."""


class ExchangeRefusedError(ExchangeUnavailable):
    """The exchange refused the session or the report; trying again will not help."""


class AuthenticationError(RemoteProtocolError):
    """A frame's MAC did not verify under the job's secret."""


class FrameTooLargeError(RemoteProtocolError):
    """A frame header announced more than the maximum frame size."""


# --- shards and jobs ----------------------------------------------------------


class ShardFailedError(ShardlineError):
    """One shard could not be completed; the message names it and the cause."""

    def __init__(self, shard: int, cause: str) -> None:
        super().__init__(f"shard {shard} failed: {cause}")
        self.shard = shard
        self.cause = cause


#: How many of a failed command's last stderr lines its error shows.
_STDERR_LINES_SHOWN = 3


class CommandFailedError(ShardlineError):
    """The per-shard command exited non-zero (or could not be started)."""

    def __init__(self, *, returncode: int, stderr_tail: str) -> None:
        # Its last few lines, on one line: the error is often not the very last.
        lines = [line.strip() for line in stderr_tail.splitlines() if line.strip()]
        detail = "; ".join(lines[-_STDERR_LINES_SHOWN:]) or "(no stderr)"
        if returncode < 0:
            how = f"command killed by signal {_signal_name(-returncode)}"
        else:
            how = f"command exited with status {returncode}"
        super().__init__(f"{how}: {detail}")
        self.returncode = returncode
        self.stderr_tail = stderr_tail


class CommandExitError(CommandFailedError):
    """The per-shard command exited with a status the job does not accept
    (``ok_exit``): deterministic on the same bytes, so the coordinator does not
    retry it unless the job asks for command retries (``--command-retries``)."""

    def __init__(self, *, returncode: int, stderr_tail: str) -> None:
        super().__init__(returncode=returncode, stderr_tail=stderr_tail)
        if not stderr_tail.strip():
            # grep, diff, cmp and test say "nothing matched" with status 1 and no stderr.
            self.args = (
                f"{self.args[0]}; if status {returncode} means success for this command (grep: no match), "
                f"accept it with --ok-exit 0,{returncode}",
            )


def _signal_name(number: int) -> str:
    import signal

    try:
        return signal.Signals(number).name
    except ValueError:
        return str(number)


class StaleAttemptError(ShardlineError):
    """A write by a shard attempt that is no longer current: it was fenced
    (superseded by a retry, or the shard was committed by another attempt)."""


class TimeBudgetError(ShardlineError):
    """A worker stopped because its runtime's time limit (a Lambda's
    timeout) was about to end; another attempt may well finish."""


class LeaseLostError(ShardlineError):
    """This coordinator no longer owns the job: its lease expired and another
    coordinator sharing the store took the job over (it may not commit,
    launch or write for it any more)."""


class CoverageError(ShardlineError):
    """The emitted ranges do not tile the object exactly."""


class JobFailedError(ShardlineError):
    """A job failed; wraps the first shard or coverage error."""


class JobCancelledError(ShardlineError):
    """The job was cancelled before it finished."""


class JobNotFoundError(ShardlineError):
    """No job with this id is known to the coordinator."""


class NotAcceptingJobsError(ShardlineError):
    """The coordinator is shutting down and takes no new jobs."""
