"""The ``shardline`` command line: a thin layer that builds settings and calls in.

Everything environment-dependent is decided here, once: whether to run with
an embedded DynamoDB endpoint or against a coordinator daemon, the event
loop, logging.  Exit status: 0 on success, 1 when the job or input fails, 2
for usage and configuration errors, 130 on interrupt, 141 when stdout is
closed early, 143 on SIGTERM (the job is cancelled and its workers stopped
first, on the coordinator too).

This module holds `main`: logging, dispatch and the exit-status policy.
The parser is in `_parser` (`_options`, `_serveparser`); each subcommand's
module is imported only when it runs, so that `--help` and the client
commands load no more than they use: `_run` (run, embedded or on a daemon;
its progress line in `_progress`), `_serve` (serve, token), `_remote`
(the daemon's client; status, cancel, output, logs), `_worker` (worker, package-worker),
`_format` (status tables), `_loop` (the event loop; SIGTERM).
"""

from __future__ import annotations

import logging
import os
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NoReturn

from ..errors import ConfigurationError, ShardlineError
from ..io.collector import pause_for_start_up, start_up_done
from ._parser import build_parser, split_command

if TYPE_CHECKING:
    import argparse

__all__ = ["main"]

log = logging.getLogger("shardline.cli")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``shardline`` command line `argv` (default: ``sys.argv[1:]``); return its exit status."""
    if argv is None:
        # The program itself: no garbage collection while it imports what
        # it will keep (io/collector.py), until `_start_up_done`.
        pause_for_start_up()
    own_args, command = split_command(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, stray = parser.parse_known_args(own_args)
    if stray:
        hint = ""
        if args.subcommand == "run" and command is None:
            # `shardline run f -n 2 wc -l`: the command was meant to follow `--`.
            hint = f"; a command goes after '--', e.g. shardline run {args.source} ... -- {shlex.join(stray)}"
        parser.error(f"unrecognized arguments: {' '.join(stray)}{hint}")
    # A daemon's operators want to see jobs come and go; a command's users only its errors.
    base_level = logging.INFO if args.subcommand == "serve" else logging.WARNING
    level = base_level - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    started = time.monotonic()
    try:
        if args.subcommand == "run":
            from ._run import run_command

            _start_up_done(argv)
            status = run_command(args, command)
            if argv is None:
                # The program itself, not a caller in this process: the run
                # has released all it held, so the interpreter's teardown
                # of ~300 modules (~25 ms of CPU, a fifth of a tiny run's)
                # would only delay the exit that a shell pipeline waits for.
                log.debug("finished in %.2fs", time.monotonic() - started)
                _exit_now(status)
            return status
        if command is not None:
            parser.error(f"'{args.subcommand}' takes no command after --")
        subcommand = _subcommand(args.subcommand)
        _start_up_done(argv)
        return subcommand(args)
    except ConfigurationError as exc:
        print(f"shardline: {exc}", file=sys.stderr)
        return 2
    except ShardlineError as exc:
        print(f"shardline: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("shardline: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader of our stdout went away (e.g. `| head`): stop quietly.
        try:
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silence the flush at exit
        except OSError:
            pass
        return 141
    finally:
        _start_up_done(argv)  # if it failed before it was done (else nothing)
        log.debug("finished in %.2fs", time.monotonic() - started)


def _start_up_done(argv: Sequence[str] | None) -> None:
    """The subcommand's modules are imported: for the program itself, what
    exists now stays out of later collections, which resume."""
    if argv is None:
        start_up_done()


def _exit_now(status: int) -> NoReturn:
    """Flush what is buffered and end the process with `status`, without the interpreter's teardown."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass  # closed, or its reader gone: nothing more can reach it
    logging.shutdown()
    os._exit(status)


def _subcommand(name: str) -> Callable[[argparse.Namespace], int]:
    """The function behind subcommand `name` (any but `run`), its module imported only now."""
    if name == "serve":
        from ._serve import serve_command

        return serve_command
    if name == "token":
        from ._serve import token_command

        return token_command
    if name == "status":
        from ._remote import status_command

        return status_command
    if name == "cancel":
        from ._remote import cancel_command

        return cancel_command
    if name == "output":
        from ._remote import output_command

        return output_command
    if name == "logs":
        from ._remote import logs_command

        return logs_command
    if name == "worker":
        from ._worker import worker_command

        return worker_command
    assert name == "package-worker", name  # the parser knows no other
    from ._worker import package_worker_command

    return package_worker_command
