"""The shared I/O layer: everything that touches a network, a file or a process
on behalf of both the worker and the coordinator.

- `aws`: AWS client settings, one lazily made client per owner, and the one
  translation of botocore/aiohttp/OS errors into shardline's errors.
- `retry`: the one retry loop.
- `urls`: the one parser of ``s3://`` URLs, and which hosts are loopback.
- `aio`: small asyncio helpers.
- `sources`: the object a job reads (S3 or a local file), by byte ranges.
- `s3bucket`: whole-object uploads, downloads, server-side copies, listings
  and deletes; `checksum`: CRC32C of buffers and of whole files.
- `command`: a shard's output stage (a file, or a shell command's stdin) and
  `processes`: making sure every process a command starts ends with it.
- `markers`: the boundary-marker store (the worker's conditional put and
  read, the coordinator's fence) and `tables`: creating its tables.
- `statedir`, `rlimits`: the private state directory, the open-file limit.
- `collector`: the garbage collector paused while a process builds what it
  keeps (imports, AWS clients).

It imports `shardline.protocol` and `shardline.errors`, never `worker` or
`coordinator`.
"""

#: Bytes moved per step wherever shardline copies a stream through its own
#: buffers (local reads, S3 bodies, output files, the reduce feed): large enough
#: to amortise a system call or a thread hop, small enough to bound memory.
COPY_CHUNK_BYTES = 1024 * 1024
