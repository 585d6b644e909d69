"""bench/model.py: its arithmetic by hand, and its check against the bench's
own results file (no server: the local answer times are given)."""

from __future__ import annotations

import importlib.util
import json
import statistics
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture(scope="module")
def model():
    spec = importlib.util.spec_from_file_location("bench_model", BENCH / "model.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_model"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def results() -> dict:
    return json.loads((BENCH / "results" / "full.json").read_text())


LOCAL = {"moto_put_s": 0.003, "moto_get_s": 0.003, "relay_rtt_s": 0.0001}


def test_one_worker_reads_in_rounds_of_gets_in_flight(model, results):
    costs = model.bench_costs(results, model.LocalCosts(**LOCAL))
    # 32 MiB in 1 MiB parts, 4 in flight: 8 rounds of 30 ms first byte, 32 MiB at 4 x 2 MiB/s.
    assert model.read_s(costs, 32 * model.MiB) == pytest.approx(8 * 0.030 + 32 / 8)
    assert model.read_s(costs, 0) == 0.0


def test_the_model_is_checked_against_every_measured_median(model, results):
    rows = model.check(results, model.bench_costs(results, model.LocalCosts(**LOCAL)))
    assert len(rows) == 24  # 6 strategies x 4 N
    assert statistics.median(abs(row["error"]) for row in rows) < 0.15
    assert all(abs(row["error"]) < 0.05 for row in rows if row["strategy"] == "download-split")


def test_the_seeds_case_direct_reads_beat_download_and_split(model, results):
    costs = model.seed_costs(
        model.bench_costs(results, model.LocalCosts(**LOCAL)), cold_start_s=1.0, coordinator_cpu_per_shard_s=0.025
    )
    size = 20 * model.GB
    assert model.predict("shardline", costs, size, 16) < model.predict("download-split", costs, size, 16) / 5
    first, last = model.direct_reads_win(costs, size)
    assert first == 2 and 1000 < last < 100_000  # the coordinator's serial cost per shard ends it
