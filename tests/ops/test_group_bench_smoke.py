"""bench/group_bench.py end to end on tiny shapes: every way of running a sibling group that
runs here is checked against fp64 and timed, and the reports gpu_check.sh collects are written."""

import json

import pytest
from bench_scripts import load_bench_script

from curkernels.ops import unavailable_reason


@pytest.fixture
def group_bench():
    return load_bench_script("group_bench")


def test_smoke_run_checks_times_and_reports_every_way(group_bench, tmp_path):
    import torch
    assert group_bench.main(["--smoke", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "group_bench.json").read_text())
    ways = set(group_bench.WAYS)
    if unavailable_reason("triton", torch.device("cpu")) is not None:
        ways.discard("group")  # runs here under the interpreter only (TRITON_INTERPRET=1)
    timed = {(row["way"], row["M"]) for row in report["results"] if row["eager_us"]}
    assert timed == {(way, M) for way in ways for M in group_bench.SMOKE_ROWS}
    assert all(row["error"] < 1e-5 for row in report["results"] if row["eager_us"])
    table = (tmp_path / "group_bench.md").read_text()
    assert "| group | M | dense | members | chain | group |" in table
    assert "WRONG" not in table


def test_spent_budget_records_points_as_not_run(group_bench, tmp_path):
    assert group_bench.main(["--smoke", "--budget", "0", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "group_bench.json").read_text())
    assert report["results"]
    assert {row["note"] for row in report["results"]} == {"time budget spent"}
