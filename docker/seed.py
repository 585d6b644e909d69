"""Seed the compose stack's S3 server: bucket `shardline` and `sample.txt`.

Run by the one-shot `setup` service (docker/compose.yaml) with the
coordinator image's Python and boto3; the endpoint and dummy credentials
come from the standard AWS environment variables.  Waits for the server,
then is idempotent: an existing bucket or object is left as it is.
"""

from __future__ import annotations

import os
import sys
import time

import boto3
from botocore.exceptions import BotoCoreError, ClientError

BUCKET = os.environ.get("SHARDLINE_BUCKET", "shardline")
SAMPLE_KEY = "sample.txt"
SAMPLE_LINES = 100_000
WAIT_S = 120.0


def main() -> int:
    s3 = boto3.client("s3")
    deadline = time.monotonic() + WAIT_S
    while True:
        try:
            s3.create_bucket(Bucket=BUCKET)
            print(f"created bucket {BUCKET}")
            break
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                print(f"bucket {BUCKET} exists")
                break
            error: Exception = exc
        except BotoCoreError as exc:
            error = exc
        if time.monotonic() > deadline:
            print(f"S3 did not become ready in {WAIT_S:.0f}s: {error}", file=sys.stderr)
            return 1
        time.sleep(1)
    try:
        s3.head_object(Bucket=BUCKET, Key=SAMPLE_KEY)
        print(f"s3://{BUCKET}/{SAMPLE_KEY} exists")
    except ClientError:
        body = "".join(f"line {i} {'x' * (i % 97)}\n" for i in range(SAMPLE_LINES)).encode()
        s3.put_object(Bucket=BUCKET, Key=SAMPLE_KEY, Body=body)
        print(f"wrote s3://{BUCKET}/{SAMPLE_KEY} ({len(body)} bytes, {SAMPLE_LINES} lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
