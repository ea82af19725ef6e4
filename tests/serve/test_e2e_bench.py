"""`bench/e2e.py --small` runs on the CPU, both paths, and writes its JSON, table and plot."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_small_benchmark_writes_results(tmp_path):
    command = [sys.executable, str(REPO / "bench" / "e2e.py"), "--small", "--out", str(tmp_path),
               "--settings", "dense,curing,keep0.5", "--batch-sizes", "1,2", "--rounds", "1",
               "--warmup", "1"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=240, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "e2e_small.json").read_text())
    assert summary["attention"] == "sdpa" and summary["dtype"] == "float32"
    measured = {(r["path"], r["metric"], r["batch"], r["setting"]) for r in summary["results"]}
    assert len(measured) == 2 * 3 * 3  # paths × (prefill, decode at 2 batch sizes) × settings
    assert all(r["value"] > 0 for r in summary["results"])
    bounds = {c["setting"]: c["bound"] for c in summary["comparisons"]
              if c["metric"] == "decode_tokens_per_s" and c["path"] == "eager" and c["batch"] == 1}
    assert 1 < bounds["curing"] < bounds["keep0.5"]  # fewer bytes per step, more so at keep 0.5
    assert summary["settings"]["keep0.5"]["built_with"].startswith("curkernels.compress")
    assert all(c["passed"] is None for c in summary["checks"])  # targets are for 8B on a GPU
    table = (tmp_path / "e2e_small.md").read_text()
    assert "| compiled | decode tok/s | 2 |" in table and "keep0.5" in table
    assert (tmp_path / "e2e_small.png").stat().st_size > 0
