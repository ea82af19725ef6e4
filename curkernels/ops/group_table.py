"""Where one launch for a sibling group (ops/triton_group.py) beats the other ways, per GPU.

`bench/group_bench.py` times sibling groups of the Llama-3.1-8B shapes (q/k/v and gate/up at
keep 0.5, q/k at CURing's rank) every way a model can run them, eagerly and as CUDA-graph
replays over cold weights, and writes group_bench.json. The package ships those runs
(`measured/groups/<gpu>.json`); CURKERNELS_GROUP_TABLE names another, which then answers for
the GPU it was measured on.

A call of a group (M rows, n input features, each member's outputs m_i and rank r_i) is
answered by the smallest measured group of as many members that covers it (M' ≥ M, n' ≥ n,
m_i' ≥ m_i and r_i' ≥ r_i member by member; smallest by M', then total rank, then weight
area), the rule decode_table.py follows for one layer. The group kernel wins there when it took
at most WIN_RATIO of the time of every other way the mode could run instead: in CUDA graphs
(and torch.compile) the shared cuBLAS chain; eagerly the shared chain or each member's own
`cur_linear`. Where nothing covers the call, nothing was measured: the other ways run.
"""

import functools
import os
from dataclasses import dataclass

import torch

from .decode_table import MEASURED_DIR, WIN_RATIO, WRONG, measurements_by_device

ENV_GROUP_TABLE = "CURKERNELS_GROUP_TABLE"
GROUPS_DIR = MEASURED_DIR / "groups"
GROUP_WAY = "group"
# mode -> (the timing it compares, the ways that run when the group kernel does not)
MODES = {"graph": ("graph_us", ("chain",)), "eager": ("eager_us", ("chain", "members"))}


@dataclass(frozen=True)
class GroupPoint:
    """A measured group call: M rows into members of (outputs, rank) reading n features."""
    rows: int
    n: int
    members: tuple[tuple[int, int], ...]
    wins: bool

    def covers(self, rows: int, n: int, members: tuple[tuple[int, int], ...]) -> bool:
        return (len(members) == len(self.members) and self.rows >= rows and self.n >= n
                and all(m_ >= m and r_ >= r
                        for (m_, r_), (m, r) in zip(self.members, members, strict=True)))

    def size(self) -> tuple[int, int, int]:
        return (self.rows, sum(r for _, r in self.members),
                self.n * sum(m for m, _ in self.members))


def points_from_benchmark(report: dict, dtype: torch.dtype, mode: str) -> list[GroupPoint]:
    """The measured groups of a group-bench report in `dtype` with a `mode` time for the
    group kernel and for every other way of that mode. Rows without the group's shape (runs
    before it was recorded) are left out."""
    timing, others = MODES[mode]
    if report.get("meta", {}).get("dtype") != str(dtype).removeprefix("torch."):
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


@functools.cache
def _reports(override: str | None) -> dict[str, dict]:
    """Device name -> group-bench report: the shipped files, then CURKERNELS_GROUP_TABLE's."""
    return measurements_by_device(sorted(GROUPS_DIR.glob("*.json")), override, ENV_GROUP_TABLE,
                                  "group-bench",
                                  lambda report: report.get("meta", {}).get("device"))


@functools.cache
def _points(override: str | None, device_name: str, dtype: torch.dtype,
            mode: str) -> tuple[GroupPoint, ...]:
    report = _reports(override).get(device_name)
    return tuple(points_from_benchmark(report, dtype, mode)) if report else ()


def group_kernel_wins(device_name: str, dtype: torch.dtype, rows: int, n: int,
                      members: tuple[tuple[int, int], ...], mode: str) -> bool:
    """Whether the smallest measured group covering this call had the group kernel win (see
    the module docstring); False where none covers it."""
    covering = [point for point in _points(os.environ.get(ENV_GROUP_TABLE) or None,
                                           device_name, dtype, mode)
                if point.covers(rows, n, members)]
    return min(covering, key=GroupPoint.size).wins if covering else False


def measured_devices() -> list[str]:
    return sorted(_reports(os.environ.get(ENV_GROUP_TABLE) or None))
