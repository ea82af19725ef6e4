"""The Triton decode kernel's tile config per GPU and layer shape, from measured sweeps.

`bench/decode_sweep.py` times several tile configs (`DecodeConfig` fields) side by side on each
Llama-3.1-8B layer shape, rank and row count: CUDA-graph replays over cold weights, every
config checked against an fp64 reference first. The package ships those runs
(`measured/decode_configs/<gpu>.json`); CURKERNELS_DECODE_CONFIGS names another, which then
answers for the GPU it was measured on. A swept config's fields override the default config of
the point's row block (the kernel's tiles hold 16, 32 or 64 input rows, each block with its own
defaults; sweeps before batched decode recorded every field, at up to 16 rows, which reads the
same). A call runs the config that was fastest at the smallest swept point of its own row block
covering it (the rule of decode_table.py), provided it beat the default config there by at
least MIN_GAIN (a tie keeps the default); the default config runs where nothing covers the call,
in another dtype than the sweep's, or on a GPU never swept. The backend memoizes the choice per
call shape: CURKERNELS_DECODE_CONFIGS counts as it was at a shape's first call.
"""

import functools
import os
from dataclasses import dataclass

import torch

from .decode_table import (
    MEASURED_DIR,
    WRONG,
    LayerPoint,
    measurements_by_device,
    smallest_covering,
)

ENV_DECODE_CONFIGS = "CURKERNELS_DECODE_CONFIGS"
CONFIGS_DIR = MEASURED_DIR / "decode_configs"
# Replays of one graph differ by a few percent: a smaller gain is not a measured one.
MIN_GAIN = 0.05


@dataclass(frozen=True)
class SweptPoint(LayerPoint):
    fields: tuple[tuple[str, object], ...] | None  # the winning config's, None: the default


def points_from_sweep(report: dict, default_fields: dict) -> list[SweptPoint]:
    """Every swept (M, m, n, r) with the config to run there (see the module docstring).
    `default_fields` are the default config's fields: a field an older sweep did not record
    had its default value then; a config with a field unknown here cannot be run and is left
    out."""
    configs = {name: {**default_fields, **fields}
               for name, fields in report.get("configs", {}).items()
               if set(fields) <= set(default_fields)}
    default = next((name for name, fields in configs.items() if fields == default_fields), None)
    points = []
    for row in report.get("rows", []):
        timed = {name: row[name] for name in configs if row.get(name) is not None
                 and row.get("errors", {}).get(name, 1.0) < WRONG}
        if not timed:
            continue
        best = min(timed, key=timed.__getitem__)
        if default is not None and (default not in timed
                                    or timed[best] > (1 - MIN_GAIN) * timed[default]):
            best = default
        fields = None if best == default else tuple(sorted(configs[best].items()))
        points.append(SweptPoint(row["M"], row["m"], row["n"], row["r"], fields))
    return points


@functools.cache
def _sweeps(override: str | None) -> dict[str, dict]:
    """Device name -> sweep: the shipped files, then CURKERNELS_DECODE_CONFIGS's."""
    return measurements_by_device(sorted(CONFIGS_DIR.glob("*.json")), override,
                                  ENV_DECODE_CONFIGS, "decode-sweep",
                                  lambda report: "configs" in report and report.get("device"))


@functools.cache
def _points(override: str | None, device_name: str, dtype: torch.dtype,
            default_fields: tuple) -> tuple[SweptPoint, ...]:
    report = _sweeps(override).get(device_name)
    # Sweeps before the dtype was recorded ran in bf16.
    if report is None or report.get("dtype", "bfloat16") != str(dtype).removeprefix("torch."):
        return ()
    return tuple(points_from_sweep(report, dict(default_fields)))


def measured_fields(device_name: str, dtype: torch.dtype, rows: int,
                    shape: tuple[int, int, int], default_fields: dict,
                    row_block: range) -> dict | None:
    """The fields of the config to run for this call, or None for the default config.
    `row_block` holds the row counts that run the same tiles as this call's, whose default
    config has `default_fields`: a point measured in another block chose among other tiles."""
    points = _points(os.environ.get(ENV_DECODE_CONFIGS) or None, device_name, dtype,
                     tuple(sorted(default_fields.items())))
    point = smallest_covering([point for point in points if point.rows in row_block], rows,
                              shape)
    return dict(point.fields) if point is not None and point.fields is not None else None


def swept_devices() -> list[str]:
    return sorted(_sweeps(os.environ.get(ENV_DECODE_CONFIGS) or None))
