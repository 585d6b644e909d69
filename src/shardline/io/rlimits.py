"""The process's open-file limit: what a coordinator can hold at once.

Every exchange session, worker pipe, spool file and HTTP connection is a
file descriptor, and the usual soft limit (1024) is far below what one
daemon with a few hundred shards in flight needs.  The soft limit may be
raised to the hard limit without privileges, so the coordinator's entry
points (`shardline serve`, an embedded `shardline run`) do that at start.
"""

from __future__ import annotations

import logging
import resource

__all__ = ["open_files_limit", "raise_open_files_limit"]

log = logging.getLogger("shardline.io.rlimits")

#: Linux refuses a soft limit above fs.nr_open (2**20 by default), which an
#: "unlimited" hard limit would ask for.
_UNLIMITED_TARGET = 1 << 20


def open_files_limit() -> int:
    """The current soft RLIMIT_NOFILE (a large number when unlimited)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return _UNLIMITED_TARGET if soft == resource.RLIM_INFINITY else soft


def raise_open_files_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; log and return the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = _UNLIMITED_TARGET if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (OSError, ValueError) as exc:
            log.warning("could not raise the open file limit from %d to %d: %s", soft, target, exc)
    limit = open_files_limit()
    log.info("open file limit: %d (hard limit %s)", limit, "unlimited" if hard == resource.RLIM_INFINITY else hard)
    return limit
