"""A plain `prog args` runs without `sh -c` in between, exactly as the shell would have run it."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from shardline.errors import CommandFailedError
from shardline.io.command import CommandOutput
from shardline.io.simplecommand import direct_program, shell_status, with_shell_pwd

ENV = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}


@pytest.mark.parametrize(
    ("command", "words"),
    [
        ("wc -l", ["-l"]),
        ("  wc\t-l  ", ["-l"]),
        ("grep -c foo", ["-c", "foo"]),
        ("dd bs=1M count=1", ["bs=1M", "count=1"]),
        ("sort -t, -k2,2n", ["-t,", "-k2,2n"]),
    ],
)
def test_a_program_and_its_words_run_directly(command: str, words: list[str]) -> None:
    program = command.split()[0]
    found = direct_program(command, ENV)
    assert found is not None and found[0] == [program, *words]


@pytest.mark.parametrize(
    "command",
    [
        "",
        "   ",
        "wc -l | sort",
        "wc -l; true",
        "wc -l && true",
        "wc -l > out",
        "wc -l < in",
        "wc -l &",
        "grep 'a b'",
        'grep "a"',
        "grep a\\ b",
        "grep $HOME",
        "grep `x`",
        "ls *.txt",
        "ls file?",
        "ls [ab]",
        "ls ~",
        "ls {a,b}",
        "wc -l # comment",
        "wc -l\ntrue",
        "FOO=1 wc -l",
        "(wc -l)",
        "! wc -l",
        "echo hi",
        "printf x",
        "test -f x",
        "true",
        "kill 1",
        "time wc -l",
        "exec wc -l",
        ". file",
        "no-such-program-xyz -l",
    ],
)
def test_anything_the_shell_would_treat_specially_stays_with_the_shell(command: str) -> None:
    assert direct_program(command, ENV) is None


def test_an_exported_bash_function_could_shadow_the_program(tmp_path: Path) -> None:
    assert direct_program("wc -l", {**ENV, "BASH_FUNC_wc%%": "() { :; }"}) is None


def test_a_path_the_shell_would_not_search_the_same_way_stays_with_the_shell(tmp_path: Path) -> None:
    assert direct_program("wc -l", {}) is None  # no PATH: the shell's built-in default applies
    assert direct_program("wc -l", {"PATH": ""}) is None
    assert direct_program("wc -l", {"PATH": f".:{ENV['PATH']}"}) is None
    assert direct_program("wc -l", {"PATH": f"{ENV['PATH']}:"}) is None


def test_path_order_and_executability_decide_like_the_shell(tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    (first / "prog").write_text("#!/bin/sh\n")  # not executable: skipped
    program = second / "prog"
    program.write_text("#!/bin/sh\n")
    program.chmod(program.stat().st_mode | stat.S_IXUSR)
    # The argv as written, the path as found: the spawn execs the path.
    assert direct_program("prog -x", {"PATH": f"{first}:{second}"}) == (["prog", "-x"], str(program))
    assert direct_program(f"{program} -x", {"PATH": str(first)}) == ([str(program), "-x"], str(program))
    assert direct_program(f"{first / 'prog'}", {"PATH": str(first)}) is None


def test_pwd_is_set_as_dash_sets_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert with_shell_pwd({})["PWD"] == os.getcwd()
    assert with_shell_pwd({"PWD": "/"})["PWD"] == os.getcwd()
    assert with_shell_pwd({"PWD": str(tmp_path)})["PWD"] == str(tmp_path)


def test_a_signal_reads_as_the_shell_reports_it() -> None:
    assert shell_status(0) == 0
    assert shell_status(3) == 3
    assert shell_status(-9) == 137


async def test_a_direct_command_gives_what_the_shell_gave(tmp_path: Path) -> None:
    data = b"".join(b"line %d\n" % i for i in range(1000))
    outputs = {}
    for name, command in (("direct", "wc -l"), ("shell", "wc -l | cat")):
        async with CommandOutput(command, tmp_path / name, env={"SEEN": "yes"}) as output:
            await output.write(data)
            await output.finish()
        outputs[name] = (tmp_path / name).read_bytes()
    assert outputs["direct"] == outputs["shell"] == b"1000\n"


async def test_a_direct_command_sees_the_environment_the_shell_would_give(tmp_path: Path) -> None:
    # env is not a builtin: it runs directly and prints what it was given.
    async with CommandOutput("env", tmp_path / "direct", env={"SEEN": "yes"}) as direct:
        await direct.finish()
    async with CommandOutput("env | cat", tmp_path / "shell", env={"SEEN": "yes"}) as shell:
        await shell.finish()

    def variables(path: Path) -> dict[str, str]:
        pairs = (line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)
        # The command id differs per run by design; bash as sh would add SHLVL and _.
        return {k: v for k, v in pairs if k not in ("SHARDLINE_COMMAND_ID", "SHLVL", "_")}

    assert variables(tmp_path / "direct") == variables(tmp_path / "shell")
    assert variables(tmp_path / "direct")["SEEN"] == "yes"


async def test_a_direct_command_killed_by_a_signal_reads_as_from_the_shell(tmp_path: Path) -> None:
    async with CommandOutput("sleep 30", tmp_path / "out") as output:
        assert output.pid is not None
        os.kill(output.pid, 9)
        with pytest.raises(CommandFailedError) as failure:
            await output.finish()
    assert failure.value.returncode == 137  # as `sh -c 'sleep 30'` reports its child's SIGKILL


async def test_a_direct_command_names_itself_as_under_the_shell(tmp_path: Path) -> None:
    # argv[0] as written: a program's messages read the same as under sh.
    tails = {}
    for name, command in (("direct", "wc /no/such/file"), ("shell", "wc /no/such/file; exit 1")):
        async with CommandOutput(command, tmp_path / name, ok_exit=(0, 1)) as output:
            await output.finish()
        tails[name] = output.stderr_tail
    assert tails["direct"] == tails["shell"]
    assert tails["direct"].startswith("wc: ")
