"""The worker: runs one shard attempt (DESIGN §2, §3, §4).

Depends only on `shardline.protocol` and the I/O layer (`shardline.io`),
never on the coordinator, so a worker deployment (process, container,
Lambda) ships without it.  Entry points: `run_task()`
in-process, ``python -m shardline.worker`` (one task JSON on stdin, or
``--pool`` for one task per line, as the local backend runs it) and
``shardline worker``.  Its parts, for those who drive one alone (tests,
benchmarks): the ranged reader (`RangedReader`, `fetch_range`) and the
exchange client (`ExchangeClient`).
"""

from ..io.collector import collection_paused

# What a worker process (a pool's, a Lambda's) imports first, and keeps for
# good: built with the garbage collector paused (io/collector.py).
with collection_paused():
    from ._exchange import ExchangeClient, client_tls_context
    from ._reader import RangedReader, ReaderSettings, ReaderStats, fetch_range
    from ._shard import ShardResult, WorkerSettings, run_task

__all__ = [
    "ExchangeClient",
    "RangedReader",
    "ReaderSettings",
    "ReaderStats",
    "ShardResult",
    "WorkerSettings",
    "client_tls_context",
    "fetch_range",
    "run_task",
]
