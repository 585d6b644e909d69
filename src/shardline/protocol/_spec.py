# What a user asks for (JobSpec) and what they are shown (JobView).
#
# Both travel as JSON: a JobSpec is the body of `POST /jobs` and is stored
# with the job so a restarted coordinator can resume it; a JobView is the
# body of `GET /jobs/{id}`.  `JobSpec.from_dict` is the one place request
# fields are validated, and every error names the field.

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigurationError
from ._input import check_location
from ._ranges import check_delimiter, format_delimiter, parse_delimiter
from ._states import JobState, ShardState
from ._task import DEFAULT_MAX_IN_FLIGHT_BYTES, DEFAULT_PART_SIZE_BYTES

__all__ = ["SHARDS_PAGE_DEFAULT", "SHARDS_PAGE_MAX", "JobLimits", "JobSpec", "JobView", "ShardTimeouts", "ShardView"]

#: Shards a job view (and a page of `GET /jobs/{id}/shards` without `limit`) lists.
SHARDS_PAGE_DEFAULT = 100
#: The largest `limit` a shard page may ask for: a page costs the same whatever the job's size.
SHARDS_PAGE_MAX = 1000


def _is_int(value: Any) -> bool:
    """A JSON integer: `True` is an int to Python, never to us."""
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True, slots=True, kw_only=True)
class ShardTimeouts:
    """Per-attempt deadlines; an attempt that misses one is stopped and retried."""

    #: From the backend starting the worker to its HELLO on the exchange
    #: (covers a Lambda cold start).
    start_s: float = 60.0
    #: Longest silence allowed from a connected worker (it heartbeats every second).
    heartbeat_s: float = 30.0
    #: From start to a committed result.
    total_s: float = 3600.0

    def __post_init__(self) -> None:
        for name in ("start_s", "heartbeat_s", "total_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ConfigurationError(
                    f"field 'timeouts.{name}': must be a positive number of seconds, got {value!r}"
                )

    def to_dict(self) -> dict[str, float]:
        return {"start_s": self.start_s, "heartbeat_s": self.heartbeat_s, "total_s": self.total_s}


