"""The measured tables (decode, sibling group, decode tile configs): one loader, one covering rule.

Every table answers from measurements, never from a guess, per GPU (by its name). The package
ships the runs measured so far under `measured/`; an environment variable names another run,
which then answers for the GPU it was measured on, so that a user of a GPU not shipped can run
the benchmark once and get the fused kernels where they win:

- decode (`measured/<gpu>.json`, CURKERNELS_DECODE_TABLE): `bench/layer_bench.py` times chain2
  (U folded) and the fused kernels (the single-launch Triton kernel, the CUDA extension's)
  eagerly and as CUDA-graph replays, cold weights, over a grid of layer shapes, ranks and row
  counts. Its decode rows (M ≤ DECODE_MAX_ROWS) are the table; a point's winners are the fused
  kernels that took at most WIN_RATIO of chain2's time there, fastest first (in graphs the
  replay times are compared, eagerly the eager times, host overhead included).
- group (`measured/groups/<gpu>.json`, CURKERNELS_GROUP_TABLE): `bench/group_bench.py` times
  sibling groups (q/k/v, gate/up, q/k) every way a model can run them. The group kernel wins
  at a point where it took at most WIN_RATIO of the time of every other way the mode could run
  instead: in graphs the shared cuBLAS chain; eagerly that chain or each member's own call.
- tile configs (`measured/decode_configs/<gpu>.json`, CURKERNELS_DECODE_CONFIGS):
  `bench/decode_sweep.py` times several Triton decode tile configs (`DecodeConfig` fields) side
  by side as graph replays, each checked against fp64 first. A swept config's fields override
  the default config of the point's row block (sweeps before batched decode recorded every
  field, at up to 16 rows, which reads the same); the fastest runs if it beat the default by
  at least MIN_GAIN (a tie keeps the default).

The covering rule, for all three: a call is answered by the smallest measured point that covers
it — every bound at least the call's (rows, and m, n, r for a layer; n and each member's outputs
and rank for a group of as many members) — smallest by rows, then rank, then weight area. Rounding
up is the cautious direction: a fused kernel's margin shrinks as the factors grow (its fixed cost
is a grid-wide barrier, chain2's a second launch). A call past every point gets no answer: the
caller decides (dispatch's rules, the chain, the default tile config). A point whose kernel or
config was wrong (relative error past WRONG against fp64) does not count as a win.
"""

import functools
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from . import settings

MEASURED_DIR = Path(__file__).with_name("measured")
GROUPS_DIR = MEASURED_DIR / "groups"
CONFIGS_DIR = MEASURED_DIR / "decode_configs"
# Decode: the most input rows a fused decode kernel takes in one call (the Triton kernel's
# largest row block), and so the most rows a measured table answers for.
DECODE_MAX_ROWS = 64
MAX_GROUP_MEMBERS = 3  # the group kernel's expand takes up to three members' factors
# A win must clear timing noise: ties (0.95–1.05×) happen between replays of one graph.
WIN_RATIO = 0.9
# A relative error against fp64 past bf16's tolerance: a kernel (or config) this wrong at a
# measured point does not count there, whatever its time.
WRONG = 2e-2
# Replays of one graph differ by a few percent: a smaller gain of a tile config is not measured.
MIN_GAIN = 0.05
BASELINE_VARIANT = "chain2"
FUSED_VARIANTS = ("triton", "cuda")
# mode -> the timing a decode point compares
DECODE_MODES = {"graph": "graph_us", "eager": "eager_us"}
GROUP_WAY = "group"
# mode -> (the timing a group point compares, the ways that run when the group kernel does not)
GROUP_MODES = {"graph": ("graph_us", ("chain",)), "eager": ("eager_us", ("chain", "members"))}


