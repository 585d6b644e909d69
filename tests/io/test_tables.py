"""The DynamoDB tables (`shardline.io.store`): the jobs and marker tables
share one key schema, are created on demand with a TTL, and a missing table
that may not be created is an error naming the command that creates it."""

from __future__ import annotations

import uuid

import pytest

from shardline.errors import ConfigurationError
from shardline.io.aws import client
from shardline.io.store import (
    ensure_jobs_table,
    ensure_marker_table,
    ensure_table,
    marker_table_create_command,
    table_create_command,
)
from shardline.protocol import MARKER_TTL_ATTRIBUTE


async def test_jobs_and_marker_tables_share_one_schema(dynamodb) -> None:
    jobs, markers = f"jobs-{uuid.uuid4().hex[:12]}", f"markers-{uuid.uuid4().hex[:12]}"
    await ensure_jobs_table(dynamodb, jobs)
    await ensure_jobs_table(dynamodb, jobs)  # idempotent
    await ensure_marker_table(dynamodb, markers)
    described = [(await dynamodb.describe_table(TableName=name))["Table"] for name in (jobs, markers)]
    for table in described:
        assert table["TableStatus"] == "ACTIVE"
        assert table["KeySchema"] == described[0]["KeySchema"]
    assert sorted(d["AttributeName"] for d in described[1]["AttributeDefinitions"]) == ["job", "shard"]
    # The jobs table adds the sparse index that lists job records by creation time.
    assert sorted(d["AttributeName"] for d in described[0]["AttributeDefinitions"]) == [
        "created_at",
        "job",
        "kind",
        "shard",
    ]
    assert [index["IndexName"] for index in described[0]["GlobalSecondaryIndexes"]] == ["jobs-by-kind"]
    for name in (jobs, markers):
        ttl = (await dynamodb.describe_time_to_live(TableName=name))["TimeToLiveDescription"]
        assert ttl["TimeToLiveStatus"] == "ENABLED"
        assert ttl["AttributeName"] == MARKER_TTL_ATTRIBUTE


@pytest.mark.parametrize("ensure", [ensure_jobs_table, ensure_marker_table, ensure_table])
async def test_missing_table_without_create_names_the_command(dynamodb, ensure) -> None:
    name = f"missing-{uuid.uuid4().hex[:12]}"
    with pytest.raises(ConfigurationError, match="does not exist") as info:
        await ensure(dynamodb, name, create=False)
    assert table_create_command(name, jobs=ensure is ensure_jobs_table) in str(info.value)
    assert marker_table_create_command(name) == table_create_command(name)
    assert (await dynamodb.list_tables())["TableNames"].count(name) == 0


async def test_missing_table_is_reported_with_the_create_command(aws_settings):
    table = f"missing-{uuid.uuid4().hex[:8]}"
    async with client(aws_settings, "dynamodb") as dynamodb:
        with pytest.raises(ConfigurationError) as info:
            await ensure_marker_table(dynamodb, table, create=False)
    assert table in str(info.value)
    assert marker_table_create_command(table) in str(info.value)


async def test_missing_table_is_created_on_demand_with_ttl(aws_settings):
    table = f"created-{uuid.uuid4().hex[:8]}"
    async with client(aws_settings, "dynamodb") as dynamodb:
        await ensure_marker_table(dynamodb, table)
        await ensure_marker_table(dynamodb, table)  # idempotent
        ttl = await dynamodb.describe_time_to_live(TableName=table)
    assert ttl["TimeToLiveDescription"]["AttributeName"] == "expires_at"
