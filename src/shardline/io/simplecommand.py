# When ``sh -c COMMAND`` would only run one program, run that program.
#
# A shard's command is ``sh -c COMMAND``.  For the commonest commands
# (``wc -l``, ``grep -c foo``, ``sort``) the shell parses one simple command
# and -- dash, Debian's /bin/sh, does not exec its last command -- forks
# again to run it: two execs and two processes per shard, half of a 5,000
# shard job's command CPU (bench/README.md).  When COMMAND is plainly one
# program and its arguments, `direct_program` gives that program's argv
# (and its path), and
# the caller runs it as the shell would have: same argv, same environment
# (plus PWD, which dash sets when it is missing or stale), same descriptors,
# the same session; an exit by signal N is reported as the shell would
# report it, 128 + N (`shell_status`).
#
# "Plainly" is decided conservatively: anything the shell could expand,
# redirect, quote, glob, assign, chain or treat as a builtin, keyword,
# alias or (bash as sh) exported function falls back to the shell, as does
# a program that is not found (so the shell's own "not found" message
# and status 127 stay as they were).

from __future__ import annotations

import functools
import os
import re
from collections.abc import Mapping

__all__ = ["direct_program", "has_bash_functions", "shell_status", "with_shell_pwd"]

#: Words made only of characters no POSIX shell treats specially, separated by
#: blanks; ``=`` is literal after the first word (in it, it would make an assignment).
_FIRST_WORD = r"[A-Za-z0-9_./,:+@%-]+"
_LATER_WORD = r"[A-Za-z0-9_./,:+@%=-]+"
_SIMPLE = re.compile(rf"[ \t]*({_FIRST_WORD})((?:[ \t]+{_LATER_WORD})*)[ \t]*")

#: Builtins and reserved words of dash and of bash (as /bin/sh elsewhere):
#: the shell runs these itself, which a program of the same name may not match.
_SHELL_OWN = frozenset(
    """
    . : [ alias bg bind break builtin caller case cd chdir command compgen complete compopt continue
    coproc declare dirs disown do done echo elif else enable esac eval exec exit export false fc fg
    fi for function getopts hash help history if in jobs kill let local logout mapfile popd printf
    pushd pwd read readarray readonly return select set shift shopt source suspend test then time
    times trap true type typeset ulimit umask unalias unset until wait while
    """.split()  # noqa: SIM905 - a list literal would take a line per word
)


def direct_program(
    command: str, env: Mapping[str, str], *, bash_functions: bool | None = None
) -> tuple[list[str], str] | None:
    """The argv to run instead of ``sh -c command`` in `env`, and the
    program's path, or None: let the shell run it.  The argv's first element
    is the program as written, as the shell passes it (programs name
    themselves by it in their messages); the path is found along `env`'s
    PATH as the shell would find it, and the spawn execs it rather than
    searching PATH a second time.  `bash_functions`: whether `env` holds an
    exported bash function, when the caller knows (it spares a pass over
    `env`)."""
    match = _SIMPLE.fullmatch(command)
    if match is None:
        return None
    program, rest = match.group(1), match.group(2).split()
    if bash_functions is None:
        bash_functions = has_bash_functions(env)
    if program in _SHELL_OWN or bash_functions:
        return None
    executable = _find(program, env)
    return None if executable is None else ([program, *rest], executable)


def has_bash_functions(env: Mapping[str, str]) -> bool:
    """Whether `env` exports a bash function (which could shadow a program of its name)."""
    return any(name.startswith("BASH_FUNC_") for name in env)


def _find(program: str, env: Mapping[str, str]) -> str | None:
    """Where the shell would find `program`, when that is plain: a path as
    given, else the first executable file along an absolute-only PATH."""
    if "/" in program:
        return program if _is_executable(program) else None
    directories = _search_path(env.get("PATH"))
    if directories is None:
        return None
    for directory in directories:
        candidate = directory + program
        if _is_executable(candidate):
            return candidate
    return None


@functools.lru_cache(maxsize=16)
def _search_path(path: str | None) -> tuple[str, ...] | None:
    """PATH's directories, each ending in "/", if the shell would search
    them as we do; else None.  A pure function of the string, so worked out
    once per PATH, not per command."""
    if not path:
        return None  # the shell's built-in default path differs from ours
    directories = path.split(":")
    if not all(os.path.isabs(directory) for directory in directories):
        return None  # "" or "." mean the current directory: leave that to the shell
    return tuple(directory if directory.endswith("/") else directory + "/" for directory in directories)


def _is_executable(path: str) -> bool:
    # access() first: a PATH entry without the program costs one failed call, no exception.
    return os.access(path, os.X_OK) and os.path.isfile(path)


def with_shell_pwd(env: dict[str, str]) -> dict[str, str]:
    """`env` with PWD naming the current directory, as dash leaves it for
    the programs it runs (it replaces a PWD that is missing or names
    another directory)."""
    pwd = env.get("PWD")
    try:
        if pwd is not None and os.path.isabs(pwd) and os.path.samestat(os.stat(pwd), os.stat(".")):
            return env
    except OSError:
        pass
    env["PWD"] = os.getcwd()
    return env


def shell_status(returncode: int) -> int:
    """A directly run program's exit status as ``sh -c`` reports it: an exit
    by signal N is 128 + N (as from a shell that waited for it)."""
    return 128 - returncode if returncode < 0 else returncode
