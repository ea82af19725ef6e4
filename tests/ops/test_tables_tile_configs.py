"""The measured decode tile configs: which config a swept point chooses, which point answers a
call, and what the Triton backend then runs."""

import json

import pytest
import torch

from curkernels.ops import settings, tables
from curkernels.ops.triton import decode as decode_host
from curkernels.ops.triton.decode import DEFAULT_DECODE_CONFIG, DecodeConfig

H100 = "NVIDIA H100 80GB HBM3"
DEFAULT = vars(DEFAULT_DECODE_CONFIG)
TWO_PER_SM = dict(DEFAULT, programs_per_sm=2)
WIDE = dict(DEFAULT, num_warps=8, block_out=64)


def _sweep(rows: list[dict], device="G", **extra) -> dict:
    return {"device": device, "configs": {"base": DEFAULT, "2/sm": TWO_PER_SM, "wide": WIDE},
            "rows": rows, **extra}


def _row(M, m, n, r, base, two, wide, errors=None):
    return {"M": M, "m": m, "n": n, "r": r, "base": base, "2/sm": two, "wide": wide,
            "errors": errors or {"base": 1e-3, "2/sm": 1e-3, "wide": 1e-3}}


def _fields(point):
    return None if point.fields is None else dict(point.fields)


def test_a_point_chooses_the_fastest_config_that_clearly_beats_the_default():
    points = tables.points_from_sweep(_sweep([
        _row(1, 64, 64, 8, 10.0, 8.0, 9.0),     # 2/sm by 20 %
        _row(1, 64, 64, 16, 10.0, 9.6, 9.7),    # 4 %: within noise, the default stays
        _row(1, 64, 64, 32, 10.0, 12.0, 11.0),  # the default is fastest
    ]), DEFAULT)
    assert [_fields(p) for p in points] == [TWO_PER_SM, None, None]


def test_configs_that_were_wrong_or_not_timed_do_not_count():
    points = tables.points_from_sweep(_sweep([
        _row(1, 64, 64, 8, 10.0, 5.0, 8.0, errors={"base": 1e-3, "2/sm": 0.5, "wide": 1e-3}),
        _row(1, 64, 64, 16, 10.0, None, 20.0),
    ]), DEFAULT)
    assert [_fields(p) for p in points] == [WIDE, None]


def test_an_older_sweep_lacks_newer_fields_and_a_newer_one_may_have_unknown_ones():
    """Fields a sweep did not record had their default then; a config with a field this version
    does not know cannot be run."""
    older = {key: value for key, value in TWO_PER_SM.items() if key != "pdl"}
    report = {"device": "G", "rows": [_row(1, 64, 64, 8, 10.0, 8.0, 7.0)],
              "configs": {"base": {k: v for k, v in DEFAULT.items() if k != "pdl"},
                          "2/sm": older, "wide": dict(WIDE, tile_magic=3)}}
    (point,) = tables.points_from_sweep(report, DEFAULT)
    assert _fields(point) == TWO_PER_SM


def _use(tmp_path, monkeypatch, report) -> None:
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps(report))
    monkeypatch.setenv(settings.ENV_DECODE_CONFIGS, str(path))
    settings.reload()


def test_the_smallest_covering_point_answers_in_the_swept_dtype_only(tmp_path, monkeypatch):
    _use(tmp_path, monkeypatch, _sweep([_row(1, 4096, 4096, 256, 10.0, 10.0, 7.0),
                                        _row(16, 4096, 4096, 256, 10.0, 8.0, 10.0),
                                        _row(1, 4096, 4096, 1024, 10.0, 10.0, 10.0)]))

    def fields(rows, shape, dtype=torch.bfloat16, device="G"):
        return tables.measured_fields(device, dtype, rows, shape, DEFAULT,
                                              decode_host.decode_row_block(rows))
    assert fields(1, (4096, 4096, 100)) == WIDE
    assert fields(2, (4096, 4096, 256)) == TWO_PER_SM  # rounds up to M = 16
    assert fields(1, (4096, 4096, 300)) is None        # r = 1024: a tie, the default
    assert fields(1, (4096, 4096, 2048)) is None       # past every swept rank
    assert fields(1, (4096, 4096, 256), torch.float16) is None  # swept in bf16 only
    assert fields(1, (4096, 4096, 256), device="Other GPU") is None


