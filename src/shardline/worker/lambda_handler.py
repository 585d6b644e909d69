"""AWS Lambda entry point of a shardline worker.

Handler string: ``shardline.worker.lambda_handler.handler``.  The invoke
event is the shard task as a JSON object (`ShardTask.to_json()`), sent by
the coordinator's `lambda` backend.  The handler runs the shard exactly as a
local worker does (`run_task`); the task's ``output_path`` is an
``s3://`` URL, so the output is uploaded there before DONE is reported.

- Time: the shard stops `SHARDLINE_LAMBDA_RESERVE_MS` (default 10000) before
  the function's timeout and reports FAILED, so the coordinator retries at
  once instead of waiting out a heartbeat deadline.
- Result: a JSON object ``{"ok", "job_id", "shard", "attempt", "detail",
  "retryable", "bytes", "output_bytes", "tail_sources", "invocation",
  "clients_created"}``.  A failed shard is *returned*, never raised: the
  coordinator owns retries, and an error raised here would make Lambda retry
  an asynchronous invoke on its own.  ``invocation`` counts the invocations
  this process has served (1 on a cold start), ``clients_created`` the AWS
  clients it has made in all.
- Warm starts: Lambda runs one invocation after another in a warm process,
  and they share one event loop and, on it, the S3 and DynamoDB clients
  (with their open connections; making them costs milliseconds of CPU).
  The clients are made again when the credentials, region or endpoints in
  the environment change (Lambda rotates its role credentials there), and
  the loop and clients both after an internal error.  Everything else is
  per invocation: the task's secret, the commands' environment, the sweep
  of the processes they leave, the output file in ``/tmp``.
- Logs: one JSON object per line (CloudWatch Logs Insights reads the
  fields), with the job, shard and attempt on every line.

Imports only `shardline.worker`, `shardline.protocol` and the shared I/O
helpers, so a deployment package needs nothing else (`shardline
package-worker`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
import time
from dataclasses import replace
from typing import Any

from ..errors import ConfigurationError, ShardlineError
from ..io.aws import ClientPool, client_environment
from ..io.processes import adopt_orphans, hide_environment
from ..io.store import parse_location
from ..protocol import ShardTask
from ._shard import ShardResult, WorkerSettings, is_retryable, run_task

__all__ = ["DEFAULT_RESERVE_MS", "JsonLogFormatter", "handler"]

log = logging.getLogger("shardline.worker.lambda")

#: Time kept back from the function's timeout to report a failure.
DEFAULT_RESERVE_MS = 10_000
#: Attributes every LogRecord has; anything else was passed in `extra`.
_STANDARD_ATTRIBUTES = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


class JsonLogFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, extras
    (such as the runtime's aws_request_id).  `end` is appended for handlers
    that, unlike StreamHandler, write the formatted text as it is
    (awslambdaric's)."""

    def __init__(self, *, end: str = "", **fields: Any) -> None:
        super().__init__()
        self.end = end
        self.fields = fields

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **self.fields,
        }
        entry.update((k, v) for k, v in record.__dict__.items() if k not in _STANDARD_ATTRIBUTES and v is not None)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str) + self.end


