"""The store (DESIGN §2): boundary markers with their conditional put and
fence, job and shard records, and leases, behind one contract
(`MarkerStore`, `JobStore`) with two real implementations -- SQLite (the
embedded default, one file in the state directory) and DynamoDB (on AWS) --
and a memory job store for runs whose jobs end with their process.

`open_marker_store` turns the location a shard task carries ("sqlite:PATH"
or "dynamodb:TABLE") into a store; see `shardline.io.store.locations`.
"""

from ._contract import DEFAULT_LEASE_S, DEFAULT_RECORD_TTL_S, JobStore, Lease, MarkerStore, StoredJob
from ._dynamojobs import DEFAULT_JOBS_TABLE, JOB_RECORD_SHARD, JOBS_INDEX, DynamoJobStore
from ._dynamomarkers import DynamoMarkerStore
from ._locations import STORE_FILE, dynamodb_location, open_marker_store, parse_location, sqlite_location
from ._memory import MemoryJobStore
from ._sqlite import SqliteDatabase, SqliteJobStore, SqliteMarkerStore
from ._tables import (
    JOBS_INDEX_ATTRIBUTES,
    JOBS_INDEX_DEFINITION,
    ensure_jobs_table,
    ensure_marker_table,
    ensure_table,
    marker_table_create_command,
    table_create_command,
)

__all__ = [
    "DEFAULT_JOBS_TABLE",
    "DEFAULT_LEASE_S",
    "DEFAULT_RECORD_TTL_S",
    "JOBS_INDEX",
    "JOBS_INDEX_ATTRIBUTES",
    "JOBS_INDEX_DEFINITION",
    "JOB_RECORD_SHARD",
    "STORE_FILE",
    "DynamoJobStore",
    "DynamoMarkerStore",
    "JobStore",
    "Lease",
    "MarkerStore",
    "MemoryJobStore",
    "SqliteDatabase",
    "SqliteJobStore",
    "SqliteMarkerStore",
    "StoredJob",
    "dynamodb_location",
    "ensure_jobs_table",
    "ensure_marker_table",
    "ensure_table",
    "marker_table_create_command",
    "open_marker_store",
    "parse_location",
    "sqlite_location",
    "table_create_command",
]
