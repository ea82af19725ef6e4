"""Where a fused decode kernel beats the cuBLAS chain, per GPU and execution mode.

Two modes: inside CUDA graphs the fused kernels (the single-launch Triton kernel, the CUDA
extension's) are compared with chain2 by their graph-replay times; eagerly by their eager times
(host overhead included, which is what decides an eager call).
The answer comes from measurements, never from a guess: `bench/layer_bench.py` times chain2 (U
folded) and the fused kernels eagerly and in CUDA graphs with cold weights over a grid of layer
shapes, ranks and row counts, and writes `<GPU name>.json`. The decode rows of such a file
(M ≤ FUSED_MAX_ROWS) are the table. The package ships the files measured so far
(`measured/`); CURKERNELS_DECODE_TABLE names another layer-bench JSON, which then answers for
the GPU it was measured on (its `meta.device`), so that a user of a GPU not shipped can run the
benchmark once and get the fused kernels where they win.

A call (M rows, m outputs, n inputs, rank r) is answered by the smallest measured point that
covers it (M' ≥ M, m' ≥ m, n' ≥ n, r' ≥ r; smallest by M', then r', then m'·n'): its winners
are the fused kernels that took at most WIN_RATIO of chain2's time there, fastest first.
Rounding up is the cautious direction: a fused kernel's margin shrinks as the factors grow (its
fixed cost is a grid-wide barrier, chain2's a second launch). A call past every measured point
gets no verdict: the caller decides (graphs keep chain2; eager calls fall back to dispatch's
rules).
"""

import functools
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

ENV_DECODE_TABLE = "CURKERNELS_DECODE_TABLE"
MEASURED_DIR = Path(__file__).with_name("measured")
# A win must clear timing noise: ties (0.95–1.05×) happen between replays of one graph.
WIN_RATIO = 0.9
# A relative error against fp64 past bf16's tolerance: a kernel (or config) this wrong at a
# measured point does not count there, whatever its time.
WRONG = 2e-2
BASELINE_VARIANT = "chain2"
FUSED_VARIANTS = ("triton", "cuda")
# mode -> the timing it compares
MODES = {"graph": "graph_us", "eager": "eager_us"}


@dataclass(frozen=True)
class LayerPoint:
    """A measured decode call: M rows through an m×n layer of rank r."""
    rows: int
    m: int
    n: int
    r: int

    def covers(self, rows: int, m: int, n: int, r: int) -> bool:
        return self.rows >= rows and self.m >= m and self.n >= n and self.r >= r

    def size(self) -> tuple[int, int, int]:
        return (self.rows, self.r, self.m * self.n)


def smallest_covering(points, rows: int, shape: tuple[int, int, int]):
    """The smallest of `points` that covers this call (see the module docstring), or None."""
    m, n, r = shape
    covering = [p for p in points if p.covers(rows, m, n, r)]
    return min(covering, key=LayerPoint.size) if covering else None


@dataclass(frozen=True)
class MeasuredPoint(LayerPoint):
    winners: tuple[str, ...]  # fused variants within WIN_RATIO of chain2, fastest first


def points_from_benchmark(report: dict, dtype: torch.dtype, max_rows: int,
                          mode: str = "graph") -> list[MeasuredPoint]:
    """The decode points of a layer-bench report measured in `dtype`: every (M, m, n, r) with a
    time in `mode` (see MODES) for chain2 and for at least one fused kernel."""
    timing = MODES[mode]
    meta = report.get("meta", {})
    if meta.get("dtype") != str(dtype).removeprefix("torch."):
        return []
    times: dict[tuple, dict[str, float]] = {}
    for row in report.get("results", []):
        if row.get("M", max_rows + 1) <= max_rows and row.get(timing) is not None:
            key = (row["M"], row["m"], row["n"], row["r"])
            times.setdefault(key, {})[row["variant"]] = row[timing]
    points = []
    for key, t in sorted(times.items()):
        fused = [variant for variant in FUSED_VARIANTS if variant in t]
        if BASELINE_VARIANT not in t or not fused:
            continue
        winners = sorted((v for v in fused if t[v] <= WIN_RATIO * t[BASELINE_VARIANT]),
                         key=t.__getitem__)
        points.append(MeasuredPoint(*key, winners=tuple(winners)))
    return points


def measurements_by_device(files: list[Path], override: str | None, variable: str, kind: str,
                           device_of: Callable[[dict], str | None]) -> dict[str, dict]:
    """Device name -> report: the shipped `files`, then the file an environment variable names
    (`override`, the value of `variable`), which answers for its device. A file that cannot be
    read, or is not a `kind` JSON (`device_of` finds no device in it), is an error naming it."""
    reports = {}
    for path, what in [(path, "shipped") for path in files] + (
            [(Path(override), variable)] if override else []):
        try:
            report = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise ValueError(f"{what} {path} is not a readable {kind} JSON: {error}") from error
        device = device_of(report) if isinstance(report, dict) else None
        if not device:
            raise ValueError(f"{what} {path} is not a {kind} JSON (no device)")
        reports[device] = report
    return reports


@functools.cache
def _reports(override: str | None) -> dict[str, dict]:
    """Device name -> layer-bench report: the shipped files, then CURKERNELS_DECODE_TABLE's."""
    return measurements_by_device(sorted(MEASURED_DIR.glob("*.json")), override,
                                  ENV_DECODE_TABLE, "layer-bench",
                                  lambda report: report.get("meta", {}).get("device"))


@functools.cache
def _points(override: str | None, device_name: str, dtype: torch.dtype, max_rows: int,
            mode: str) -> tuple[MeasuredPoint, ...]:
    report = _reports(override).get(device_name)
    return tuple(points_from_benchmark(report, dtype, max_rows, mode)) if report else ()


def decode_winners(device_name: str, dtype: torch.dtype, rows: int, shape: tuple[int, int, int],
                   max_rows: int, mode: str) -> tuple[str, ...] | None:
    """The fused kernels that won at the measured point covering this call, fastest first (see
    the module docstring; empty: chain2 was not beaten), or None when no point covers it."""
    points = _points(os.environ.get(ENV_DECODE_TABLE) or None, device_name, dtype, max_rows,
                     mode)
    point = smallest_covering(points, rows, shape)
    return point.winners if point is not None else None


def measured_devices() -> list[str]:
    return sorted(_reports(os.environ.get(ENV_DECODE_TABLE) or None))
