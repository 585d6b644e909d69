"""The coordinator: plans jobs, starts workers, relays fragments, verifies output.

Depends on `shardline.protocol` and the shared I/O helpers, never on
`shardline.worker`: backends start workers by module name or by invoking a
function, and results come back over the exchange.
"""

from ._backends import Backend, LocalProcessBackend, WorkerExit
from ._exchange import ExchangeHooks, ExchangeServer
from ._job import CoordinatorSettings, JobProgress, JobReport, JobSpec, ShardReport, run_job
from ._tables import ensure_marker_table, marker_table_create_command

__all__ = [
    "Backend",
    "CoordinatorSettings",
    "ExchangeHooks",
    "ExchangeServer",
    "JobProgress",
    "JobReport",
    "JobSpec",
    "LocalProcessBackend",
    "ShardReport",
    "WorkerExit",
    "ensure_marker_table",
    "marker_table_create_command",
    "run_job",
]
