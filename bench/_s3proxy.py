"""A "realistic S3" TCP proxy: first-byte latency and a per-connection bandwidth cap.

    python bench/_s3proxy.py UPSTREAM_HOST:PORT [--latency-ms 30] [--conn-mib-s 2]

Listens on 127.0.0.1 (ephemeral port, printed as one line on stdout), and
relays every connection to the upstream unchanged at the TCP level, so
request signatures still verify and keep-alive connections stay keep-alive.
Two things are added, modelled on S3 and scaled for a small machine:

* first-byte latency: after a client sends request bytes, the first response
  byte is held until `--latency-ms` after the request arrived (clients here
  do not pipeline, so "request bytes, then response bytes" is one request);
* a per-connection bandwidth cap on the response direction: bytes are paced
  to `--conn-mib-s` MiB/s per connection (0: no cap), in chunks of at most
  64 KiB; reading from the upstream pauses while pacing, so TCP backpressure
  reaches the server as it would over a slow link.

Exits when stdin closes (the parent died or is done) or on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys

CHUNK_BYTES = 64 * 1024
MiB = 1024 * 1024


class Link:
    """One client connection and its upstream connection."""

    def __init__(self, latency_s: float, rate_bytes_s: float) -> None:
        self.latency_s = latency_s
        self.rate_bytes_s = rate_bytes_s
        self.request_at: float | None = None  # when the pending request's first bytes came in
        self.send_at = 0.0  # pacing: earliest time the next downstream chunk may leave

    async def upstream(
        self, client: asyncio.StreamReader, server: asyncio.StreamWriter, loop: asyncio.AbstractEventLoop
    ) -> None:
        while data := await client.read(CHUNK_BYTES):
            if self.request_at is None:
                self.request_at = loop.time()
            server.write(data)
            await server.drain()
        with contextlib.suppress(OSError):
            server.write_eof()

    async def downstream(
        self, server: asyncio.StreamReader, client: asyncio.StreamWriter, loop: asyncio.AbstractEventLoop
    ) -> None:
        while data := await server.read(CHUNK_BYTES):
            now = loop.time()
            if self.request_at is not None:  # first byte of a response: hold it for the latency
                wait = self.request_at + self.latency_s - now
                self.request_at = None
                if wait > 0:
                    await asyncio.sleep(wait)
                    now = loop.time()
                self.send_at = now
            if self.rate_bytes_s > 0:
                start = max(now, self.send_at)
                self.send_at = start + len(data) / self.rate_bytes_s
                if start > now:
                    await asyncio.sleep(start - now)
            client.write(data)
            await client.drain()
        with contextlib.suppress(OSError):
            client.write_eof()


async def serve(upstream_host: str, upstream_port: int, latency_s: float, rate_bytes_s: float) -> None:
    loop = asyncio.get_running_loop()
    links: set[asyncio.Task[None]] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(upstream_host, upstream_port)
        except OSError:
            writer.close()
            return
        link = Link(latency_s, rate_bytes_s)
        try:
            await asyncio.gather(link.upstream(reader, up_writer, loop), link.downstream(up_reader, writer, loop))
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            for w in (writer, up_writer):
                w.close()

    def track(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.ensure_future(handle(reader, writer))
        links.add(task)
        task.add_done_callback(links.discard)

    server = await asyncio.start_server(track, "127.0.0.1", 0, backlog=4096)
    print(server.sockets[0].getsockname()[1], flush=True)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_reader(sys.stdin.fileno(), lambda: stop.set() if not sys.stdin.buffer.read1(4096) else None)
    async with server:
        await stop.wait()
    for task in list(links):
        task.cancel()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("upstream", help="HOST:PORT of the server to relay to")
    parser.add_argument("--latency-ms", type=float, default=30.0, help="first-byte latency per request")
    parser.add_argument("--conn-mib-s", type=float, default=2.0, help="response bandwidth per connection (0: none)")
    args = parser.parse_args(argv)
    host, _, port = args.upstream.rpartition(":")
    coroutine = serve(host, int(port), args.latency_ms / 1000, args.conn_mib_s * MiB)
    try:
        import uvloop

        uvloop.run(coroutine)
    except ImportError:
        asyncio.run(coroutine)
    return 0


if __name__ == "__main__":
    sys.exit(main())
