"""The state directory: where a coordinator keeps what must outlive it.

One directory per user (or per daemon, with ``--state-dir``) holds the
daemon's generated API token, the key job secrets are derived from, and
(embedded runs and daemons without AWS) the SQLite store.  It follows the
XDG base directory convention: ``$SHARDLINE_STATE_DIR``, else
``$XDG_STATE_HOME/shardline``, else ``~/.local/state/shardline``.

Everything in it is private to its owner: the directory is created 0700 and
secret files 0600, created atomically (``O_EXCL``) so that two processes
starting at once agree on one value, and a directory or file that others can
write is refused rather than trusted.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
import stat
from collections.abc import Callable, Mapping
from pathlib import Path

from ..errors import ConfigurationError

__all__ = [
    "COORDINATOR_KEY_FILE",
    "TOKEN_FILE",
    "check_token",
    "default_state_dir",
    "ensure_private_dir",
    "read_or_create_key",
    "read_or_create_secret",
    "read_secret",
    "read_token_file",
]

log = logging.getLogger("shardline.io.statedir")

#: The daemon's generated HTTP API token (read by `shardline run --coordinator`, `status`, `cancel`).
TOKEN_FILE = "token"
#: The daemon's coordinator key, every job's exchange secret is derived from (hex).
COORDINATOR_KEY_FILE = "coordinator.key"


def default_state_dir(environ: Mapping[str, str] | None = None) -> str:
    """The state directory the environment names, per the XDG convention."""
    env = os.environ if environ is None else environ
    if env.get("SHARDLINE_STATE_DIR"):
        return os.path.abspath(env["SHARDLINE_STATE_DIR"])
    base = env.get("XDG_STATE_HOME") or os.path.join(env.get("HOME") or str(Path.home()), ".local", "state")
    return os.path.join(os.path.abspath(base), "shardline")


def ensure_private_dir(path: str) -> str:
    """Create `path` (mode 0700) if missing; refuse one that others may write or that we do not own."""
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        st = os.stat(path)
    except OSError as exc:
        raise ConfigurationError(f"state directory {path}: {exc.strerror or exc}") from exc
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigurationError(f"state directory {path} is not a directory")
    _check_private(path, st, what="state directory")
    return path


def _check_private(path: str, st: os.stat_result, *, what: str) -> None:
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        raise ConfigurationError(f"{what} {path} belongs to uid {st.st_uid}, not to us (uid {os.getuid()})")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        mode = stat.S_IMODE(st.st_mode)
        raise ConfigurationError(f"{what} {path} is writable by others (mode {mode:o}); chmod go-w it")


def read_secret(path: str) -> str | None:
    """The secret stored at `path` (stripped), or None if there is no such file.

    A file that others can read or write is refused: a secret they can see is no secret.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigurationError(f"cannot read {path}: {exc.strerror or exc}") from exc
    with os.fdopen(fd, "r", encoding="ascii", errors="strict") as file:
        st = os.fstat(file.fileno())
        _check_private(path, st, what="secret file")
        if st.st_mode & (stat.S_IRGRP | stat.S_IROTH):
            raise ConfigurationError(
                f"secret file {path} is readable by others (mode {stat.S_IMODE(st.st_mode):o}); chmod 600 it"
            )
        try:
            value = file.read(4096).strip()
        except UnicodeDecodeError:
            raise ConfigurationError(f"secret file {path} is not ASCII text") from None
    if not value:
        raise ConfigurationError(f"secret file {path} is empty; delete it to have a new one generated")
    return value


def read_or_create_secret(path: str, *, generate: Callable[[], str] = lambda: secrets.token_urlsafe(32)) -> str:
    """The secret at `path`, created (0600, atomically) from `generate()` if missing."""
    existing = read_secret(path)
    if existing is not None:
        return existing
    ensure_private_dir(os.path.dirname(path) or ".")
    value = generate()
    temp = f"{path}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as file:
            file.write(value + "\n")
            file.flush()
            os.fsync(file.fileno())
        # link() fails if another process created the file first: then theirs wins.
        os.link(temp, path)
    except FileExistsError:
        pass
    except OSError as exc:
        if exc.errno != errno.EEXIST:
            raise ConfigurationError(f"cannot create {path}: {exc.strerror or exc}") from exc
    finally:
        with contextlib.suppress(OSError):
            os.unlink(temp)
    stored = read_secret(path)
    assert stored is not None
    return stored


def read_or_create_key(path: str, *, size_bytes: int = 32) -> bytes:
    """The `size_bytes` random bytes kept (hex) in the secret file at `path`, created if missing."""
    text = read_or_create_secret(path, generate=lambda: secrets.token_hex(size_bytes))
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) != size_bytes:
        raise ConfigurationError(
            f"{path} does not hold a {size_bytes}-byte key in hex; delete it to have a new one generated"
        )
    return key


def check_token(value: str, *, source: str) -> str:
    """`value` stripped, if it can be a bearer token (visible ASCII, no spaces); `source` names it in errors."""
    token = value.strip()
    if not token:
        raise ConfigurationError(f"{source} is empty; give the token, or unset it")
    if not all("!" <= char <= "~" for char in token):
        raise ConfigurationError(f"{source}: a token is visible ASCII characters without spaces")
    return token


def read_token_file(path: str) -> str:
    """The API token an operator keeps in `path` (``--token-file``): a file of theirs or a mounted secret.

    Unlike our own secret files, it may belong to root and be readable by
    others (container secrets are); one that others may write is refused,
    and one of ours that others may read is worth a warning.
    """
    try:
        with open(path, "rb") as file:
            st = os.fstat(file.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise ConfigurationError(f"token file {path} is not a regular file")
            data = file.read(4097)
    except FileNotFoundError:
        raise ConfigurationError(
            f"token file {path} does not exist; 'shardline token --file {path}' creates one"
        ) from None
    except OSError as exc:
        raise ConfigurationError(f"cannot read token file {path}: {exc.strerror or exc}") from exc
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        mode = stat.S_IMODE(st.st_mode)
        raise ConfigurationError(f"token file {path} is writable by others (mode {mode:o}); chmod go-w it")
    if hasattr(os, "getuid") and st.st_uid == os.getuid() != 0 and st.st_mode & (stat.S_IRGRP | stat.S_IROTH):
        log.warning("token file %s is readable by other users (mode %o); chmod 600 it", path, stat.S_IMODE(st.st_mode))
    if len(data) > 4096:
        raise ConfigurationError(f"token file {path} is longer than 4096 bytes: not a token")
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise ConfigurationError(f"token file {path} is not ASCII text") from None
    return check_token(text, source=f"token file {path}")
