"""``python -m shardline.worker``: run one shard task read as JSON from stdin.

This is what the coordinator's local backend starts.  Exit status 0 means the
shard finished and was reported; 1 means it failed (the error is on stderr
and was reported to the exchange when one is configured); 2 means the task
itself was invalid.
"""

from ._main import main

if __name__ == "__main__":
    raise SystemExit(main())
