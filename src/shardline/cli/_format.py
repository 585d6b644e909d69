# What `shardline status` prints: the table of a coordinator's jobs, one
# job with its shards, and the human sizes and times they (and the progress
# line) show.  Pure functions of the API's JSON.

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

__all__ = ["format_job", "format_jobs", "human_size"]


def format_jobs(jobs: list[dict[str, Any]]) -> str:
    """A table of `jobs` (GET /jobs), one row each."""
    if not jobs:
        return "no jobs"
    rows = [("ID", "STATE", "SHARDS", "INPUT", "CREATED", "SOURCE")]
    for job in jobs:
        size = human_size(job["size"]) if job["size"] is not None else "?"
        rows.append(
            (
                job["id"],
                job["state"],
                f"{job['shards_done']}/{job['shards_total']}",
                f"{human_size(job['bytes_emitted'])}/{size}",
                _when(job["created_at"]),
                job["source"],
            )
        )
    return _table(rows)


def format_job(job: dict[str, Any]) -> str:
    """One job (GET /jobs/{id}): its fields, then a table of its shards."""
    size = f"{job['size']} bytes" if job["size"] is not None else "size not known yet"
    lines = [
        f"job:      {job['id']}",
        f"state:    {job['state']}",
        f"source:   {job['source']} ({size})",
        f"command:  {job['command'] or '(none: lines pass through)'}",
    ]
    if job["reduce"]:
        lines.append(f"reduce:   {job['reduce']}")
    if job["output"]:
        lines.append(f"output:   {job['output']}")
    lines += [
        f"shards:   {job['shards_done']}/{job['shards_total']} done, {human_size(job['bytes_emitted'])} emitted, "
        f"{job['retries']} retries",
        f"created:  {_when(job['created_at'])}",
        f"finished: {_when(job['finished_at'])}",
    ]
    if job["error"]:
        lines.append(f"error:    {job['error']}")
    rows = [("SHARD", "STATE", "ATTEMPT", "BYTES", "EMITTED", "ERROR")]
    for shard in job["shards"]:
        emitted = "[{}, {})".format(*shard["emitted"]) if shard["emitted"] is not None else "-"
        rows.append(
            (
                str(shard["index"]),
                shard["state"],
                str(shard["attempt"]),
                str(shard["bytes"]),
                emitted,
                shard["error"] or "",
            )
        )
    return "\n".join(lines) + "\n\n" + _table(rows)


def human_size(n: float) -> str:
    """`n` bytes in B, KiB, MiB, GiB or TiB (powers of 1024)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def _when(unix_s: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(unix_s)) if unix_s is not None else "-"


def _table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows
    )