@dataclass(frozen=True)
class LayerPoint:
    """A measured decode call: M rows through an m×n layer of rank r."""
    rows: int
    m: int
    n: int
    r: int

    def covers(self, rows: int, shape: tuple[int, int, int]) -> bool:
        m, n, r = shape
        return self.rows >= rows and self.m >= m and self.n >= n and self.r >= r

    def size(self) -> tuple[int, int, int]:
        return (self.rows, self.r, self.m * self.n)


@dataclass(frozen=True)
class MeasuredPoint(LayerPoint):
    winners: tuple[str, ...]  # fused variants within WIN_RATIO of chain2, fastest first


@dataclass(frozen=True)
class SweptPoint(LayerPoint):
    fields: tuple[tuple[str, object], ...] | None  # the winning config's, None: the default


@dataclass(frozen=True)
class GroupPoint:
    """A measured group call: M rows into members of (outputs, rank) reading n features."""
    rows: int
    n: int
    members: tuple[tuple[int, int], ...]
    wins: bool

    def covers(self, rows: int, call: tuple[int, tuple[tuple[int, int], ...]]) -> bool:
        n, members = call
        return (len(members) == len(self.members) and self.rows >= rows and self.n >= n
                and all(m_ >= m and r_ >= r
                        for (m_, r_), (m, r) in zip(self.members, members, strict=True)))

    def size(self) -> tuple[int, int, int]:
        return (self.rows, sum(r for _, r in self.members),
                self.n * sum(m for m, _ in self.members))


def smallest_covering(points, rows: int, call):
    """The smallest of `points` that covers this call (see the module docstring), or None."""
    covering = [point for point in points if point.covers(rows, call)]
    return min(covering, key=lambda point: point.size()) if covering else None


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def decode_points_from_benchmark(report: dict, dtype: torch.dtype, max_rows: int,
                                 mode: str = "graph") -> list[MeasuredPoint]:
    """The decode points of a layer-bench report measured in `dtype`: every (M ≤ max_rows, m, n,
    r) with a time in `mode` (see DECODE_MODES) for chain2 and for at least one fused kernel."""
    timing = DECODE_MODES[mode]
    if report.get("meta", {}).get("dtype") != _dtype_name(dtype):
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


def group_points_from_benchmark(report: dict, dtype: torch.dtype,
                                mode: str) -> list[GroupPoint]:
    """The measured groups of a group-bench report in `dtype` with a `mode` time for the
    group kernel and for every other way of that mode. Rows without the group's shape (runs
    before it was recorded) are left out."""
    timing, others = GROUP_MODES[mode]
    if report.get("meta", {}).get("dtype") != _dtype_name(dtype):
        return []
    calls: dict[tuple, dict[str, dict]] = {}
    for row in report.get("results", []):
        if "n" in row and "members" in row:
            key = (row["M"], row["n"], tuple(tuple(member) for member in row["members"]))
            calls.setdefault(key, {})[row["way"]] = row
    points = []
    for (rows, n, members), ways in sorted(calls.items()):
        times = {way: row.get(timing) for way, row in ways.items()}
        if times.get(GROUP_WAY) is None or any(times.get(way) is None for way in others):
            continue
        right = (ways[GROUP_WAY].get("error") or 0.0) < WRONG
        wins = right and times[GROUP_WAY] <= WIN_RATIO * min(times[way] for way in others)
        points.append(GroupPoint(rows, n, members, wins))
    return points


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


@dataclass(frozen=True)
class _Table:
    """Where a kind of table is shipped, which variable names a user's, and how its JSON
    names the GPU it was measured on."""
    kind: str
    directory: Path
    variable: str
    device_of: Callable[[dict], str | None]


def _meta_device(report: dict) -> str | None:
    return report.get("meta", {}).get("device")


DECODE = _Table("layer-bench", MEASURED_DIR, settings.ENV_DECODE_TABLE, _meta_device)
GROUP = _Table("group-bench", GROUPS_DIR, settings.ENV_GROUP_TABLE, _meta_device)
TILE_CONFIGS = _Table("decode-sweep", CONFIGS_DIR, settings.ENV_DECODE_CONFIGS,
                      lambda report: "configs" in report and report.get("device"))


