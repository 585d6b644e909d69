# Where a store lives, as one string a shard task can carry: "sqlite:PATH"
# (a file every local process can open) or "dynamodb:TABLE" (reachable from
# anywhere, Lambda included).  `open_marker_store` opens the marker store a
# location names, with whatever client it needs, and closes both together.

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

from ...errors import ConfigurationError
from ..aws import AwsSettings, ClientPool, client
from ..retry import RetryPolicy
from ._contract import MarkerStore
from ._dynamomarkers import DynamoMarkerStore
from ._sqlite import SqliteDatabase, SqliteMarkerStore

__all__ = ["STORE_FILE", "dynamodb_location", "open_marker_store", "parse_location", "sqlite_location"]

#: The SQLite store's file name in the state directory.
STORE_FILE = "shardline.db"
_SQLITE = "sqlite:"
_DYNAMODB = "dynamodb:"


def sqlite_location(path: str) -> str:
    return _SQLITE + os.path.abspath(path)


def dynamodb_location(table: str) -> str:
    return _DYNAMODB + table


def parse_location(location: str) -> tuple[str, str]:
    """("sqlite", path) or ("dynamodb", table); a ConfigurationError names anything else."""
    if location.startswith(_SQLITE) and os.path.isabs(location[len(_SQLITE) :]):
        return "sqlite", location[len(_SQLITE) :]
    if location.startswith(_DYNAMODB) and location[len(_DYNAMODB) :]:
        return "dynamodb", location[len(_DYNAMODB) :]
    raise ConfigurationError(f"not a store location (sqlite:/absolute/path or dynamodb:TABLE): {location!r}")


@asynccontextmanager
async def open_marker_store(
    location: str, *, aws: AwsSettings, retry_policy: RetryPolicy, clients: ClientPool | None = None
) -> AsyncIterator[MarkerStore]:
    """The marker store at `location`, open for the `async with` block.

    With `clients`, the store uses the pool's shared DynamoDB client or
    SQLite database (one connection and thread per process), left open.
    """
    kind, where = parse_location(location)
    async with AsyncExitStack() as stack:
        if clients is not None:
            if kind == "sqlite":
                database = clients.shared(("sqlite", where), lambda: SqliteDatabase(where), SqliteDatabase.aclose)
                yield SqliteMarkerStore(database, retry_policy=retry_policy)
            else:
                yield DynamoMarkerStore(await clients.get(aws, "dynamodb"), where, retry_policy=retry_policy)
            return
        store: MarkerStore
        if kind == "sqlite":
            store = SqliteMarkerStore(SqliteDatabase(where), retry_policy=retry_policy)
        else:
            dynamodb = await stack.enter_async_context(client(aws, "dynamodb"))
            store = DynamoMarkerStore(dynamodb, where, retry_policy=retry_policy)
        stack.push_async_callback(store.aclose)
        yield store
