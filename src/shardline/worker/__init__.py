"""The worker: runs one shard attempt (DESIGN §2, §3, §4).

Depends only on `shardline.protocol` and the I/O layer (`shardline.io`),
never on the coordinator, so a worker deployment (process, container,
Lambda) ships without it.  Entry points: `run_task()`
in-process, ``python -m shardline.worker`` (one task JSON on stdin, or
``--pool`` for one task per line, as the local backend runs it) and
``shardline worker``.
"""

from ._shard import ShardResult, WorkerSettings, run_task

__all__ = ["ShardResult", "WorkerSettings", "run_task"]
