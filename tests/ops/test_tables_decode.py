"""The measured decode tables: which benchmark points count, which point answers, and which
fused kernels won there."""

import json

import pytest
import torch

from curkernels.ops import settings, tables

H100 = "NVIDIA H100 80GB HBM3"


def _report(device: str, timings: dict[tuple, tuple[float, float]], dtype: str = "bfloat16"):
    """A layer-bench JSON: (M, m, n, r) -> (chain2 µs, triton µs) in CUDA graphs."""
    results = []
    for (M, m, n, r), (chain2, triton) in timings.items():
        results += [{"M": M, "m": m, "n": n, "r": r, "variant": "chain2", "graph_us": chain2},
                    {"M": M, "m": m, "n": n, "r": r, "variant": "triton", "graph_us": triton},
                    {"M": M, "m": m, "n": n, "r": r, "variant": "dense", "graph_us": 1.0}]
    return {"meta": {"device": device, "dtype": dtype}, "results": results}


def _use(tmp_path, monkeypatch, report) -> None:
    path = tmp_path / "table.json"
    path.write_text(json.dumps(report))
    monkeypatch.setenv(settings.ENV_DECODE_TABLE, str(path))
    settings.reload()


def _wins(device, rows, shape, dtype=torch.bfloat16):
    """Whether the Triton kernel won in CUDA graphs where the call falls."""
    winners = tables.decode_winners(device, dtype, rows, shape, 16, "graph")
    return winners is not None and "triton" in winners


def test_only_clear_wins_count():
    report = _report("G", {(1, 64, 64, 8): (10.0, 9.0), (1, 64, 64, 16): (10.0, 9.5),
                           (1, 64, 64, 32): (10.0, 12.0)})
    points = tables.decode_points_from_benchmark(report, torch.bfloat16, 16)
    assert [p.winners for p in points] == [("triton",), (), ()]  # 0.9, 0.95 (a tie), 1.2


def test_prefill_rows_other_dtypes_and_half_measured_points_are_left_out():
    report = _report("G", {(1, 64, 64, 8): (10.0, 5.0), (32, 64, 64, 8): (10.0, 5.0)})
    report["results"].append({"M": 4, "m": 64, "n": 64, "r": 8, "variant": "chain2",
                              "graph_us": 3.0})  # no fused time at this point
    assert [p.rows for p in tables.decode_points_from_benchmark(report, torch.bfloat16, 16)] == [1]
    assert tables.decode_points_from_benchmark(report, torch.float16, 16) == []


def test_the_smallest_covering_point_answers(tmp_path, monkeypatch):
    _use(tmp_path, monkeypatch, _report("G", {
        (1, 4096, 4096, 256): (10.0, 7.0), (1, 4096, 4096, 1024): (14.0, 14.0),
        (4, 4096, 4096, 256): (10.0, 11.0), (1, 14336, 4096, 256): (12.0, 8.0)}))
    assert _wins("G", 1, (4096, 4096, 100))           # rounds up to r = 256: a win
    assert not _wins("G", 1, (4096, 4096, 300))       # rounds up to r = 1024: a tie
    assert not _wins("G", 2, (4096, 4096, 256))       # rounds up to M = 4: a loss
    assert _wins("G", 1, (8192, 4096, 256))           # only 14336×4096 covers it
    assert not _wins("G", 1, (4096, 4096, 2048))      # past every measured rank
    assert not _wins("G", 5, (4096, 4096, 256))       # past every measured M
    assert not _wins("G", 1, (4096, 4096, 256), torch.float16)  # measured in bf16 only
    assert not _wins("Other GPU", 1, (4096, 4096, 256))


def test_the_shipped_h100_table_matches_the_measured_winners(monkeypatch):
    """bench/results/NVIDIA_H100_80GB_HBM3.md: the fused kernel won up to r = 512 on the
    4096-output shapes, and at r = 256 on 4096×14336; ties at r = 1024 and 14336 outputs."""
    monkeypatch.delenv(settings.ENV_DECODE_TABLE, raising=False)
    settings.reload()
    assert H100 in tables.measured_devices(tables.DECODE)
    for rows in (1, 4, 16):
        assert _wins(H100, rows, (4096, 4096, 512)) and _wins(H100, rows, (1024, 4096, 384))
        assert _wins(H100, rows, (4096, 14336, 256))
        assert not _wins(H100, rows, (4096, 14336, 512))
        assert not _wins(H100, rows, (14336, 4096, 256))
        assert not _wins(H100, rows, (4096, 4096, 1024))


@pytest.mark.parametrize("content", ("{not json", json.dumps({"results": []})))
def test_a_bad_table_file_names_the_variable(tmp_path, monkeypatch, content):
    path = tmp_path / "bad.json"
    path.write_text(content)
    monkeypatch.setenv(settings.ENV_DECODE_TABLE, str(path))
    settings.reload()
    with pytest.raises(ValueError, match=settings.ENV_DECODE_TABLE):
        _wins(H100, 1, (4096, 4096, 256))


def test_each_mode_ranks_the_fused_kernels_by_its_own_timing(tmp_path, monkeypatch):
    """Eager calls are decided by eager times (host overhead included), graphs by replay times;
    at a point both kernels may win, fastest first."""
    results = []
    for r, chain2, cuda, triton in ((256, (10.0, 40.0), (99.0, 15.0), (1.0, 20.0)),
                                    (1024, (10.0, 30.0), (99.0, 45.0), (1.0, 99.0)),
                                    (4096, (10.0, 40.0), (8.0, 30.0), (12.0, 20.0))):
        for variant, (graph_us, eager_us) in (("chain2", chain2), ("cuda", cuda),
                                              ("triton", triton)):
            results.append({"M": 1, "m": 64, "n": 64, "r": r, "variant": variant,
                            "graph_us": graph_us, "eager_us": eager_us})
    _use(tmp_path, monkeypatch, {"meta": {"device": "G", "dtype": "bfloat16"},
                                 "results": results})

    def winners(r, mode):
        return tables.decode_winners("G", torch.bfloat16, 1, (64, 64, r), 16, mode)

    assert winners(100, "eager") == ("cuda", "triton") and winners(100, "graph") == ("triton",)
    assert winners(1024, "eager") == () and winners(1024, "graph") == ("triton",)
    assert winners(4096, "eager") == ("triton", "cuda") and winners(4096, "graph") == ("cuda",)
    assert winners(8192, "eager") is None and winners(8192, "graph") is None  # past the table
    assert not _wins("G", 1, (64, 64, 8192))
