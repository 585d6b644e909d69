"""End to end: every adversarial input, many shard counts, local and S3 sources.

Jobs run through the real coordinator, exchange, DynamoDB markers (moto
server) and worker code; workers are in-process tasks here for speed
(test_cli.py covers real worker processes).  Output must equal the
sequential reference byte for byte, and the job report must prove coverage.
"""

from __future__ import annotations

import pytest

from corpus import CORPUS
from jobs import run_job_inprocess, sequential_reference
from reference import reference_split

SED = "sed 's/^/>/'"
SHARD_COUNTS = (1, 2, 3, 7, 40)


def _check_report(report, data: bytes, shards: int, delimiter: bytes) -> None:
    assert report.size == len(data)
    expected = reference_split(data, shards, delimiter)
    emitted = {s.index: s for s in report.shards}
    position = 0
    for index, part in enumerate(expected):
        shard = emitted[index]
        if part:
            assert shard.emitted == (position, position + len(part)), f"shard {index}"
        assert shard.bytes == len(part)
        position += len(part)
    assert position == len(data)


@pytest.mark.parametrize("name", sorted(CORPUS))
@pytest.mark.parametrize("shards", SHARD_COUNTS)
async def test_local_identity(tmp_path, aws_settings, name, shards):
    data, delimiter = CORPUS[name]
    path = tmp_path / "input"
    path.write_bytes(data)
    output, report = await run_job_inprocess(str(path), shards, aws=aws_settings, delimiter=delimiter)
    assert output == data
    _check_report(report, data, shards, delimiter)


NEWLINE_CORPUS = sorted(name for name, (_, delimiter) in CORPUS.items() if delimiter == b"\n")


@pytest.mark.parametrize("name", NEWLINE_CORPUS)  # sed works on newline-delimited lines
@pytest.mark.parametrize("shards", (3, 7))
async def test_local_command(tmp_path, aws_settings, name, shards):
    data, _ = CORPUS[name]
    path = tmp_path / "input"
    path.write_bytes(data)
    output, _ = await run_job_inprocess(str(path), shards, aws=aws_settings, command=SED)
    assert output == sequential_reference(data, SED)


@pytest.mark.parametrize("name", sorted(CORPUS))
@pytest.mark.parametrize("shards", (2, 7, 40))
async def test_s3_identity_and_command(s3, bucket, aws_settings, name, shards):
    data, delimiter = CORPUS[name]
    s3.put_object(Bucket=bucket, Key=f"{name}.txt", Body=data)
    source = f"s3://{bucket}/{name}.txt"
    output, report = await run_job_inprocess(source, shards, aws=aws_settings, delimiter=delimiter)
    assert output == data
    _check_report(report, data, shards, delimiter)
    if delimiter == b"\n":
        output, _ = await run_job_inprocess(source, shards, aws=aws_settings, command=SED)
        assert output == sequential_reference(data, SED)


async def test_nul_delimited_command_sees_whole_records(tmp_path, aws_settings):
    data, _delimiter = CORPUS["nul-delimited"]
    path = tmp_path / "input"
    path.write_bytes(data)
    # Each shard's command counts the records it got; the sum must be exact.
    output, _ = await run_job_inprocess(
        str(path), 7, aws=aws_settings, delimiter=b"\0", command="tr -cd '\\000' | wc -c"
    )
    assert sum(int(line) for line in output.split()) == data.count(b"\0")


async def test_small_parts_many_gets(tmp_path, aws_settings):
    # Parts far smaller than a shard exercise the ordered multi-part path.
    data, _ = CORPUS["random-mix"]
    path = tmp_path / "input"
    path.write_bytes(data)
    output, _ = await run_job_inprocess(
        str(path), 5, aws=aws_settings, command=SED, part_size_bytes=1000, max_in_flight_bytes=3000
    )
    assert output == sequential_reference(data, SED)
