"""The benchmark tools the dispatch tables come from: shipping a layer-bench run as a table and a
decode sweep as tile configs, and the sweep's correctness check (the timing itself needs a
GPU)."""

import json

import pytest
import torch
from bench_scripts import load_bench_script
from cur_linear_cases import kernel_device

from curkernels.ops import decode_configs, decode_table


def test_shipped_table_keeps_every_modes_decode_rows(tmp_path):
    """chain2 and the fused kernels (triton, cuda) at M ≤ 64 (batched decode included); other
    variants and prefill rows stay out; named by the GPU; no partial file left behind."""
    results = [{"M": M, "m": 8, "n": 8, "r": 2, "variant": variant, "graph_us": 1.0,
                "eager_us": 2.0}
               for M in (1, 16, 32, 65)
               for variant in ("dense", "chain2", "triton", "cuda", "module")]
    run = tmp_path / "run.json"
    run.write_text(json.dumps({"meta": {"device": "Some GPU 80GB", "dtype": "bfloat16"},
                               "results": results}))
    shipped = load_bench_script("bench_report").ship_decode_table(run, into=tmp_path)
    assert shipped == tmp_path / "Some_GPU_80GB.json"
    rows = json.loads(shipped.read_text())["results"]
    assert {(row["M"], row["variant"]) for row in rows} == {
        (M, variant) for M in (1, 16, 32) for variant in ("chain2", "triton", "cuda")}
    assert not list(tmp_path.glob("*.partial"))
    assert set(decode_table.FUSED_VARIANTS) == {"triton", "cuda"}


def test_a_shipped_sweep_answers_for_its_gpu(tmp_path, monkeypatch):
    """What decode_sweep.py writes, shipped: named by the GPU, no partial file left behind, and
    read back by decode_configs with the same choice."""
    sweep = load_bench_script("decode_sweep")
    default = vars(sweep.CONFIGS["default"])
    configs = {"default": default, "2/sm": dict(default, programs_per_sm=2)}
    run = tmp_path / "decode_sweep.json"
    run.write_text(json.dumps({
        "device": "Some GPU 80GB", "dtype": "bfloat16", "torch": "x", "ceilings": {},
        "configs": configs, "rows": [{"m": 64, "n": 64, "r": 8, "M": 1, "floor_us": 1.0,
                                      "chain2": 9.0, "errors": {"default": 0.0, "2/sm": 0.0},
                                      "default": 8.0, "2/sm": 6.0}]}))
    shipped = load_bench_script("bench_report").ship_decode_configs(run, into=tmp_path / "configs")
    assert shipped == tmp_path / "configs" / "Some_GPU_80GB.json"
    assert not list((tmp_path / "configs").glob("*.partial"))
    monkeypatch.setenv(decode_configs.ENV_DECODE_CONFIGS, str(shipped))
    assert decode_configs.measured_fields("Some GPU 80GB", torch.bfloat16, 1, (64, 64, 8),
                                          default) == configs["2/sm"]


def test_sweep_configs_compute_the_layer(monkeypatch):
    """Every config the sweep times gives the fp64 result (here through the interpreter, on a
    GPU on the device); the timing run itself refuses to start without a GPU."""
    sweep = load_bench_script("decode_sweep")
    for name, config in sweep.CONFIGS.items():
        error = sweep.relative_error(config, 70, 90, 33, 3, torch.float32,
                                     torch.device(kernel_device()))
        assert error < 1e-5, name
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            sweep.main(["--out", "unused"])
