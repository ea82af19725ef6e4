"""bench/kill_save.py at a small size: killed saves leave a loadable OUT and no debris."""

import json

import pytest
from bench_scripts import load_bench_script


@pytest.mark.slow
def test_killed_saves_leave_old_or_new_and_the_next_save_no_staging(tmp_path):
    results = load_bench_script("kill_save").main([
        "--saves", "3", "--compress", "1", "--hidden", "64", "--vocab", "256", "--layers", "1",
        "--out", str(tmp_path)])
    assert json.loads((tmp_path / "kill_save.json").read_text()) == results
    assert [(row["kind"], row["kills"]) for row in results["summary"]] == [
        ("api", 3), ("compress", 1)]
    for row in results["summary"]:
        assert row["out old"] + row["out new"] == row["kills"], row
        assert row["staging left after next save"] == 0 and row["next save wrong"] == 0, row
