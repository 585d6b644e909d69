"""A local stand-in for the Lambda Invoke API, serving the worker image's handler.

Used by the `lambda` profile of docker/compose.yaml, in the worker image
(docker/Dockerfile.worker), so the coordinator's `lambda` backend runs
unchanged against it through AWS_ENDPOINT_URL_LAMBDA.  It exists because
the Runtime Interface Emulator in the AWS base image serves one invocation
at a time and answers an `Event` invocation only after the function has
finished, where Lambda answers 202 at once; shardline's coordinator relies
on the latter.  This server:

- POST /2015-03-31/functions/<any name>/invocations with
  X-Amz-Invocation-Type: Event answers 202 at once and runs the handler in
  a fresh Python process (as Lambda runs each invocation in its own
  sandbox); RequestResponse waits and returns the handler's result;
- runs at most SHARDLINE_INVOKE_CONCURRENCY (default 4) invocations at a
  time and answers 429 TooManyRequestsException beyond that, as Lambda does
  when its concurrency is exhausted;
- gives the handler a context whose remaining time counts down from
  AWS_LAMBDA_FUNCTION_TIMEOUT seconds (default 900).

Standard library only.  Not for production: no authentication, no retries.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HANDLER = os.environ.get("SHARDLINE_HANDLER", "shardline.worker.lambda_handler.handler")
BIND = os.environ.get("SHARDLINE_INVOKE_BIND", "0.0.0.0")
PORT = int(os.environ.get("SHARDLINE_INVOKE_PORT", "8080"))
CONCURRENCY = int(os.environ.get("SHARDLINE_INVOKE_CONCURRENCY", "4"))
TIMEOUT_S = float(os.environ.get("AWS_LAMBDA_FUNCTION_TIMEOUT", "900"))
PATH_PREFIX = "/2015-03-31/functions/"
PATH_SUFFIX = "/invocations"

# Runs in the child: one invocation, the event on stdin, the result written
# to the file named by argv[4]; its logs go to this container's output.
_RUNNER = """
import importlib, json, sys, time
module, _, name = sys.argv[1].rpartition(".")
handler = getattr(importlib.import_module(module), name)
deadline = time.monotonic() + float(sys.argv[2])

class Context:
    aws_request_id = sys.argv[3]
    function_name = "shardline-worker"
    def get_remaining_time_in_millis(self):
        return max(0, int((deadline - time.monotonic()) * 1000))

result = handler(json.load(sys.stdin), Context())
with open(sys.argv[4], "w") as f:
    json.dump(result, f)
"""

_slots = threading.BoundedSemaphore(CONCURRENCY)


def _invoke(event: bytes, request_id: str) -> bytes:
    """Run the handler once in its own process; its result as JSON bytes."""
    with tempfile.TemporaryDirectory(prefix="invoke-") as scratch:
        result = os.path.join(scratch, "result.json")
        try:
            child = subprocess.run(
                [sys.executable, "-c", _RUNNER, HANDLER, str(TIMEOUT_S), request_id, result],
                input=event,
                timeout=TIMEOUT_S + 5,
                check=False,
            )
            if child.returncode != 0 or not os.path.exists(result):
                return json.dumps({"errorMessage": f"handler process exited {child.returncode}"}).encode()
            with open(result, "rb") as f:
                return f.read()
        except (OSError, subprocess.TimeoutExpired) as exc:
            return json.dumps({"errorMessage": f"handler process failed: {exc!r}"}).encode()
        finally:
            _slots.release()
            sys.stderr.write(f"invoke-server: {request_id} done\n")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        if not (self.path.startswith(PATH_PREFIX) and self.path.split("?")[0].endswith(PATH_SUFFIX)):
            self._answer(404, {"__type": "ResourceNotFoundException", "message": f"no route {self.path}"})
            return
        event = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        request_id = str(uuid.uuid4())
        if not _slots.acquire(blocking=False):
            self._answer(429, {"__type": "TooManyRequestsException", "message": "Rate Exceeded."})
            return
        if self.headers.get("X-Amz-Invocation-Type", "RequestResponse") == "Event":
            threading.Thread(target=_invoke, args=(event, request_id), daemon=True).start()
            self._answer(202, None, request_id=request_id)
        else:
            self._answer(200, _invoke(event, request_id), request_id=request_id)

    def _answer(self, status: int, body: object, *, request_id: str = "") -> None:
        data = body if isinstance(body, bytes) else b"" if body is None else json.dumps(body).encode()
        self.send_response(status)
        if status >= 400:
            self.send_header("X-Amzn-ErrorType", str(body["__type"]))  # type: ignore[index]
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("X-Amzn-RequestId", request_id or str(uuid.uuid4()))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        sys.stderr.write("invoke-server: " + format % args + "\n")


def main() -> None:
    server = ThreadingHTTPServer((BIND, PORT), _Handler)
    sys.stderr.write(f"invoke-server: {HANDLER} on {BIND}:{PORT}, {CONCURRENCY} at a time, {TIMEOUT_S:.0f}s timeout\n")
    server.serve_forever()


if __name__ == "__main__":
    main()