@dataclass(frozen=True, slots=True, kw_only=True)
class JobSpec:
    """One job: run `command` on `shards` slices of `source`.

    `output` is None (ordered output kept by the coordinator and streamed to
    whoever asks), ``s3://bucket/prefix/`` or a local directory (part files
    plus ``_manifest.json``); it must be empty at submit unless `overwrite`
    allows replacing the shardline output already there.  `reduce` is a shell command run once on the
    ordered concatenation of the shard outputs; its stdout is the job's
    result.  `backend` names one of the coordinator's backends (None: its
    default).
    """

    source: str
    shards: int
    delimiter: bytes = b"\n"
    command: str | None = None
    output: str | None = None
    #: Replace the shardline output (parts, result, manifest) in a non-empty `output`.
    overwrite: bool = False
    reduce: str | None = None
    backend: str | None = None
    timeouts: ShardTimeouts = field(default_factory=ShardTimeouts)
    #: Attempts per shard, the first included.
    max_attempts: int = 3
    #: The command's exit statuses that count as success (grep's 1: no match).
    ok_exit: tuple[int, ...] = (0,)
    #: Retries of a shard whose command exited with another status; 0: none,
    #: since the same bytes give the same status (signals and crashes are retried).
    command_retries: int = 0
    #: Lower `shards` so that each gets at least this many bytes (None: keep it).
    min_shard_bytes: int | None = None
    #: Lines at the start of the object given to every shard's command ahead of its own lines.
    header_lines: int = 0
    max_line_bytes: int | None = None
    part_size_bytes: int = DEFAULT_PART_SIZE_BYTES
    max_in_flight_bytes: int = DEFAULT_MAX_IN_FLIGHT_BYTES

    def __post_init__(self) -> None:
        if not isinstance(self.source, str) or not self.source:
            raise ConfigurationError("field 'source': must be an s3://bucket/key URL or a local path")
        check_location(self.source, what="field 'source'")
        if not _is_int(self.shards) or self.shards < 1:
            raise ConfigurationError(f"field 'shards': number of shards must be an integer >= 1, got {self.shards!r}")
        try:
            check_delimiter(self.delimiter)
        except ConfigurationError as exc:
            raise ConfigurationError(f"field 'delimiter': {exc}") from None
        for name in ("command", "reduce", "output", "backend"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ConfigurationError(f"field '{name}': must be a non-empty string when given")
        if self.output is not None:
            check_location(self.output, what="field 'output'")
        if not isinstance(self.overwrite, bool):
            raise ConfigurationError(f"field 'overwrite': must be true or false, got {self.overwrite!r}")
        if self.overwrite and self.output is None:
            raise ConfigurationError("field 'overwrite': needs 'output' (a streamed output has nothing to overwrite)")
        if not _is_int(self.max_attempts) or self.max_attempts < 1:
            raise ConfigurationError(f"field 'max_attempts': must be an integer >= 1, got {self.max_attempts!r}")
        if not (
            isinstance(self.ok_exit, tuple)
            and self.ok_exit
            and all(_is_int(code) and 0 <= code <= 255 for code in self.ok_exit)
        ):
            raise ConfigurationError(f"field 'ok_exit': must be a list of exit statuses 0..255, got {self.ok_exit!r}")
        if not _is_int(self.command_retries) or self.command_retries < 0:
            raise ConfigurationError(f"field 'command_retries': must be an integer >= 0, got {self.command_retries!r}")
        if self.min_shard_bytes is not None and (not _is_int(self.min_shard_bytes) or self.min_shard_bytes < 1):
            raise ConfigurationError(f"field 'min_shard_bytes': must be an integer >= 1, got {self.min_shard_bytes!r}")
        if not _is_int(self.header_lines) or self.header_lines < 0:
            raise ConfigurationError(f"field 'header_lines': must be an integer >= 0, got {self.header_lines!r}")
        if self.header_lines and self.command is None:
            raise ConfigurationError(
                "field 'header_lines': needs a 'command' (without one the output is the input, header included)"
            )
        if self.max_line_bytes is not None and (not _is_int(self.max_line_bytes) or self.max_line_bytes < 1):
            raise ConfigurationError(f"field 'max_line_bytes': must be an integer >= 1, got {self.max_line_bytes!r}")
        if not (
            _is_int(self.part_size_bytes)
            and _is_int(self.max_in_flight_bytes)
            and 1 <= self.part_size_bytes <= self.max_in_flight_bytes
        ):
            raise ConfigurationError(
                f"field 'part_size_bytes': need 1 <= part_size_bytes ({self.part_size_bytes!r}) <= "
                f"max_in_flight_bytes ({self.max_in_flight_bytes!r})"
            )

    def to_dict(self) -> dict[str, Any]:
        """The JSON form accepted by `from_dict` (the delimiter as a one-character string)."""
        return {
            "source": self.source,
            "shards": self.shards,
            "delimiter": format_delimiter(self.delimiter),
            "command": self.command,
            "output": self.output,
            "overwrite": self.overwrite,
            "reduce": self.reduce,
            "backend": self.backend,
            "timeouts": self.timeouts.to_dict(),
            "max_attempts": self.max_attempts,
            "ok_exit": list(self.ok_exit),
            "command_retries": self.command_retries,
            "min_shard_bytes": self.min_shard_bytes,
            "header_lines": self.header_lines,
            "max_line_bytes": self.max_line_bytes,
            "part_size_bytes": self.part_size_bytes,
            "max_in_flight_bytes": self.max_in_flight_bytes,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> JobSpec:
        """Validate a request body; errors name the offending field."""
        if not isinstance(data, Mapping):
            raise ConfigurationError("request body: must be a JSON object")
        unknown = sorted(set(data) - _FIELDS)
        if unknown:
            raise ConfigurationError(f"field {unknown[0]!r}: unknown field (known: {', '.join(sorted(_FIELDS))})")
        for required in ("source", "shards"):
            if required not in data:
                raise ConfigurationError(f"field {required!r}: required")
        values = {key: value for key, value in data.items() if value is not None}
        if "delimiter" in values:
            values["delimiter"] = parse_delimiter(values["delimiter"], what="field 'delimiter'")
        if "timeouts" in values:
            values["timeouts"] = _timeouts(values["timeouts"])
        if isinstance(values.get("ok_exit"), list):
            values["ok_exit"] = tuple(values["ok_exit"])
        try:
            return cls(**values)
        except TypeError as exc:  # pragma: no cover - every field is checked above
            raise ConfigurationError(f"request body: {exc}") from None


_FIELDS = frozenset(JobSpec.__dataclass_fields__)

_MIB = 1024 * 1024


def _shown(number: float) -> str:
    """`number` for a message: integral values without ".0", huge ones abridged."""
    integral = isinstance(number, int) or (number.is_integer() and abs(number) < 1e16)
    text = str(int(number)) if integral else repr(number)
    return text if len(text) <= 24 else f"{text[:12]}...({len(text)} digits)"


@dataclass(frozen=True, slots=True, kw_only=True)
class JobLimits:
    """The most one job may ask for: the operator's bounds, checked when a job is submitted.

    A job's fields are the submitter's choice; these caps keep any one job
    from pinning the coordinator's memory, processes or store for ever.  The
    defaults are generous for real work; ``shardline serve`` sets them from
    its --max-* flags, and an embedded ``shardline run`` uses the defaults.
    """

    max_shards: int = 100_000
    #: Attempts per shard, the first included.
    max_attempts: int = 10
    #: Cap on each of timeouts.start_s, heartbeat_s and total_s.
    max_timeout_s: float = 7 * 24 * 3600.0
    max_part_size_bytes: int = 256 * _MIB
    #: A worker's download buffer (memory held per running shard).
    max_in_flight_bytes: int = 1024 * _MIB

    def __post_init__(self) -> None:
        for name in ("max_shards", "max_attempts", "max_part_size_bytes", "max_in_flight_bytes"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ConfigurationError(f"job limit {name} must be an integer >= 1, got {value!r}")
        if not (math.isfinite(self.max_timeout_s) and self.max_timeout_s > 0):
            raise ConfigurationError(f"job limit max_timeout_s must be a positive number, got {self.max_timeout_s!r}")

    def check(self, spec: JobSpec) -> None:
        """Raise ConfigurationError, naming the field and the limit, if `spec` asks for more."""
        fields: list[tuple[str, float, float, str]] = [
            ("shards", spec.shards, self.max_shards, "--max-shards"),
            ("max_attempts", spec.max_attempts, self.max_attempts, "--max-attempts"),
            ("part_size_bytes", spec.part_size_bytes, self.max_part_size_bytes, "--max-part-size"),
            ("max_in_flight_bytes", spec.max_in_flight_bytes, self.max_in_flight_bytes, "--max-in-flight"),
        ]
        fields += [
            (f"timeouts.{name}", value, self.max_timeout_s, "--max-timeout")
            for name, value in spec.timeouts.to_dict().items()
        ]
        for name, value, limit, flag in fields:
            if value > limit:
                raise ConfigurationError(
                    f"field {name!r}: {_shown(value)} is above this coordinator's limit of {_shown(limit)} "
                    f"(its operator sets it with 'shardline serve {flag}')"
                )


def _timeouts(value: Any) -> ShardTimeouts:
    if not isinstance(value, Mapping):
        raise ConfigurationError("field 'timeouts': must be an object with start_s, heartbeat_s and/or total_s")
    unknown = sorted(set(value) - {"start_s", "heartbeat_s", "total_s"})
    if unknown:
        raise ConfigurationError(f"field 'timeouts.{unknown[0]}': unknown (known: start_s, heartbeat_s, total_s)")
    return ShardTimeouts(**value)


@dataclass(frozen=True, slots=True, kw_only=True)
class ShardView:
    index: int
    state: ShardState
    #: The attempt that committed, or the latest one launched.
    attempt: int
    #: Input bytes emitted so far (exact once committed).
    bytes: int
    #: [h_i, h_{i+1}) once committed.
    emitted: tuple[int, int] | None
    tail_sources: tuple[str, ...] = ()
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "state": self.state.value,
            "attempt": self.attempt,
            "bytes": self.bytes,
            "emitted": list(self.emitted) if self.emitted is not None else None,
            "tail_sources": list(self.tail_sources),
            "error": self.error,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class JobView:
    """A snapshot of one job, as `GET /jobs/{id}` shows it: counts over every
    shard, and one page of the shards themselves (a view never lists them all,
    so that it costs the same at 20,000 shards as at 4)."""

    id: str
    state: JobState
    spec: JobSpec
    size: int | None
    etag: str | None
    #: Shards [shards_offset, shards_offset + len(shards)), in index order.
    shards: tuple[ShardView, ...]
    created_at: float  # unix time
    finished_at: float | None
    error: str | None = None
    #: Where the output went (`spec.output`), or None when the coordinator keeps it.
    output: str | None = None
    #: Retries launched so far (speculative attempts included).
    retries: int = 0
    #: Over every shard, not just the page.
    shards_done: int = 0
    bytes_emitted: int = 0
    #: How many shards are in each state, every state named.
    shard_states: Mapping[ShardState, int] = field(default_factory=dict)
    shards_offset: int = 0

    @property
    def shards_next(self) -> int | None:
        """The offset of the page after this one, or None if this page ends the shards."""
        end = self.shards_offset + len(self.shards)
        return end if end < self.spec.shards else None

    def to_dict(self, *, with_shards: bool = True) -> dict[str, Any]:
        data: dict[str, Any] = {
            "id": self.id,
            "state": self.state.value,
            "source": self.spec.source,
            "size": self.size,
            "etag": self.etag,
            "command": self.spec.command,
            "reduce": self.spec.reduce,
            "shards_total": self.spec.shards,
            "shards_done": self.shards_done,
            "shard_states": {state.value: self.shard_states.get(state, 0) for state in ShardState},
            "bytes_emitted": self.bytes_emitted,
            "retries": self.retries,
            "created_at": self.created_at,
            "finished_at": self.finished_at,
            "error": self.error,
            "output": self.output,
        }
        if with_shards:
            data["shards"] = [shard.to_dict() for shard in self.shards]
            data["shards_offset"] = self.shards_offset
            data["shards_next"] = self.shards_next
        return data
