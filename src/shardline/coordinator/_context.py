# What every job of one coordinator shares: its settings (one frozen object,
# built at the edge by `shardline run` or `shardline serve`) and the live
# resources jobs use (store, marker fences, S3 clients, metrics).

from __future__ import annotations

from dataclasses import dataclass, field

from ..io.aws import AwsSettings
from ..io.retry import RetryPolicy
from ..io.s3bucket import S3Buckets
from ..io.store import DEFAULT_JOBS_TABLE, DEFAULT_LEASE_S, JobStore, MarkerStore, dynamodb_location
from ..protocol import DEFAULT_MARKER_TABLE, JobLimits
from ._destination import OutputPolicy
from ._metrics import CoordinatorMetrics
from ._spool import MEMORY_SPOOL_DIR

__all__ = ["CoordinatorSettings", "JobContext"]


#: Far above any backend's concurrency (local processes, 64 in-process
#: tasks, the Lambda concurrency), so it never holds a free slot back.
DEFAULT_MAX_LIVE_ATTEMPTS = 2048


@dataclass(frozen=True, slots=True, kw_only=True)
class CoordinatorSettings:
    #: Where boundary markers go, as workers reach them ("sqlite:PATH" or "dynamodb:TABLE").
    markers: str = dynamodb_location(DEFAULT_MARKER_TABLE)
    jobs_table: str = DEFAULT_JOBS_TABLE
    #: A job's lease lasts this long unless renewed (every third of it); another
    #: coordinator sharing the store may take the job over once it has run out.
    lease_s: float = DEFAULT_LEASE_S
    #: Root for job spools (one directory per job); None picks one per job
    #: (`choose_spool_dir`).  A daemon that must resume after a restart needs
    #: a root that survives it.
    spool_dir: str | None = None
    #: Where `choose_spool_dir` looks first (memory-backed), and how much of
    #: it the spools of live jobs may claim in all (None: what is free).
    memory_spool_dir: str = MEMORY_SPOOL_DIR
    memory_spool_limit_bytes: int | None = None
    #: Address workers use to reach the exchange (the listener's own by default).
    #: With TLS it must be a name the exchange's certificate holds.
    advertise_host: str | None = None
    #: PEM of the CA that workers verify a TLS exchange's certificate with
    #: (sent in each task); None: the workers' system trust store.
    exchange_ca: str | None = None
    #: How long a finished job and its kept output stay available.
    retain_s: float = 3600.0
    #: Backoff before retry n is base/2 + jitter(min(max, base * 2**(n-1))).
    retry_backoff_s: float = 0.5
    retry_backoff_max_s: float = 15.0
    #: Speculate once this fraction of shards is done, on a shard running
    #: longer than `speculate_slowdown` x the median commit time (and at
    #: least `speculate_min_s`).
    speculate_after_fraction: float = 0.75
    speculate_slowdown: float = 3.0
    speculate_min_s: float = 10.0
    #: How often deadlines are checked.
    supervise_interval_s: float = 0.25
    #: Attempts of one job launched and not yet ended, at most.  Backends queue
    #: attempts beyond their own capacity anyway; this bounds what a job holds
    #: for them (a task and a ShardTask each), so that a job of 20,000 shards
    #: launches this many at submit, and the next one as each ends.
    max_live_attempts: int = DEFAULT_MAX_LIVE_ATTEMPTS
    #: Which destinations jobs may write (`JobSpec.output`); the default allows none.
    output_policy: OutputPolicy = OutputPolicy()
    #: Variables kept out of every command's environment (shards' and the
    #: reduce's), on top of the ``SHARDLINE_*`` ones that never reach a command.
    command_env_drop: tuple[str, ...] = ()
    #: The most a submitted job may ask for (checked by `Coordinator.submit`).
    job_limits: JobLimits = JobLimits()
    #: Every storage call of the coordinator (S3, the store, marker fences) retries by this.
    retry: RetryPolicy = RetryPolicy()


@dataclass(frozen=True, slots=True, kw_only=True)
class JobContext:
    """What every job of one coordinator shares."""

    aws: AwsSettings
    store: JobStore
    settings: CoordinatorSettings
    metrics: CoordinatorMetrics
    exchange_address: tuple[str, int]
    #: Workers dial the exchange over TLS (and verify it with settings.exchange_ca).
    exchange_tls: bool
    #: Every job's exchange secret is derived from it (protocol.job_secret).
    coordinator_key: bytes = field(repr=False)
    markers: MarkerStore  # for marker fences
    #: Remote workers' attempt outputs (checked on DONE, fetched at release).
    s3_buckets: S3Buckets
