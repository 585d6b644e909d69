"""The coordinator: accepts jobs, starts workers, relays fragments, verifies output.

Depends on `shardline.protocol` and the I/O layer (`shardline.io`), never on
`shardline.worker`: backends start workers by module name or by invoking a
function, and results come back over the exchange.

The HTTP API and the Lambda backend (aiohttp's server, about a quarter of a
second of imports) and the output destinations load on first use of their
names, so an embedded ``shardline run`` that serves no HTTP and writes to
stdout never imports them.
"""

from typing import TYPE_CHECKING, Any

from ._actions import CommitShard, FailJob, Launch, RaiseFence, SaveShard, StopAttempt, SupervisorSettings
from ._backends import Backend, LocalProcessBackend, WorkerExit
from ._context import CoordinatorSettings
from ._destination import Destination, OutputPolicy
from ._exchange import ExchangeHooks, ExchangeServer
from ._exchangeio import server_tls_context
from ._manifest import MANIFEST_VERSION, ManifestShard, build_manifest, file_checksum
from ._metrics import CoordinatorMetrics, render_prometheus
from ._release import OutputPiece, ReduceRunner
from ._runjob import JobProgress, JobReport, ShardReport, copy_piece, run_job
from ._service import Coordinator
from ._spool import MEMORY_SPOOL_DIR, SpoolDir, choose_spool_dir, sweep_spools
from ._supervisor import Supervisor

if TYPE_CHECKING:
    from ._http import HttpServer, make_app, openapi_document
    from ._httpguard import HttpAccess, HttpLimits
    from ._lambda import DEFAULT_LAMBDA_CONCURRENCY, LambdaBackend
    from ._outputs import LocalDirectoryDestination, S3Destination, open_destination

#: Names imported on first use, by module.
_LAZY = {
    "HttpServer": "_http",
    "make_app": "_http",
    "openapi_document": "_http",
    "HttpAccess": "_httpguard",
    "HttpLimits": "_httpguard",
    "DEFAULT_LAMBDA_CONCURRENCY": "_lambda",
    "LambdaBackend": "_lambda",
    "LocalDirectoryDestination": "_outputs",
    "S3Destination": "_outputs",
    "open_destination": "_outputs",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


__all__ = [
    "DEFAULT_LAMBDA_CONCURRENCY",
    "MANIFEST_VERSION",
    "MEMORY_SPOOL_DIR",
    "Backend",
    "CommitShard",
    "Coordinator",
    "CoordinatorMetrics",
    "CoordinatorSettings",
    "Destination",
    "ExchangeHooks",
    "ExchangeServer",
    "FailJob",
    "HttpAccess",
    "HttpLimits",
    "HttpServer",
    "JobProgress",
    "JobReport",
    "LambdaBackend",
    "Launch",
    "LocalDirectoryDestination",
    "LocalProcessBackend",
    "ManifestShard",
    "OutputPiece",
    "OutputPolicy",
    "RaiseFence",
    "ReduceRunner",
    "S3Destination",
    "SaveShard",
    "ShardReport",
    "SpoolDir",
    "StopAttempt",
    "Supervisor",
    "SupervisorSettings",
    "WorkerExit",
    "build_manifest",
    "choose_spool_dir",
    "copy_piece",
    "file_checksum",
    "make_app",
    "open_destination",
    "openapi_document",
    "render_prometheus",
    "run_job",
    "server_tls_context",
    "sweep_spools",
]
