"""``python -m shardline.worker [--pool]``: run shard tasks read as JSON from stdin.

Without arguments: run the one task on stdin and exit; status 0 means the
shard finished and was reported, 1 that it failed (the error is on stderr and
was reported to the exchange when one is configured), 2 that the task itself
was invalid.

With ``--pool`` (what the coordinator's local backend starts): run many
tasks at once, each started by a stdin line ``run ID TASK_JSON`` (and
cancelled by ``cancel ID``), answer each with one JSON line ``{"id": ID,
"ok": bool, "detail": str}`` on stdout when it ends, and stop, cancelling
every running task, at stdin EOF or SIGTERM.
"""

from ._main import main

if __name__ == "__main__":
    raise SystemExit(main())
