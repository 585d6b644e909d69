# What several of `shardline`'s subcommands share on their command line:
# the argument types (byte sizes with K/M/G, counts, seconds, ports), the
# parser class with one-line usage errors, and the option groups that recur
# (--coordinator with its token and CA; -v and --no-uvloop).

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING, NoReturn, TypeAlias

__all__ = [
    "Parser",
    "add_common_options",
    "add_coordinator_options",
    "port",
    "positive_float",
    "positive_int",
    "size",
]


def size(text: str) -> int:
    """Parse a byte count with an optional K/M/G suffix (powers of 1024)."""
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    value = text.strip().lower().removesuffix("ib").removesuffix("b")
    factor = units.get(value[-1:], 1)
    number = value[:-1] if value[-1:] in units else value
    try:
        result = int(float(number) * factor)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a byte size: {text!r}") from None
    if result < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 byte: {text!r}")
    return result


def _int_at_least(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
    return value


def positive_int(text: str) -> int:
    """Parse a count of at least 1."""
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """Parse a count of at least 0."""
    return _int_at_least(text, 0)


def exit_codes(text: str) -> tuple[int, ...]:
    """Parse comma-separated exit statuses, e.g. ``0,1``."""
    try:
        codes = tuple(sorted({int(code) for code in text.split(",")}))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of exit statuses like 0,1: {text!r}") from None
    if not all(0 <= code <= 255 for code in codes):
        raise argparse.ArgumentTypeError(f"exit statuses are 0..255, got {text!r}")
    return codes


def positive_float(text: str) -> float:
    """Parse a number above 0 (seconds, for example)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def port(text: str) -> int:
    """Parse a TCP port, 0 meaning any free one."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be 0..65535, got {value}")
    return value


class Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (exit status 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see '{self.prog} --help')\n")


if TYPE_CHECKING:
    #: What `Parser.add_subparsers` returns (argparse gives it no public name).
    Subcommands: TypeAlias = argparse._SubParsersAction[Parser]


def add_coordinator_options(parser: argparse.ArgumentParser, *, required: bool) -> None:
    """--coordinator URL, --token-file and --coordinator-ca: how to reach a daemon."""
    what = "the coordinator" if required else "run on this coordinator instead of embedded"
    parser.add_argument(
        "--coordinator",
        metavar="URL",
        default=os.environ.get("SHARDLINE_COORDINATOR") or None,
        help=f"{what}, e.g. http://127.0.0.1:8080 (default: $SHARDLINE_COORDINATOR)",
    )
    parser.add_argument(
        "--token-file",
        metavar="FILE",
        default=None,
        help="file holding the bearer token the coordinator requires (default: $SHARDLINE_TOKEN, else, for a "
        "coordinator on this machine, the token 'shardline serve' generated in the state directory)",
    )
    parser.add_argument(
        "--coordinator-ca",
        metavar="PEM",
        default=os.environ.get("SHARDLINE_COORDINATOR_CA") or None,
        help="CA certificate to verify an https:// coordinator with (default: $SHARDLINE_COORDINATOR_CA, else "
        "the system trust store)",
    )


def add_common_options(parser: argparse.ArgumentParser) -> None:
    """-v and --no-uvloop, on every subcommand."""
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log more (-v info, -vv debug)")
    parser.add_argument("--no-uvloop", action="store_true", help="use the default asyncio event loop")
