"""`bench/e2e.py --small` runs on the CPU, both paths, and writes its JSON, table and plot."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_small_benchmark_writes_results(tmp_path):
    command = [sys.executable, str(REPO / "bench" / "e2e.py"), "--small", "--out", str(tmp_path),
               "--settings", "dense,curing,keep0.5", "--batch-sizes", "1,2", "--rounds", "1",
               "--warmup", "1", "--compiled-settings", "dense,curing",
               "--eager-decode-rounds", "2"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=240, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "e2e_small.json").read_text())
    assert summary["attention"] == "sdpa" and summary["dtype"] == "float32"
    measured = {(r["path"], r["metric"], r["batch"], r["setting"]) for r in summary["results"]}
    # (prefill, decode at 2 batch sizes) × (3 settings eager + 2 compiled)
    assert len(measured) == 3 * (3 + 2)
    assert not any(p == "compiled" and s == "keep0.5" for p, _, _, s in measured)
    assert all(r["value"] > 0 for r in summary["results"])
    assert all(len(r["seconds"]) == (2 if (r["path"], r["metric"]) == ("eager",
                                                                       "decode_tokens_per_s")
                                     else 1) for r in summary["results"])
    bounds = {c["setting"]: c["bound"] for c in summary["comparisons"]
              if c["metric"] == "decode_tokens_per_s" and c["path"] == "eager" and c["batch"] == 1}
    assert 1 < bounds["curing"] < bounds["keep0.5"]  # fewer bytes per step, more so at keep 0.5
    assert summary["settings"]["keep0.5"]["built_with"].startswith("curkernels.compress")
    assert all(c["passed"] is None for c in summary["checks"])  # targets are for 8B on a GPU
    table = (tmp_path / "e2e_small.md").read_text()
    assert "| compiled | decode tok/s | 2 |" in table and "keep0.5" in table
    assert "not timed" in table  # keep0.5 on the compiled path
    assert (tmp_path / "e2e_small.png").stat().st_size > 0


def test_time_budget_skips_jobs_and_lists_them(tmp_path):
    command = [sys.executable, str(REPO / "bench" / "e2e.py"), "--small", "--out", str(tmp_path),
               "--settings", "dense,keep0.5", "--paths", "eager", "--batch-sizes", "1",
               "--time-budget", "0"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=240, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "e2e_small.json").read_text())
    assert summary["results"] == []
    assert [(j["path"], j["metric"], j["batch"]) for j in summary["skipped"]] == [
        ("eager", "prefill_ms", 1), ("eager", "decode_tokens_per_s", 1)]
    assert "skipped (time budget" in (tmp_path / "e2e_small.md").read_text()


def test_shared_shrinks_time_each_compressed_setting_beside_its_copy(tmp_path):
    command = [sys.executable, str(REPO / "bench" / "e2e.py"), "--small", "--out", str(tmp_path),
               "--settings", "dense,keep0.5", "--batch-sizes", "1", "--rounds", "1",
               "--warmup", "1", "--shared-shrinks"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=240, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "e2e_small.json").read_text())
    settings = summary["settings"]
    assert list(settings) == ["dense", "keep0.5", "keep0.5+shared"]
    # the stacked shrink weights are the members' own factors: no byte more
    assert settings["keep0.5+shared"]["parameter_bytes"] == settings["keep0.5"]["parameter_bytes"]
    measured = {(r["path"], r["setting"]) for r in summary["results"]}
    assert {("eager", "keep0.5+shared"), ("compiled", "keep0.5+shared")} <= measured


def test_compiled_settings_must_include_dense(tmp_path):
    command = [sys.executable, str(REPO / "bench" / "e2e.py"), "--small", "--out", str(tmp_path),
               "--settings", "dense,keep0.5", "--compiled-settings", "keep0.5"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=240, cwd=REPO)
    assert done.returncode != 0 and "--compiled-settings must include dense" in done.stderr


def test_headline_jobs_first_then_eager_before_compiled():
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import e2e
    finally:
        sys.path.remove(str(REPO / "bench"))
    args = e2e.parse_args(["--paths", "compiled,eager", "--batch-sizes", "1,8,32"])
    assert e2e.planned_jobs(args) == [
        ("compiled", "decode_tokens_per_s", 1), ("compiled", "prefill_ms", 1),
        ("eager", "prefill_ms", 1), ("eager", "decode_tokens_per_s", 1),
        ("eager", "decode_tokens_per_s", 8), ("eager", "decode_tokens_per_s", 32),
        ("compiled", "decode_tokens_per_s", 8), ("compiled", "decode_tokens_per_s", 32)]
