"""The cyclic garbage collector, paused while a process builds what it keeps.

Importing modules and making AWS clients (botocore loads each service's
model) create hundreds of thousands of objects that live as long as the
process.  While they are being made, the collector runs again and again,
and each full collection traverses the whole heap, all of them included:
measured here, 17-19 ms of the ~200 ms of CPU that importing shardline's
modules takes, and 75 of ~310 ms for importing botocore and making an S3
and a DynamoDB client in a process that has them.  With the collector
paused for those steps, the objects are traversed once afterwards instead.

Pausing never frees anything later than its end: reference counting works
throughout, and what a cycle holds is collected by the next collection.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

__all__ = ["collection_paused", "pause_for_start_up", "start_up_done"]


@contextlib.contextmanager
def collection_paused() -> Iterator[None]:
    """No cyclic collection while the block runs (it makes long-lived objects).

    Process-wide, as the collector is: other threads, and other tasks while
    the block awaits, run unpaused only after it.  Nested or concurrent
    uses leave the collector to whoever paused it first, so a block that
    finds it paused changes nothing; the worst a race can do is to resume it
    early, which only costs time.
    """
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def pause_for_start_up() -> None:
    """A program's first step: no collection until `start_up_done`."""
    gc.disable()


def start_up_done() -> None:
    """The program's modules are imported and it is about to do its work:
    what exists now is left out of every later collection (`gc.freeze`:
    nearly all of it lives as long as the process), and the collector runs
    again.  For a program's own start-up only, before it runs anything
    concurrently: a cycle frozen here is never collected.  With the
    collector running (start-up was done already), it does nothing."""
    if gc.isenabled():
        return
    gc.freeze()
    gc.enable()
