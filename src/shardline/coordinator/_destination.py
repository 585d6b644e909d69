# The destinations of a job's results (`spec.output`): the names shardline
# writes there, which destinations a coordinator may write at all
# (`OutputPolicy`), and the interface both kinds implement.  See `_outputs`
# for the kinds and the rules they follow.

from __future__ import annotations

import abc
import logging
import os
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Self

from ..errors import (
    ConfigurationError,
)
from ..io.urls import is_s3_url, parse_s3_prefix

__all__ = [
    "MANIFEST_NAME",
    "OUR_NAME",
    "OUR_TEMP_NAME",
    "RESULT_NAME",
    "SHOWN_ENTRIES",
    "Destination",
    "OutputPolicy",
    "not_empty_error",
    "our_names",
    "part_name",
]

log = logging.getLogger("shardline.coordinator.outputs")


RESULT_NAME = "result"
MANIFEST_NAME = "_manifest.json"
#: Names a destination writes; anything else under the prefix is not ours.
OUR_NAME = re.compile(r"part-\d{5,}|result|_manifest\.json")
#: Local temp files (`.part-00000.<random>.tmp`) left behind by a crash; group 1 is the name they were for.
OUR_TEMP_NAME = re.compile(r"\.(part-\d{5,}|result|_manifest\.json)\.\w+\.tmp")
#: Entries of a non-empty destination named in the refusal.
SHOWN_ENTRIES = 3


def part_name(index: int) -> str:
    """The destination name of shard `index`'s part."""
    return f"part-{index:05d}"


def our_names(names: Collection[str]) -> frozenset[str]:
    """`names`, checked to be ones a destination writes: a bug must not reach a user's files."""
    strangers = [name for name in names if not OUR_NAME.fullmatch(name)]
    if strangers:
        raise ValueError(f"not a name a destination writes: {strangers[0]!r}")
    return frozenset(names)


def not_empty_error(url: str, entries: Sequence[str], *, more: bool) -> ConfigurationError:
    shown = ", ".join(repr(entry) for entry in entries[:SHOWN_ENTRIES])
    if more or len(entries) > SHOWN_ENTRIES:
        shown += ", ..."
    return ConfigurationError(
        f"field 'output': {url} is not empty (it holds {shown}); choose a new or empty destination, or set "
        "'overwrite' (shardline run --overwrite) to replace the shardline output there"
    )


# --- which destinations a coordinator may write ---------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class OutputPolicy:
    """Which destinations (`JobSpec.output`) a coordinator may write.

    Built at the edge: `shardline serve` from --output-root and
    --output-bucket, `shardline run` with `anywhere` (the user's own process
    may write wherever its user may).  The default allows nothing, so a
    coordinator nobody configured writes no output files at all.
    """

    #: Local output directories must lie below this absolute directory, also
    #: once symlinks are resolved; None: no local outputs.
    local_root: str | None = None
    #: Buckets that S3 outputs may go to.
    s3_buckets: frozenset[str] = frozenset()
    #: Any local path (relative ones against the working directory, ".."
    #: allowed) and any bucket.
    anywhere: bool = False

    def __post_init__(self) -> None:
        if self.local_root is not None and not os.path.isabs(self.local_root):
            raise ConfigurationError(f"the output root must be an absolute path, got {self.local_root!r}")

    def check(self, output: str) -> None:
        """Refuse (ConfigurationError naming field 'output') a destination
        this policy does not allow.  Resolves symlinks: call it off the event loop."""
        if self.anywhere:
            return
        if is_s3_url(output):
            bucket, prefix = parse_s3_prefix(output, what="field 'output'")
            self._check_bucket(bucket, prefix)
        else:
            self._check_directory(output)

    def _check_bucket(self, bucket: str, prefix: str) -> None:
        if ".." in prefix.split("/"):
            raise ConfigurationError(
                f"field 'output': s3://{bucket}/{prefix} has a '..' component; name the prefix without one"
            )
        if bucket in self.s3_buckets:
            return
        if self.s3_buckets:
            allowed = ", ".join(sorted(self.s3_buckets))
            raise ConfigurationError(
                f"field 'output': this coordinator may not write to bucket {bucket!r}, only to {allowed} (its "
                "operator allows more with 'shardline serve --output-bucket NAME')"
            )
        raise ConfigurationError(
            "field 'output': this coordinator writes to no S3 bucket (its operator can allow one with "
            "'shardline serve --output-bucket NAME')"
        )

    def _check_directory(self, path: str) -> None:
        if self.local_root is None:
            raise ConfigurationError(
                "field 'output': this coordinator writes no local directories (its operator can allow some with "
                "'shardline serve --output-root DIR'); leave 'output' unset to read the output from "
                "GET /jobs/{id}/output"
            )
        if not os.path.isabs(path):
            raise ConfigurationError(
                f"field 'output': {path!r} is a relative path; give an absolute one below {self.local_root}"
            )
        if ".." in path.split(os.sep):
            raise ConfigurationError(f"field 'output': {path!r} has a '..' component; name the directory without one")
        root = os.path.realpath(self.local_root)
        real = os.path.realpath(path)
        if real == root or os.path.commonpath([root, real]) != root:
            resolved = f" (it resolves to {real})" if real != os.path.normpath(path) else ""
            raise ConfigurationError(
                f"field 'output': {path}{resolved} is not below this coordinator's output root {self.local_root} "
                "(shardline serve --output-root)"
            )


class Destination(abc.ABC):
    """An S3 prefix or a local directory that receives a job's outputs.

    Use as an async context manager or call `aclose()`.  Callers must let
    every `put_*` call end (or cancel it and wait) before `remove()`.
    """

    #: "s3://bucket/prefix/" or the directory's absolute path.
    url: str
    #: Whether `copy_part` can take a remote worker's output (an S3 object)
    #: without its bytes passing through the coordinator.
    copies_remote_parts: bool = False

    @abc.abstractmethod
    async def check(self, *, require_empty: bool) -> None:
        """At submit and resume: with `require_empty`, refuse a destination
        that holds anything, before touching it; then prove it can be written
        (creating a local directory if missing).  ConfigurationError naming
        field 'output' if not."""

    @abc.abstractmethod
    async def put_part(self, index: int, path: str) -> str:
        """Copy the local file `path` to shard `index`'s part (overwriting); returns its location."""

    async def copy_part(self, index: int, source: str, *, size: int) -> str:
        """Make shard `index`'s part a server-side copy of the S3 object
        `source` (`size` bytes; overwriting); returns its location.  Only
        where `copies_remote_parts`."""
        raise NotImplementedError(f"{type(self).__name__} cannot copy {source} server-side")

    @abc.abstractmethod
    async def put_result(self, path: str) -> str:
        """Copy the reduce output at `path` to "result"; returns its location."""

    @abc.abstractmethod
    async def put_manifest(self, manifest: Mapping[str, Any]) -> str:
        """Write `manifest` as "_manifest.json" (call it last); returns its location."""

    @abc.abstractmethod
    async def remove_manifest(self) -> None:
        """Delete "_manifest.json", durably: whatever is here stops claiming to be complete."""

    @abc.abstractmethod
    async def remove(self, names: Collection[str]) -> None:
        """Delete these names ("part-00003", "result", "_manifest.json"; the
        manifest first) and what a crash left of their writes; then a
        directory that `check()` created, if nothing else is in it."""

    @abc.abstractmethod
    async def remove_others(self, keep: Collection[str]) -> None:
        """Delete every name a destination writes except `keep` (and every
        leftover of an interrupted write); never anything else."""

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Release connections; safe to call twice."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"