@pytest.mark.parametrize("content", ("{not json", json.dumps({"rows": []})))
def test_a_bad_sweep_file_names_the_variable(tmp_path, monkeypatch, content):
    path = tmp_path / "bad.json"
    path.write_text(content)
    monkeypatch.setenv(settings.ENV_DECODE_CONFIGS, str(path))
    settings.reload()
    with pytest.raises(ValueError, match=settings.ENV_DECODE_CONFIGS):
        tables.measured_fields("G", torch.bfloat16, 1, (64, 64, 8), DEFAULT,
                                       range(1, 17))


def test_the_shipped_h100_sweep(monkeypatch):
    """bench/results/decode_sweep_h100.md: two programs per SM (with 16 KB of C ahead) were
    clearly faster on the wide layers, and not at 4096×4096."""
    monkeypatch.delenv(settings.ENV_DECODE_CONFIGS, raising=False)
    settings.reload()

    def fields(rows, shape):
        return tables.measured_fields(H100, torch.bfloat16, rows, shape, DEFAULT,
                                              decode_host.decode_row_block(rows))
    assert fields(1, (4096, 14336, 512)) == dict(DEFAULT, programs_per_sm=2,
                                                 prefetch_bytes=16384)  # 12.9 vs 14.1 µs
    assert fields(1, (4096, 4096, 256)) is None   # 7.0 µs, the default itself
    assert fields(1, (4096, 4096, 1024)) is None  # 12.9 vs 13.4: under 5 %


def test_swept_fields_override_the_default_of_the_points_row_block(tmp_path, monkeypatch):
    """A sweep records each candidate as overrides; a 32-row point answers calls of 17–32 rows
    with its overrides on the 32-row default, and no call of another row block."""
    _use(tmp_path, monkeypatch, {
        "device": "G", "configs": {"base": {}, "2/sm": {"programs_per_sm": 2}},
        "rows": [{"M": M, "m": 4096, "n": 4096, "r": 256, "base": 10.0, "2/sm": 8.0,
                  "errors": {"base": 1e-3, "2/sm": 1e-3}} for M in (1, 32)]})
    monkeypatch.setattr(decode_host, "_measured_configs", {})
    monkeypatch.setattr(decode_host, "_device_name", lambda index: "G")

    def config(rows):
        return decode_host._measured_config(torch.device("cuda", 0), torch.bfloat16, rows,
                                               (4096, 4096, 256))
    batched = decode_host.DEFAULT_DECODE_CONFIGS[32]
    assert batched != DEFAULT_DECODE_CONFIG
    assert config(20) == config(32) == DecodeConfig(**dict(vars(batched), programs_per_sm=2))
    assert config(1) == DecodeConfig(**TWO_PER_SM)
    # 2–16 rows: only the 1-row point is in their block, and it does not cover them
    assert config(5) is DEFAULT_DECODE_CONFIG
    assert config(40) is decode_host.DEFAULT_DECODE_CONFIGS[64]  # nothing swept at 64 rows
    assert [decode_host.decode_row_block(M) for M in (1, 16, 17, 64)] == [
        range(1, 17), range(1, 17), range(17, 33), range(33, 65)]


def test_the_backend_runs_the_measured_config_on_that_gpu_only(tmp_path, monkeypatch):
    _use(tmp_path, monkeypatch, _sweep([_row(1, 64, 64, 8, 10.0, 10.0, 7.0)]))
    monkeypatch.setattr(decode_host, "_measured_configs", {})
    monkeypatch.setattr(decode_host, "_device_name", lambda index: "G")
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert decode_host._measured_config(cuda, torch.bfloat16, 1, (64, 64, 8)) \
        == DecodeConfig(**WIDE)
    assert decode_host._measured_config(cuda, torch.bfloat16, 1, (64, 64, 16)) \
        is DEFAULT_DECODE_CONFIG
    assert decode_host._measured_config(cpu, torch.bfloat16, 1, (64, 64, 8)) \
        is DEFAULT_DECODE_CONFIG
