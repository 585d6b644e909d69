# The `lambda` backend: each shard attempt is one asynchronous AWS Lambda
# invocation of the worker function (`shardline.worker.lambda_handler`).
#
# An Event invoke only says "accepted"; nothing comes back when the function
# ends.  Liveness therefore comes from the exchange, exactly as for local
# workers: the start deadline counts from the accepted invoke to the worker's
# HELLO, the heartbeat deadline catches a function that died, and the job's
# retry and fencing logic re-invokes with a new attempt number.  A stopped
# attempt cannot be killed in Lambda; the exchange refuses it as stale, which
# stops it within a heartbeat.
#
# Lambda workers share no disk with the coordinator, so each attempt uploads
# its output to `staging` (s3://bucket/prefix/<job>/...), and the coordinator
# fetches the committed attempt's object.
#
# The backend's clients (the Lambda client of every invoke, the S3 client
# that clears the staging prefix at each job's end) live as long as it does:
# one backend serves every job of a daemon.

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable
from dataclasses import replace

from ..errors import ConfigurationError, StorageNetworkError
from ..io.aws import AwsSettings, ClientPool, error_code, translate_error
from ..io.retry import RetryPolicy, retry
from ..io.s3bucket import S3Bucket
from ..io.urls import parse_s3_prefix
from ..protocol import ShardTask, attempt_output_name
from ._backends import Backend, WorkerExit

__all__ = ["DEFAULT_LAMBDA_CONCURRENCY", "LambdaBackend"]

log = logging.getLogger("shardline.coordinator.lambda")

DEFAULT_LAMBDA_CONCURRENCY = 100
#: Throttled invokes (429) wait and try again for about this long in all
#: before the attempt counts as failed: throttling is back-pressure, not a fault.
_INVOKE_RETRY = RetryPolicy(attempts=12, base_delay_s=0.2, max_delay_s=10.0)
#: An asynchronous invoke's payload limit (256 KB).
_MAX_EVENT_BYTES = 256 * 1024
_FUNCTION = re.compile(r"(arn:aws[a-zA-Z-]*:lambda:[a-z0-9-]+:\d{12}:function:)?[a-zA-Z0-9-_]{1,64}(:[a-zA-Z0-9-_$]+)?")


class LambdaBackend(Backend):
    """Invokes `function` (a name or ARN, in `region` if given) once per
    attempt, at most `max_concurrency` attempts at a time; attempt outputs go
    to `staging`."""

    name = "lambda"
    observes_exit = False

    def __init__(
        self,
        *,
        function: str,
        staging: str,
        aws: AwsSettings,
        region: str | None = None,  # the function's, when it differs from the buckets'
        max_concurrency: int = DEFAULT_LAMBDA_CONCURRENCY,
        storage_retry: RetryPolicy,
        invoke_retry: RetryPolicy = _INVOKE_RETRY,
    ) -> None:
        if not _FUNCTION.fullmatch(function):
            raise ConfigurationError(f"--function: {function!r} is not a Lambda function name or ARN")
        if max_concurrency < 1:
            raise ConfigurationError(f"--lambda-concurrency must be >= 1, got {max_concurrency}")
        bucket, prefix = parse_s3_prefix(staging, what="--staging")
        self.function = function
        self.staging = f"s3://{bucket}/{prefix}"
        self.max_concurrency = max_concurrency
        self._staging_bucket = bucket
        self._staging_prefix = prefix
        self._aws = aws
        self._invoke_retry = invoke_retry
        self._storage_retry = storage_retry
        self._slots = asyncio.Semaphore(max_concurrency)
        self._clients = ClientPool()
        self._lambda = self._clients.lazy(replace(aws, region=region) if region else aws, "lambda")
        self.throttled = 0  # invokes answered 429, for metrics and tests

    async def run(self, task: ShardTask, *, on_started: Callable[[], None]) -> WorkerExit:
        payload = task.to_json().encode()
        if len(payload) > _MAX_EVENT_BYTES:
            raise ConfigurationError(f"shard task is {len(payload)} bytes, over Lambda's event limit")
        # The slot is held for the attempt's whole life, so at most
        # max_concurrency functions of ours run at once; waiting for one
        # does not count against the start deadline.
        async with self._slots:
            await self._invoke(task, payload)
            on_started()
            # Nothing reports the function's end: the exchange and the job's
            # deadlines do.  Cancellation (the job is done with the attempt) ends this.
            await asyncio.get_running_loop().create_future()
        return WorkerExit(ok=False, detail="unreachable")  # pragma: no cover

    async def _invoke(self, task: ShardTask, payload: bytes) -> None:
        what = f"invoke {self.function} for job {task.job_id} shard {task.shard} attempt {task.attempt}"

        async def attempt() -> None:
            lambda_ = await self._lambda.get()
            try:
                response = await lambda_.invoke(FunctionName=self.function, InvocationType="Event", Payload=payload)
            except Exception as exc:
                if error_code(exc) in ("TooManyRequestsException", "429"):
                    self.throttled += 1
                raise translate_error(exc, what=what) from exc
            status = response.get("StatusCode")
            if status != 202:
                raise StorageNetworkError(f"{what}: Lambda answered {status}, expected 202 for an Event invoke")

        await retry(attempt, policy=self._invoke_retry, describe=what)
        log.debug("%s: accepted", what)

    def output_location(self, job_id: str, shard: int, attempt: int) -> str:
        return f"{self.staging}{job_id}/{attempt_output_name(shard, attempt)}"

    async def discard_outputs(self, job_id: str) -> None:
        bucket = S3Bucket(self._staging_bucket, aws=self._aws, retry_policy=self._storage_retry, clients=self._clients)
        removed = await bucket.delete_prefix(f"{self._staging_prefix}{job_id}/")
        if removed:
            log.info("job %s: removed %d attempt outputs from %s", job_id, removed, self.staging)

    async def aclose(self) -> None:
        await self._clients.aclose()