def _configure_logging(**fields: Any) -> None:
    """JSON lines on the runtime's own log handlers (or stdout outside Lambda)."""
    root = logging.getLogger()
    if not root.handlers:
        root.addHandler(logging.StreamHandler(sys.stdout))
    for log_handler in root.handlers:
        end = "" if isinstance(log_handler, logging.StreamHandler) else "\n"
        log_handler.setFormatter(JsonLogFormatter(end=end, **fields))
    root.setLevel(os.environ.get("SHARDLINE_LOG_LEVEL", "INFO").upper())
    for noisy in ("botocore", "aiobotocore", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _reserve_s() -> float:
    text = os.environ.get("SHARDLINE_LAMBDA_RESERVE_MS", str(DEFAULT_RESERVE_MS))
    try:
        reserve_ms = int(text)
    except ValueError:
        reserve_ms = -1
    if reserve_ms < 0:
        raise ConfigurationError(f"SHARDLINE_LAMBDA_RESERVE_MS must be a whole number of milliseconds, got {text!r}")
    return reserve_ms / 1000


class _WarmProcess:
    """What this process keeps from one invocation to the next: an event
    loop, and on it the clients every shard shares (aiobotocore clients
    belong to the loop they were made on, so the loop is kept too).
    Invocations come one at a time (the runtime calls the handler in a loop),
    so between two of them nothing runs on the loop and nothing uses a client."""

    def __init__(self) -> None:
        self.invocations = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._clients: ClientPool | None = None
        #: `client_environment()` when the clients were made.
        self._clients_environment: tuple[str | None, ...] | None = None
        self._clients_closed = 0  # made by pools closed since

    @property
    def clients_created(self) -> int:
        """AWS clients this process has made so far, in all."""
        return self._clients_closed + (self._clients.clients_open if self._clients is not None else 0)

    def run_task(self, task: ShardTask, *, settings: WorkerSettings, time_budget_s: float | None) -> ShardResult:
        """`run_task(task)` on the kept loop with the kept clients."""
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
        loop = self._loop
        try:
            return loop.run_until_complete(self._run(task, settings=settings, time_budget_s=time_budget_s))
        except ShardlineError:
            raise  # the shard's failure: the loop and clients did their part and are fine
        except BaseException:
            # A bug, or a cancelled run: nothing kept may be trusted any more.
            self.discard()
            raise
        finally:
            if not loop.is_closed():
                _cancel_leftover_tasks(loop)

    async def _run(self, task: ShardTask, *, settings: WorkerSettings, time_budget_s: float | None) -> ShardResult:
        environment = client_environment()
        if self._clients is not None and environment != self._clients_environment:
            log.info("the AWS credentials or endpoints in the environment changed: making new clients")
            await self._close_clients()
        if self._clients is None:
            self._clients, self._clients_environment = ClientPool(), environment
        return await run_task(task, settings=settings, time_budget_s=time_budget_s, clients=self._clients)

    async def _close_clients(self) -> None:
        clients, self._clients = self._clients, None
        if clients is not None:
            self._clients_closed += clients.clients_open
            await clients.aclose()

    def discard(self) -> None:
        """Close the clients and the loop; the next invocation makes new ones."""
        loop, self._loop = self._loop, None
        if loop is None or loop.is_closed():
            self._clients = None
            return
        try:
            with contextlib.suppress(Exception):
                loop.run_until_complete(self._close_clients())
            _cancel_leftover_tasks(loop)
            with contextlib.suppress(Exception):
                loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            self._clients = None
            loop.close()


def _cancel_leftover_tasks(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel and wait for whatever an invocation left running on `loop`
    (as `asyncio.run` does when it ends), so no part of one invocation runs
    in the next."""
    leftovers = asyncio.all_tasks(loop)
    if not leftovers:
        return
    log.debug("cancelling %d tasks the invocation left running", len(leftovers))
    for leftover in leftovers:
        leftover.cancel()
    loop.run_until_complete(asyncio.gather(*leftovers, return_exceptions=True))


#: The process's kept loop and clients (one handler per process).
_warm = _WarmProcess()


def handler(event: Any, context: Any) -> dict[str, Any]:
    """Run the shard attempt in `event`; see the module docstring."""
    _warm.invocations += 1
    result = _handle(event, context)
    result.update(invocation=_warm.invocations, clients_created=_warm.clients_created)
    return result


def _handle(event: Any, context: Any) -> dict[str, Any]:
    started = time.monotonic()
    # This process runs nothing but commands: it ends whatever they leave
    # behind, and keeps the function's credentials out of their reach.
    adopt_orphans(dedicated=True)
    hide_environment()
    try:
        task = ShardTask.from_json(event if isinstance(event, (str, bytes)) else json.dumps(event))
    except (ConfigurationError, TypeError) as exc:
        _configure_logging()
        log.error("rejected invoke event: %s", exc)
        return {"ok": False, "detail": str(exc), "retryable": False}
    _configure_logging(job_id=task.job_id, shard=task.shard, attempt=task.attempt)
    outcome: dict[str, Any] = {"job_id": task.job_id, "shard": task.shard, "attempt": task.attempt}
    try:
        reserve_s = _reserve_s()
        if parse_location(task.markers)[0] != "dynamodb":
            raise ConfigurationError(
                f"this task keeps its markers in {task.markers}, which a Lambda function cannot reach: "
                "run the coordinator with --store dynamodb"
            )
    except ConfigurationError as exc:
        log.error("%s", exc)
        return {**outcome, "ok": False, "detail": str(exc), "retryable": False}
    remaining_s = context.get_remaining_time_in_millis() / 1000 if context is not None else None
    budget_s = None if remaining_s is None else max(remaining_s - reserve_s, 1.0)
    # The final report (DONE or FAILED) must fit in the reserve too.
    report_timeout_s = min(WorkerSettings().report_timeout_s, max(reserve_s / 2, 1.0))
    settings = replace(WorkerSettings(), report_timeout_s=report_timeout_s)
    log.info("starting shard %d of %d (time budget %s s)", task.shard, task.shards, budget_s and round(budget_s))
    try:
        result = _warm.run_task(task, settings=settings, time_budget_s=budget_s)
    except ShardlineError as exc:
        log.error("shard failed: %s: %s", type(exc).__name__, exc)
        return {**outcome, "ok": False, "detail": f"{type(exc).__name__}: {exc}", "retryable": is_retryable(exc)}
    except Exception as exc:  # a bug: still an answer, never a raise (see above)
        log.exception("shard failed with an internal error")
        return {**outcome, "ok": False, "detail": f"internal error: {type(exc).__name__}: {exc}", "retryable": True}
    detail = (
        "committed"
        if result.committed
        else "finished; the coordinator did not commit it (a twin won, or it was fenced)"
    )
    log.info(
        "shard done: %s",
        detail,
        extra={
            "bytes": result.bytes,
            "output_bytes": result.output_bytes,
            "seconds": round(time.monotonic() - started, 3),
        },
    )
    return {
        **outcome,
        "ok": bool(result.committed),
        "detail": detail,
        "retryable": None,
        "bytes": result.bytes,
        "output_bytes": result.output_bytes,
        "tail_sources": list(result.tail_sources),
    }
