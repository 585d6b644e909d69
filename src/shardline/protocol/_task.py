# The shard task: everything a worker needs to run one shard attempt.  The
# coordinator builds it, a backend delivers it (a local process's stdin, a
# Lambda invoke event) and the worker parses it; both sides agree on it here.

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from typing import Any

from ..errors import ConfigurationError
from ._ranges import ShardRange, check_delimiter

__all__ = [
    "DEFAULT_MAX_IN_FLIGHT_BYTES",
    "DEFAULT_PART_SIZE_BYTES",
    "DEFAULT_TASKS_PER_PROCESS",
    "TASK_VERSION",
    "ShardTask",
    "attempt_output_name",
]

#: Tasks one local pool process runs at once, by default (the backend sends
#: no more; the pool worker sizes its shared clients for them): a shard
#: mostly waits on its command, its reads and the exchange, so one process
#: per core keeps several busy.
DEFAULT_TASKS_PER_PROCESS = 4

TASK_VERSION = 1
#: Bytes per ranged GET, and the memory a worker may reserve for GETs in flight (DESIGN §4).
DEFAULT_PART_SIZE_BYTES = 8 * 1024 * 1024
DEFAULT_MAX_IN_FLIGHT_BYTES = 4 * DEFAULT_PART_SIZE_BYTES


def attempt_output_name(shard: int, attempt: int) -> str:
    """The file (or object) name of one attempt's output: one per attempt, so a stale one never overwrites."""
    return f"shard-{shard:05d}.attempt-{attempt}.out"


@dataclass(frozen=True, slots=True, kw_only=True)
class ShardTask:
    """One shard attempt.

    `secret` is this attempt's own exchange secret (`attempt_secret`): it
    authenticates this attempt's session and no other, and never shows in a repr.
    """

    job_id: str
    shard: int
    shards: int
    attempt: int
    source: str  # "s3://bucket/key" or a local path
    size: int
    etag: str
    delimiter: bytes = b"\n"
    command: str | None = None  # run with `sh -c`; None passes bytes through
    #: Where this attempt writes its output: a local path, or "s3://bucket/key"
    #: for a worker that shares no disk with the coordinator (Lambda), which
    #: uploads it there before reporting DONE.
    output_path: str
    exchange_host: str | None = None  # None: no exchange (markers and own scan only)
    exchange_port: int | None = None
    #: Dial the exchange over TLS, verifying its certificate for exchange_host
    #: against `exchange_ca` (PEM), or the system's trust store when None.
    exchange_tls: bool = False
    exchange_ca: str | None = None
    secret: bytes = field(default=b"", repr=False)
    #: Where boundary markers go: "sqlite:/path" (local workers) or "dynamodb:TABLE".
    markers: str
    max_line_bytes: int | None = None
    part_size_bytes: int = DEFAULT_PART_SIZE_BYTES
    max_in_flight_bytes: int = DEFAULT_MAX_IN_FLIGHT_BYTES
    #: Serialised shardline.io.aws.AwsSettings; credentials only for the embedded
    #: endpoint (kept out of the repr all the same).
    aws: dict[str, Any] = field(default_factory=dict, repr=False)
    #: Variables of the worker's environment that the command must not see
    #: (the daemon's AWS credentials); ``SHARDLINE_*`` ones it never sees.
    command_env_drop: tuple[str, ...] = ()
    #: The command's exit statuses that count as success (JobSpec.ok_exit).
    ok_exit: tuple[int, ...] = (0,)
    #: Lines at the start of the object written to the command ahead of this shard's own (JobSpec.header_lines).
    header_lines: int = 0

    def __post_init__(self) -> None:
        check_delimiter(self.delimiter)
        self.neighbour_range(self.shard)  # validates size, shards and the index
        if self.attempt < 0:
            raise ConfigurationError(f"task attempt must be >= 0, got {self.attempt}")
        if (self.exchange_host is None) != (self.exchange_port is None):
            raise ConfigurationError("task needs both exchange_host and exchange_port, or neither")
        if self.exchange_ca is not None and not self.exchange_tls:
            raise ConfigurationError("task has an exchange_ca but exchange_tls is off")
        if not all(isinstance(name, str) and name and "=" not in name for name in self.command_env_drop):
            raise ConfigurationError(f"command_env_drop must be variable names, got {self.command_env_drop!r}")
        if self.max_line_bytes is not None and self.max_line_bytes < 1:
            raise ConfigurationError(f"max_line_bytes must be >= 1, got {self.max_line_bytes}")
        if self.part_size_bytes < 1 or self.max_in_flight_bytes < self.part_size_bytes:
            raise ConfigurationError(
                f"need 1 <= part_size_bytes ({self.part_size_bytes}) <= "
                f"max_in_flight_bytes ({self.max_in_flight_bytes})"
            )

    @property
    def range(self) -> ShardRange:
        return self.neighbour_range(self.shard)

    def neighbour_range(self, index: int) -> ShardRange:
        return ShardRange.of(self.size, self.shards, index)

    def to_json(self) -> str:
        # Not `asdict`: its recursive deep copy cost more than the rest of a
        # launch, and json.dumps needs none (every field is JSON-able as it is).
        data = {name: getattr(self, name) for name in _TASK_FIELDS}
        data["delimiter"] = self.delimiter.hex()
        data["secret"] = self.secret.hex()
        data["version"] = TASK_VERSION
        return json.dumps(data, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> ShardTask:
        try:
            data = json.loads(text)
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
            version = data.pop("version", None)
            if version != TASK_VERSION:
                raise ValueError(f"task version {version!r}, expected {TASK_VERSION}")
            data["delimiter"] = bytes.fromhex(data["delimiter"])
            data["secret"] = bytes.fromhex(data["secret"])
            data["command_env_drop"] = tuple(data.get("command_env_drop", ()))
            data["ok_exit"] = tuple(data.get("ok_exit", (0,)))
            return cls(**data)
        except (ValueError, TypeError, KeyError) as exc:
            raise ConfigurationError(f"invalid shard task: {exc}") from None


_TASK_FIELDS = tuple(f.name for f in fields(ShardTask))
