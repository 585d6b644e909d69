# DynamoDB tables the coordinator needs, created on demand when allowed.
#
# The marker table and the jobs table share one schema (job S HASH, shard N
# RANGE, TTL on expires_at), so one function creates either; the named
# wrappers keep call sites readable.

from __future__ import annotations

import asyncio
import logging
from typing import Any

from ...errors import ConfigurationError
from ...protocol import MARKER_ATTRIBUTE_DEFINITIONS, MARKER_KEY_SCHEMA, MARKER_TTL_ATTRIBUTE
from ..aws import error_code, translate_error
from ._dynamojobs import JOBS_INDEX

__all__ = [
    "JOBS_INDEX_ATTRIBUTES",
    "JOBS_INDEX_DEFINITION",
    "ensure_jobs_table",
    "ensure_marker_table",
    "ensure_table",
    "marker_table_create_command",
    "table_create_command",
]

log = logging.getLogger("shardline.io.store")

_ACTIVE_WAIT_S = 120.0


#: The jobs table's sparse index of job records (see `_dynamo`): listing jobs reads only them.
JOBS_INDEX_ATTRIBUTES = [
    {"AttributeName": "kind", "AttributeType": "S"},
    {"AttributeName": "created_at", "AttributeType": "N"},
]
JOBS_INDEX_DEFINITION = {
    "IndexName": JOBS_INDEX,
    "KeySchema": [{"AttributeName": "kind", "KeyType": "HASH"}, {"AttributeName": "created_at", "KeyType": "RANGE"}],
    "Projection": {"ProjectionType": "ALL"},
}


def table_create_command(table: str, *, jobs: bool = False) -> str:
    """The AWS CLI command that creates a shardline table (the marker table, or with `jobs` the jobs table)."""
    attributes = "AttributeName=job,AttributeType=S AttributeName=shard,AttributeType=N"
    index = ""
    if jobs:
        attributes += " AttributeName=kind,AttributeType=S AttributeName=created_at,AttributeType=N"
        index = (
            f" --global-secondary-indexes 'IndexName={JOBS_INDEX},KeySchema=[{{AttributeName=kind,KeyType=HASH}},"
            "{AttributeName=created_at,KeyType=RANGE}],Projection={ProjectionType=ALL}'"
        )
    return (
        f"aws dynamodb create-table --table-name {table} --attribute-definitions {attributes} "
        "--key-schema AttributeName=job,KeyType=HASH AttributeName=shard,KeyType=RANGE "
        f"--billing-mode PAY_PER_REQUEST{index} && "
        f"aws dynamodb update-time-to-live --table-name {table} "
        f"--time-to-live-specification Enabled=true,AttributeName={MARKER_TTL_ATTRIBUTE}"
    )


#: The name callers used before the jobs table existed.
marker_table_create_command = table_create_command


async def ensure_marker_table(dynamodb: Any, table: str, *, create: bool = True) -> None:
    """Make sure the boundary-marker table exists and is ACTIVE, creating it if allowed."""
    await ensure_table(dynamodb, table, create=create)


async def ensure_jobs_table(dynamodb: Any, table: str, *, create: bool = True) -> None:
    """Make sure the job-state table (with its index of job records) exists and is ACTIVE, creating it if allowed."""
    await ensure_table(dynamodb, table, create=create, jobs=True)


async def ensure_table(dynamodb: Any, table: str, *, create: bool = True, jobs: bool = False) -> None:
    """Make sure `table` exists with the shared schema and is ACTIVE, creating it if allowed."""
    how = f"create it with: {table_create_command(table, jobs=jobs)}"
    status = await _table_status(dynamodb, table)
    if status is None:
        if not create:
            raise ConfigurationError(f"DynamoDB table {table!r} does not exist; {how}")
        try:
            await dynamodb.create_table(
                TableName=table,
                KeySchema=MARKER_KEY_SCHEMA,
                AttributeDefinitions=MARKER_ATTRIBUTE_DEFINITIONS + (JOBS_INDEX_ATTRIBUTES if jobs else []),
                BillingMode="PAY_PER_REQUEST",
                **({"GlobalSecondaryIndexes": [JOBS_INDEX_DEFINITION]} if jobs else {}),
            )
            log.info("created DynamoDB table %s", table)
        except Exception as exc:
            code = error_code(exc)
            if code == "ResourceInUseException":
                pass  # someone else created it first
            elif code in ("AccessDeniedException", "UnrecognizedClientException", "403"):
                raise ConfigurationError(
                    f"DynamoDB table {table!r} does not exist and cannot be created ({code}); {how}"
                ) from exc
            else:
                raise translate_error(exc, what=f"creating DynamoDB table {table!r}") from exc
        with_ttl = True
    else:
        with_ttl = False
    deadline = asyncio.get_running_loop().time() + _ACTIVE_WAIT_S
    while (status := await _table_status(dynamodb, table)) != "ACTIVE":
        if asyncio.get_running_loop().time() > deadline:
            raise ConfigurationError(f"DynamoDB table {table!r} is still {status} after {_ACTIVE_WAIT_S:.0f}s")
        await asyncio.sleep(0.5)
    if with_ttl:
        try:
            await dynamodb.update_time_to_live(
                TableName=table, TimeToLiveSpecification={"Enabled": True, "AttributeName": MARKER_TTL_ATTRIBUTE}
            )
        except Exception as exc:  # items then live until deleted by hand; not fatal
            log.warning("could not enable TTL on %s: %s", table, exc)


async def _table_status(dynamodb: Any, table: str) -> str | None:
    try:
        response = await dynamodb.describe_table(TableName=table)
    except Exception as exc:
        if error_code(exc) == "ResourceNotFoundException":
            return None
        raise translate_error(exc, what=f"describing DynamoDB table {table!r}") from exc
    return str(response["Table"]["TableStatus"])
