"""The measured group table: where one launch for a sibling group won over the other ways a
model could run it, which measured group answers a call, and what the group dispatch then
takes."""

import json

import pytest
import torch
from cur_linear_cases import group_backend

from curkernels.ops import dispatch, settings, tables

QKV = ((4096, 1024), (1024, 384), (1024, 384))
GATE_UP = ((14336, 1536), (14336, 1536))


def _rows(M, members, group, chain, members_time, error=1e-3, timing="graph_us", n=4096):
    """group_bench.py's rows of one group call; the members way is timed eagerly only here."""
    times = {"group": group, "chain": chain, "members": members_time}
    return [{"group": "g", "M": M, "n": n, "members": [list(member) for member in members],
             "way": way, "eager_us": time, "graph_us": time if timing == "graph_us" else None,
             "error": error if way == "group" else 1e-3, "note": ""}
            for way, time in times.items()]


def _report(*row_lists, dtype="bfloat16", device="G"):
    return {"meta": {"device": device, "dtype": dtype},
            "results": [row for rows in row_lists for row in rows]}


def test_the_group_kernel_wins_by_ten_percent_over_every_other_way_of_the_mode():
    report = _report(_rows(1, QKV, 8.0, 20.0, 9.5),    # graph: 0.4× chain; eager: 0.84× members
                     _rows(16, QKV, 9.0, 9.5, 30.0),   # a tie with the chain
                     _rows(32, QKV, 5.0, 20.0, 20.0, error=0.5))  # wrong: never a win
    graph = tables.group_points_from_benchmark(report, torch.bfloat16, "graph")
    eager = tables.group_points_from_benchmark(report, torch.bfloat16, "eager")
    assert [(p.rows, p.wins) for p in graph] == [(1, True), (16, False), (32, False)]
    assert [(p.rows, p.wins) for p in eager] == [(1, True), (16, False), (32, False)]
    assert tables.group_points_from_benchmark(report, torch.float16, "graph") == []


def test_rows_without_a_shape_or_a_time_of_every_way_are_left_out():
    older = [{key: value for key, value in row.items() if key not in ("n", "members")}
             for row in _rows(1, QKV, 8.0, 20.0, 20.0)]
    untimed = _rows(16, QKV, 8.0, None, 20.0)
    report = _report(older, untimed, _rows(32, QKV, 8.0, 20.0, 20.0, timing="eager_us"))
    assert tables.group_points_from_benchmark(report, torch.bfloat16, "graph") == []
    assert [p.rows for p in tables.group_points_from_benchmark(report, torch.bfloat16,
                                                              "eager")] == [32]


def _use(tmp_path, monkeypatch, report) -> None:
    path = tmp_path / "group_bench.json"
    path.write_text(json.dumps(report))
    monkeypatch.setenv(settings.ENV_GROUP_TABLE, str(path))
    settings.reload()


def test_the_smallest_covering_group_of_as_many_members_answers(tmp_path, monkeypatch):
    _use(tmp_path, monkeypatch, _report(_rows(1, QKV, 8.0, 20.0, 20.0),
                                        _rows(16, QKV, 20.0, 20.0, 20.0),
                                        _rows(32, GATE_UP, 8.0, 20.0, 20.0)))

    def wins(rows, members, mode="graph", dtype=torch.bfloat16, device="G", n=4096):
        return tables.group_kernel_wins(device, dtype, rows, n, members, mode)
    assert wins(1, QKV) and wins(1, ((4000, 1000), (1000, 300), (1000, 384)), "eager")
    assert not wins(2, QKV)                       # rounds up to 16 rows, where it tied
    assert not wins(1, ((4096, 1100), (1024, 384), (1024, 384)))  # q's rank past the point
    assert not wins(1, QKV, n=5000)
    assert wins(1, QKV[:2])                       # two members: gate/up at 32 rows covers
    assert not wins(1, ((16384, 64), (64, 64)))   # wider than gate/up
    assert wins(20, GATE_UP) and not wins(40, GATE_UP)
    assert not wins(1, QKV, dtype=torch.float16) and not wins(1, QKV, device="Other GPU")
    assert "G" in tables.measured_devices(tables.GROUP)


@pytest.mark.parametrize("content", ("{not json", json.dumps({"results": []})))
def test_a_bad_group_table_names_the_variable(tmp_path, monkeypatch, content):
    path = tmp_path / "bad.json"
    path.write_text(content)
    monkeypatch.setenv(settings.ENV_GROUP_TABLE, str(path))
    settings.reload()
    with pytest.raises(ValueError, match=settings.ENV_GROUP_TABLE):
        tables.group_kernel_wins("G", torch.bfloat16, 1, 4096, QKV, "graph")


class _FakeCudaInput:
    """Stands in for a CUDA input: the rule reads device, dtype, is_cuda and the last dim."""
    def __init__(self, dtype=torch.bfloat16, n=4096):
        self.device, self.dtype, self.is_cuda, self.shape = (torch.device("cuda", 0), dtype,
                                                             True, (1, n))


def test_auto_takes_the_group_kernel_where_the_gpus_table_has_it_win(tmp_path, monkeypatch):
    """In graphs the group kernel beat the shared chain at 1 row; eagerly it did not beat
    the members' own launches there: each mode follows its own measurement."""
    _use(tmp_path, monkeypatch, _report(_rows(1, QKV, 8.0, 20.0, 8.5)))
    monkeypatch.delenv("CURKERNELS_BACKEND", raising=False)
    settings.reload()
    dispatch.group_choices.clear()
    monkeypatch.setattr(dispatch, "unavailable_reason", lambda backend, device: None)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "G")
    x = _FakeCudaInput()
    assert group_backend(x, 1, QKV, graph=True) == "triton"
    assert group_backend(x, 1, QKV, graph=False) == "torch"
    assert group_backend(x, 2, QKV, graph=True) == "torch"  # past every measured row count
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Unmeasured GPU")
    dispatch.group_choices.clear()
    assert group_backend(x, 1, QKV, graph=True) == "torch"
