# Where the exchange's secrets come from (pure functions, no I/O).
#
# Nothing secret is stored per job.  A coordinator holds one random key; a
# job's secret is derived from it and the job id, and each attempt's secret
# from the job's and the attempt's (shard, attempt).  A worker is given only
# its own attempt's secret, so it can authenticate as that attempt and no
# other: the server derives the secret a HELLO must be keyed with from the
# HELLO's own (job_id, shard, attempt), and the session key is derived from
# that attempt secret and both nonces (`_session.py`).

from __future__ import annotations

import hashlib
import hmac
import secrets

from ..errors import LocalProtocolError

__all__ = ["COORDINATOR_KEY_BYTES", "attempt_secret", "job_secret", "new_coordinator_key"]

#: Length of the coordinator key, and of every secret derived from it (SHA-256).
COORDINATOR_KEY_BYTES = 32

_JOB_LABEL = b"shardline-job-v1|"


def new_coordinator_key() -> bytes:
    """A fresh random coordinator key."""
    return secrets.token_bytes(COORDINATOR_KEY_BYTES)


def job_secret(coordinator_key: bytes, job_id: str) -> bytes:
    """HMAC-SHA256(key, "shardline-job-v1|" + job_id): one job's secret."""
    if len(coordinator_key) != COORDINATOR_KEY_BYTES:
        raise LocalProtocolError(f"a coordinator key has {COORDINATOR_KEY_BYTES} bytes, not {len(coordinator_key)}")
    return hmac.new(coordinator_key, _JOB_LABEL + job_id.encode(), hashlib.sha256).digest()


def attempt_secret(job_secret: bytes, shard: int, attempt: int) -> bytes:
    """HMAC-SHA256(job_secret, "attempt|{shard}|{attempt}"): the secret one
    shard attempt's exchange session is keyed with."""
    return hmac.new(job_secret, f"attempt|{shard}|{attempt}".encode(), hashlib.sha256).digest()
