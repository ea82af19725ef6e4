"""bench/layer_bench.py end to end on tiny shapes: it times every variant that runs here and
writes the JSON and markdown reports that gpu_check.sh collects."""

import json

import pytest
from bench_scripts import load_bench_script


@pytest.fixture
def layer_bench():
    return load_bench_script("layer_bench")


def test_smoke_run_writes_reports(layer_bench, tmp_path, capsys):
    assert layer_bench.main(["--smoke", "--out", str(tmp_path)]) == 0
    stem = "cpu"
    report = json.loads((tmp_path / f"{stem}.json").read_text())
    timed = {(t["variant"], t["M"]) for t in report["results"] if t["eager_us"] is not None}
    for variant in ("dense", "chain3", "chain2"):
        assert {(variant, M) for M in layer_bench.SMOKE_ROWS} <= timed
    assert all(t["eager_us"] > 0 for t in report["results"] if t["eager_us"] is not None)
    table = (tmp_path / f"{stem}.md").read_text()
    assert "| layer (out×in) | r | M | dense | chain3 | chain2 | triton | cuda |" in table
    assert capsys.readouterr().out.strip().endswith(table.strip().splitlines()[-1])


def test_spent_budget_records_sizes_as_not_run(layer_bench, tmp_path):
    assert layer_bench.main(["--smoke", "--budget", "0", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "cpu.json").read_text())
    assert report["results"]
    assert {t["note"] for t in report["results"]} == {"time budget spent"}