@functools.cache
def reports(table: _Table, override: str | None) -> dict[str, dict]:
    """Device name -> report: the shipped files, then the file the table's variable names
    (`override`), which answers for its device. A file that cannot be read, or is not a JSON
    of the table's kind (no device found in it), is an error naming it."""
    found = {}
    for path, what in [(path, "shipped") for path in sorted(table.directory.glob("*.json"))] + (
            [(Path(override), table.variable)] if override else []):
        try:
            report = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise ValueError(f"{what} {path} is not a readable {table.kind} JSON: "
                             f"{error}") from error
        device = table.device_of(report) if isinstance(report, dict) else None
        if not device:
            raise ValueError(f"{what} {path} is not a {table.kind} JSON (no device)")
        found[device] = report
    return found


def _report(table: _Table, override: str | None, device_name: str) -> dict | None:
    return reports(table, override).get(device_name)


@functools.cache
def _decode_points(override: str | None, device_name: str, dtype: torch.dtype, max_rows: int,
                   mode: str) -> tuple[MeasuredPoint, ...]:
    report = _report(DECODE, override, device_name)
    return tuple(decode_points_from_benchmark(report, dtype, max_rows, mode)) if report else ()


@functools.cache
def _group_points(override: str | None, device_name: str, dtype: torch.dtype,
                  mode: str) -> tuple[GroupPoint, ...]:
    report = _report(GROUP, override, device_name)
    return tuple(group_points_from_benchmark(report, dtype, mode)) if report else ()


@functools.cache
def _swept_points(override: str | None, device_name: str, dtype: torch.dtype,
                  default_fields: tuple) -> tuple[SweptPoint, ...]:
    report = _report(TILE_CONFIGS, override, device_name)
    # Sweeps before the dtype was recorded ran in bf16.
    if report is None or report.get("dtype", "bfloat16") != _dtype_name(dtype):
        return ()
    return tuple(points_from_sweep(report, dict(default_fields)))


def decode_winners(device_name: str, dtype: torch.dtype, rows: int, shape: tuple[int, int, int],
                   max_rows: int, mode: str) -> tuple[str, ...] | None:
    """The fused kernels that won at the measured point covering this call, fastest first
    (empty: chain2 was not beaten), or None when no point covers it."""
    points = _decode_points(settings.current.decode_table, device_name, dtype, max_rows, mode)
    point = smallest_covering(points, rows, shape)
    return point.winners if point is not None else None


def group_kernel_wins(device_name: str, dtype: torch.dtype, rows: int, n: int,
                      members: tuple[tuple[int, int], ...], mode: str) -> bool:
    """Whether the smallest measured group covering this call had the group kernel win; False
    where none covers it."""
    points = _group_points(settings.current.group_table, device_name, dtype, mode)
    point = smallest_covering(points, rows, (n, members))
    return point is not None and point.wins


def measured_fields(device_name: str, dtype: torch.dtype, rows: int,
                    shape: tuple[int, int, int], default_fields: dict,
                    row_block: range) -> dict | None:
    """The fields of the tile config to run for this call, or None for the default config.
    `row_block` holds the row counts that run the same tiles as this call's, whose default
    config has `default_fields`: a point measured in another block chose among other tiles."""
    points = _swept_points(settings.current.decode_configs, device_name, dtype,
                           tuple(sorted(default_fields.items())))
    point = smallest_covering([point for point in points if point.rows in row_block], rows,
                              shape)
    return dict(point.fields) if point is not None and point.fields is not None else None


def measured_devices(table: _Table) -> list[str]:
    """The GPUs `table` (DECODE, GROUP or TILE_CONFIGS) answers for."""
    override = {DECODE: settings.current.decode_table, GROUP: settings.current.group_table,
                TILE_CONFIGS: settings.current.decode_configs}[table]
    return sorted(reports(table, override))
