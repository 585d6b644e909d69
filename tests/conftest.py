"""Shared fixtures: one moto server (S3 + DynamoDB) per test session, and
what most layers' tests need of it.

This directory is on sys.path, so every test imports the shared helpers
beside this file (servers, faultproxy, jobs, polling, ...) by name.
"""

from __future__ import annotations

import itertools
import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from shardline.io.aws import AwsSettings, client
from shardline.io.store import ensure_marker_table
from shardline.protocol import DEFAULT_MARKER_TABLE, ShardTask

from servers import Endpoint, MotoServer
from tasks import task_maker

# Never let botocore wander off to instance metadata from a test.
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")

_bucket_numbers = itertools.count()


@pytest.fixture(scope="session", autouse=True)
def private_state_dir(tmp_path_factory) -> Path:
    """Whatever a test runs in-process keeps its state (a daemon's token) here, never in ~."""
    path = tmp_path_factory.mktemp("state")
    os.environ["SHARDLINE_STATE_DIR"] = str(path)
    return path


@pytest.fixture(scope="session")
def moto() -> Endpoint:
    server = MotoServer()
    endpoint = server.start()
    yield endpoint
    server.stop()


@pytest.fixture(scope="session")
def aws_settings(moto: Endpoint) -> AwsSettings:
    """Settings that point both services at the session's moto server."""
    return moto.aws_settings(read_timeout_s=10.0)


@pytest.fixture(scope="session")
def s3(moto: Endpoint):
    """A plain synchronous boto3 S3 client for arranging test data."""
    return moto.boto3_client("s3")


@pytest.fixture
def bucket(s3) -> str:
    """A fresh, empty bucket for one test."""
    name = f"test-{os.getpid()}-{next(_bucket_numbers)}"
    s3.create_bucket(Bucket=name)
    return name


@pytest.fixture
async def dynamodb(aws_settings: AwsSettings):
    """shardline's own (aioboto3) DynamoDB client on the session's moto server."""
    async with client(aws_settings, "dynamodb") as dynamodb:
        yield dynamodb


@pytest.fixture(scope="session")
async def marker_table(aws_settings: AwsSettings) -> str:
    """The default marker table, created once: jobs never share a job id, so tests may share it."""
    async with client(aws_settings, "dynamodb") as dynamodb:
        await ensure_marker_table(dynamodb, DEFAULT_MARKER_TABLE)
    return DEFAULT_MARKER_TABLE


@pytest.fixture
async def make_task(tmp_path: Path, aws_settings: AwsSettings, marker_table: str) -> Callable[..., ShardTask]:
    """Tasks over `tasks.DATA` as a coordinator builds them (`tasks.task_maker`)."""
    return await task_maker(tmp_path, aws_settings, marker_table)


@pytest.fixture(scope="session")
def worker_package(tmp_path_factory) -> Path:
    """`shardline package-worker`'s zip, built once (pip fetches aioboto3 for
    Lambda's platform from the package index, or pip's cache)."""
    from shardline.packaging import build_worker_zip

    return build_worker_zip(tmp_path_factory.mktemp("package") / "shardline-worker.zip").path


@pytest.fixture(scope="session")
def worker_package_dir(worker_package: Path, tmp_path_factory) -> Path:
    """The package unzipped, as Lambda lays it out in /var/task."""
    import zipfile

    directory = tmp_path_factory.mktemp("task-root")
    with zipfile.ZipFile(worker_package) as archive:
        archive.extractall(directory)
    return directory
