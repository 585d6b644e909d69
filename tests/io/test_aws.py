"""`io.aws`'s blocking clients (botocore in threads), against the moto server."""

from __future__ import annotations

import pytest

from shardline.errors import SourceNotFoundError
from shardline.io.aws import BlockingClient, ClientPool
from shardline.io.sources import open_source


async def test_a_blocking_pool_stats_an_object_and_names_a_missing_one(aws_settings, s3, bucket):
    s3.put_object(Bucket=bucket, Key="present", Body=b"0123456789\n")
    async with ClientPool(blocking=True) as clients:
        async with open_source(f"s3://{bucket}/present", aws_settings, clients=clients) as source:
            info = await source.stat()
        assert info.size == 11
        assert info.etag == s3.head_object(Bucket=bucket, Key="present")["ETag"]
        with pytest.raises(SourceNotFoundError, match="no such key 'absent'"):
            async with open_source(f"s3://{bucket}/absent", aws_settings, clients=clients) as source:
                await source.stat()
        assert isinstance(await clients.get(aws_settings, "s3"), BlockingClient)
        assert clients.clients_open == 1  # one client, made once, for both stats


async def test_a_blocking_client_offers_operations_only(aws_settings):
    async with ClientPool(blocking=True) as clients:
        dynamodb = await clients.get(aws_settings, "dynamodb")
        assert "TableNames" in await dynamodb.list_tables()
        with pytest.raises(AttributeError, match="aiobotocore"):
            dynamodb.get_paginator("list_tables")
        assert dynamodb.meta.service_model.service_name == "dynamodb"
