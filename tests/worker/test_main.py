"""``python -m shardline.worker``: the pool a local backend keeps (``run ID
TASK`` and ``cancel ID`` lines in, one answer line per task out, many tasks
at once, until stdin closes) and a single task on stdin, as real processes."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

from leftovers import alive
from polling import PATIENCE_S, eventually
from reference import reference_split
from tasks import DATA, SLEEPER, kill_group_quietly, pid_from


async def spawn_pool_worker(*options: str, env: dict[str, str] | None = None) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "shardline.worker",
        "--pool",
        *options,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
        start_new_session=True,
    )


async def test_a_pool_told_to_warm_clients_it_cannot_make_still_serves_tasks(make_task, unused_tcp_port):
    # Nothing listens there: making the clients ahead of the tasks fails, quietly.
    nowhere = f"http://127.0.0.1:{unused_tcp_port}"
    env = {**os.environ, "AWS_ENDPOINT_URL_S3": nowhere, "AWS_ENDPOINT_URL_DYNAMODB": nowhere}
    process = await spawn_pool_worker("--warm-aws=s3,dynamodb", env=env)
    assert process.stdin is not None and process.stdout is not None
    try:
        task = make_task(command="cat")
        process.stdin.write(b"run 1 " + task.to_json().encode() + b"\n")
        answer = json.loads(await asyncio.wait_for(process.stdout.readline(), PATIENCE_S))
        assert answer["id"] == "1" and answer["ok"] is True, answer
        assert Path(task.output_path).read_bytes() == DATA
        process.stdin.close()
        assert await asyncio.wait_for(process.wait(), PATIENCE_S) == 0
    finally:
        kill_group_quietly(process.pid if process.returncode is None else None)
        await process.wait()


def test_an_unknown_pool_option_is_refused_by_name():
    result = subprocess.run(
        [sys.executable, "-m", "shardline.worker", "--pool", "--warm-aws=s3,sqs"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=PATIENCE_S,
    )
    assert result.returncode != 0
    assert b"--warm-aws=s3,sqs" in result.stderr


async def test_pool_worker_answers_each_task_line_and_exits_at_stdin_eof(tmp_path, make_task):
    process = await spawn_pool_worker()
    assert process.stdin is not None and process.stdout is not None
    try:
        good = make_task(command="cat")
        bad = make_task(command="echo oops >&2; exit 3")
        process.stdin.write(f"\nrun 1 {good.to_json()}\nrun 2 {bad.to_json()}\nrun 3 not json\nbogus\n".encode())
        answers = [json.loads(await asyncio.wait_for(process.stdout.readline(), PATIENCE_S)) for _ in range(4)]
        by_id = {answer["id"]: answer for answer in answers}
        assert by_id["1"]["ok"] is True
        assert by_id["2"] == {"id": "2", "ok": False, "detail": "worker failed: command exited with status 3: oops"}
        assert by_id["3"]["ok"] is False and "invalid shard task" in by_id["3"]["detail"]
        assert by_id[""]["ok"] is False and "invalid line" in by_id[""]["detail"]
        assert Path(good.output_path).read_bytes() == DATA
        # EOF while a task runs: the task is cancelled, its command killed.
        process.stdin.write(b"run 4 " + make_task(command=SLEEPER.format(dir=tmp_path)).to_json().encode() + b"\n")
        sleeper = await pid_from(tmp_path / "sleep.pid")
        process.stdin.close()
        assert await asyncio.wait_for(process.wait(), PATIENCE_S) == 0
        await eventually(lambda: not alive(sleeper), "the command of a worker whose stdin closed is killed")
    finally:
        kill_group_quietly(process.pid if process.returncode is None else None)
        await process.wait()


async def test_pool_worker_runs_tasks_at_once_and_cancels_one_by_its_id(tmp_path, make_task):
    process = await spawn_pool_worker()
    assert process.stdin is not None and process.stdout is not None
    try:
        sleeping = make_task(command=SLEEPER.format(dir=tmp_path))
        process.stdin.write(b"run 1 " + sleeping.to_json().encode() + b"\n")
        sleeper = await pid_from(tmp_path / "sleep.pid")
        # A second task runs to its end while the first one still sleeps.
        quick = make_task(command="cat")
        process.stdin.write(b"run 2 " + quick.to_json().encode() + b"\n")
        answer = json.loads(await asyncio.wait_for(process.stdout.readline(), PATIENCE_S))
        assert answer["id"] == "2" and answer["ok"] is True, answer
        assert alive(sleeper)
        process.stdin.write(b"cancel 1\n")
        answer = json.loads(await asyncio.wait_for(process.stdout.readline(), PATIENCE_S))
        assert answer == {"id": "1", "ok": False, "detail": "worker cancelled the task"}
        # The answer comes only once the cancelled task's command is gone.
        assert not alive(sleeper)
        assert process.returncode is None  # and the process serves on
        process.stdin.close()
        assert await asyncio.wait_for(process.wait(), PATIENCE_S) == 0
    finally:
        kill_group_quietly(process.pid if process.returncode is None else None)
        await process.wait()


async def test_idle_pool_worker_exits_at_stdin_eof():
    process = await spawn_pool_worker()
    assert process.stdin is not None
    process.stdin.close()
    assert await asyncio.wait_for(process.wait(), PATIENCE_S) == 0


async def test_single_task_on_stdin_still_runs_and_exits(make_task):
    task = make_task(shards=3, index=1)
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "shardline.worker"],
        input=task.to_json().encode(),
        capture_output=True,
        timeout=PATIENCE_S,
    )
    assert result.returncode == 0, result.stderr.decode()
    expected = reference_split(DATA, 3, b"\n")[1]
    assert json.loads(result.stdout)["bytes"] == len(expected)
    assert Path(task.output_path).read_bytes() == expected
