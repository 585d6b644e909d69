"""The garbage collector paused while a process builds what it keeps (io/collector.py)."""

from __future__ import annotations

import gc
import subprocess
import sys
import threading
import weakref

import pytest

from shardline.io.collector import collection_paused, pause_for_start_up, start_up_done


@pytest.fixture(autouse=True)
def collector_restored():
    """Every test leaves the collector as it found it: on, nothing frozen."""
    assert gc.isenabled()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.enable()


def test_paused_in_the_block_and_running_after():
    with collection_paused():
        assert not gc.isenabled()
    assert gc.isenabled()


def test_running_again_after_the_block_raises():
    with pytest.raises(RuntimeError), collection_paused():
        raise RuntimeError("the import failed")
    assert gc.isenabled()


def test_an_inner_block_leaves_the_collector_to_the_outer_one():
    with collection_paused():
        with collection_paused():
            pass
        assert not gc.isenabled()  # the outer block still builds
    assert gc.isenabled()


def test_a_block_in_another_thread_during_start_up_does_not_resume_it():
    pause_for_start_up()
    seen = []

    def client_made_in_a_thread() -> None:
        with collection_paused():
            pass
        seen.append(gc.isenabled())

    thread = threading.Thread(target=client_made_in_a_thread)
    thread.start()
    thread.join()
    assert seen == [False]  # start-up is not done
    start_up_done()
    assert gc.isenabled()


def test_start_up_done_freezes_what_exists_and_resumes_once():
    pause_for_start_up()
    kept = [object() for _ in range(10)]  # a start-up's objects
    start_up_done()
    assert gc.isenabled() and gc.get_freeze_count() >= len(kept)
    frozen = gc.get_freeze_count()
    start_up_done()  # done already: nothing more is frozen
    assert gc.get_freeze_count() == frozen


def test_cycles_made_after_start_up_are_collected():
    pause_for_start_up()
    start_up_done()

    class Node:
        pass

    node = Node()
    node.self = node  # a cycle only the collector frees
    watched = weakref.ref(node)
    del node
    gc.collect()
    assert watched() is None


def test_the_program_runs_with_the_collector_on_after_its_start_up(tmp_path):
    """`shardline` itself pauses collection while it starts, then collects as usual
    (observed from a wrapper around the real `run_command`); a caller of
    `main(argv)` in its own process keeps its collector as it was."""
    from shardline.cli import main

    source = tmp_path / "lines"
    source.write_bytes(b"a\nb\n")
    probe = (
        "import gc, sys\n"
        "import shardline.cli._run as run\n"
        "original = run.run_command\n"
        "def probed(args, command):\n"
        "    print('collector on while running:', gc.isenabled(), 'frozen:', gc.get_freeze_count() > 0,"
        " file=sys.stderr)\n"
        "    return original(args, command)\n"
        "run.run_command = probed\n"
        "from shardline.cli import main\n"
        f"sys.argv = ['shardline', 'run', {str(source)!r}, '--', 'wc', '-l']\n"
        "main()\n"
    )
    finished = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert finished.returncode == 0, finished.stderr
    assert "collector on while running: True frozen: True" in finished.stderr
    assert finished.stdout.split() == ["2"]
    assert main(["run", str(source), "--", "wc", "-l"]) == 0
    assert gc.isenabled() and gc.get_freeze_count() == 0
