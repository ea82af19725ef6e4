"""bench/group_bench.py end to end on tiny shapes: every way of running a sibling group that
runs here is checked against fp64 and timed, and the reports gpu_check.sh collects are written."""

import json

import pytest
from bench_scripts import load_bench_script

from curkernels.ops import settings, tables, unavailable_reason


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


def test_a_run_ships_as_the_gpus_group_table(group_bench, tmp_path, monkeypatch):
    """group_bench.json is a group table: shipped (the ways the table compares, named by the
    device, written whole), it answers for its device as the run measured."""
    import torch
    if unavailable_reason("triton", torch.device("cpu")) is not None:
        pytest.skip("the group way runs here under the interpreter only (TRITON_INTERPRET=1)")
    assert group_bench.main(["--smoke", "--out", str(tmp_path)]) == 0
    run = json.loads((tmp_path / "group_bench.json").read_text())
    points = tables.group_points_from_benchmark(run, torch.float32, "eager")
    assert {point.rows for point in points} == set(group_bench.SMOKE_ROWS)
    shipped = load_bench_script("bench_report").ship_group_table(
        tmp_path / "group_bench.json", into=tmp_path / "groups")
    assert shipped == tmp_path / "groups" / "cpu.json"
    assert not list((tmp_path / "groups").glob("*.partial"))
    assert {row["way"] for row in json.loads(shipped.read_text())["results"]} == {
        "group", "chain", "members"}
    monkeypatch.setenv(settings.ENV_GROUP_TABLE, str(shipped))
    settings.reload()
    (members,) = {point.members for point in points}
    for point in points:
        assert tables.group_kernel_wins("cpu", torch.float32, point.rows,
                                             group_bench.SMOKE_HIDDEN, members,
                                             "eager") == point.wins


def test_spent_budget_records_points_as_not_run(group_bench, tmp_path):
    assert group_bench.main(["--smoke", "--budget", "0", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "group_bench.json").read_text())
    assert report["results"]
    assert {row["note"] for row in report["results"]} == {"time budget spent"}
