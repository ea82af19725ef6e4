"""Where the single-launch Triton decode kernel beats the cuBLAS chain inside CUDA graphs, per GPU.

The answer comes from measurements, never from a guess: `bench/layer_bench.py` times chain2 (U
folded) and the fused kernels in CUDA graphs with cold weights over a grid of layer shapes,
ranks and row counts, and writes `<GPU name>.json`. The decode rows of such a file
(M ≤ DECODE_MAX_ROWS) are the table. The package ships the files measured so far
(`measured/`); CURKERNELS_DECODE_TABLE names another layer-bench JSON, which then answers for
the GPU it was measured on (its `meta.device`), so that a user of a GPU not shipped can run the
benchmark once and get the fused kernels where they win.

A call (M rows, m outputs, n inputs, rank r) is answered by the smallest measured point that
covers it (M' ≥ M, m' ≥ m, n' ≥ n, r' ≥ r; smallest by M', then r', then m'·n'): the fused
kernel runs when it took at most WIN_RATIO of chain2's time there. Rounding up is the cautious
direction: the fused kernel's margin shrinks as the factors grow (its fixed cost is a grid-wide
barrier, chain2's a second launch). A call past every measured point keeps chain2.
"""

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

ENV_DECODE_TABLE = "CURKERNELS_DECODE_TABLE"
MEASURED_DIR = Path(__file__).with_name("measured")
# A win must clear timing noise: ties (0.95–1.05×) happen between replays of one graph.
WIN_RATIO = 0.9
FUSED_BACKEND = "triton"
BASELINE_VARIANT = "chain2"


@dataclass(frozen=True)
class MeasuredPoint:
    rows: int
    m: int
    n: int
    r: int
    fused_wins: bool

    def covers(self, rows: int, m: int, n: int, r: int) -> bool:
        return self.rows >= rows and self.m >= m and self.n >= n and self.r >= r

    def size(self) -> tuple[int, int, int]:
        return (self.rows, self.r, self.m * self.n)


def points_from_benchmark(report: dict, dtype: torch.dtype, max_rows: int) -> list[MeasuredPoint]:
    """The decode points of a layer-bench report measured in `dtype`: every (M, m, n, r) with a
    CUDA-graph time for both chain2 and the fused Triton kernel."""
    meta = report.get("meta", {})
    if meta.get("dtype") != str(dtype).removeprefix("torch."):
        return []
    times: dict[tuple, dict[str, float]] = {}
    for row in report.get("results", []):
        if row.get("M", max_rows + 1) <= max_rows and row.get("graph_us") is not None:
            key = (row["M"], row["m"], row["n"], row["r"])
            times.setdefault(key, {})[row["variant"]] = row["graph_us"]
    return [MeasuredPoint(*key, fused_wins=t[FUSED_BACKEND] <= WIN_RATIO * t[BASELINE_VARIANT])
            for key, t in sorted(times.items())
            if FUSED_BACKEND in t and BASELINE_VARIANT in t]


def _read(path: Path, what: str) -> dict:
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"{what} {path} is not a readable layer-bench JSON: {error}") from error
    if not isinstance(report, dict) or "device" not in report.get("meta", {}):
        raise ValueError(f"{what} {path} is not a layer-bench JSON (no meta.device)")
    return report


@functools.cache
def _reports(override: str | None) -> dict[str, dict]:
    """Device name -> report: the shipped files, then the CURKERNELS_DECODE_TABLE file."""
    reports = {}
    for path in sorted(MEASURED_DIR.glob("*.json")):
        report = _read(path, "shipped decode table")
        reports[report["meta"]["device"]] = report
    if override:
        report = _read(Path(override), ENV_DECODE_TABLE)
        reports[report["meta"]["device"]] = report
    return reports


@functools.cache
def _points(override: str | None, device_name: str, dtype: torch.dtype,
            max_rows: int) -> tuple[MeasuredPoint, ...]:
    report = _reports(override).get(device_name)
    return tuple(points_from_benchmark(report, dtype, max_rows)) if report else ()


def fused_decode_wins(device_name: str, dtype: torch.dtype, rows: int,
                      shape: tuple[int, int, int], max_rows: int) -> bool:
    """Whether the measured point covering this call (see the module docstring) was a win."""
    points = _points(os.environ.get(ENV_DECODE_TABLE) or None, device_name, dtype, max_rows)
    m, n, r = shape
    covering = [p for p in points if p.covers(rows, m, n, r)]
    return bool(covering) and min(covering, key=MeasuredPoint.size).fused_wins


def measured_devices() -> list[str]:
    return sorted(_reports(os.environ.get(ENV_DECODE_TABLE) or None))
