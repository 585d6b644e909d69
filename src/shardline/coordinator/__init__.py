"""The coordinator: accepts jobs, starts workers, relays fragments, verifies output.

Depends on `shardline.protocol` and the I/O layer (`shardline.io`), never on
`shardline.worker`: backends start workers by module name or by invoking a
function, and results come back over the exchange.
"""

from ._backends import Backend, LocalProcessBackend, WorkerExit
from ._context import CoordinatorSettings
from ._exchange import ExchangeHooks, ExchangeServer, server_tls_context
from ._http import HttpServer, make_app
from ._httpguard import HttpAccess, HttpLimits, is_loopback_host
from ._lambda import DEFAULT_LAMBDA_CONCURRENCY, LambdaBackend
from ._outputs import OutputPolicy
from ._release import OutputPiece
from ._service import Coordinator, JobProgress, JobReport, ShardReport, copy_piece, run_job
from ._spool import MEMORY_SPOOL_DIR, SpoolDir, choose_spool_dir, sweep_spools
from ._store import DEFAULT_JOBS_TABLE, DynamoJobStore, JobStore, MemoryJobStore

__all__ = [
    "DEFAULT_JOBS_TABLE",
    "DEFAULT_LAMBDA_CONCURRENCY",
    "MEMORY_SPOOL_DIR",
    "Backend",
    "Coordinator",
    "CoordinatorSettings",
    "DynamoJobStore",
    "ExchangeHooks",
    "ExchangeServer",
    "HttpAccess",
    "HttpLimits",
    "HttpServer",
    "JobProgress",
    "JobReport",
    "JobStore",
    "LambdaBackend",
    "LocalProcessBackend",
    "MemoryJobStore",
    "OutputPiece",
    "OutputPolicy",
    "ShardReport",
    "SpoolDir",
    "WorkerExit",
    "choose_spool_dir",
    "copy_piece",
    "is_loopback_host",
    "make_app",
    "run_job",
    "server_tls_context",
    "sweep_spools",
]
