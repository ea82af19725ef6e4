"""The benchmark tools the dispatch tables come from: shipping a layer-bench run as a table and a
decode sweep as tile configs, and the sweep's correctness check (the timing itself needs a
GPU)."""

import json
from dataclasses import replace

import pytest
import torch
from bench_scripts import load_bench_script
from cur_linear_cases import kernel_device

from curkernels.ops import settings, tables
from curkernels.ops.triton import decode as decode_host


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
    assert set(tables.FUSED_VARIANTS) == {"triton", "cuda"}


def test_a_shipped_sweep_answers_for_its_gpu(tmp_path, monkeypatch):
    """What decode_sweep.py writes, shipped: named by the GPU, no partial file left behind, and
    read back by decode_configs with the same choice, the candidates' overrides on the row
    block's default."""
    sweep = load_bench_script("decode_sweep")
    configs = {"default": sweep.CANDIDATES["default"], "2/sm": {"programs_per_sm": 2}}
    run = tmp_path / "decode_sweep.json"
    run.write_text(json.dumps({
        "device": "Some GPU 80GB", "dtype": "bfloat16", "torch": "x", "ceilings": {},
        "configs": configs, "rows": [{"m": 64, "n": 64, "r": 8, "M": 1, "floor_us": 1.0,
                                      "chain2": 9.0, "errors": {"default": 0.0, "2/sm": 0.0},
                                      "failures": {}, "default": 8.0, "2/sm": 6.0}]}))
    shipped = load_bench_script("bench_report").ship_decode_configs(run, into=tmp_path / "configs")
    assert shipped == tmp_path / "configs" / "Some_GPU_80GB.json"
    assert not list((tmp_path / "configs").glob("*.partial"))
    monkeypatch.setenv(settings.ENV_DECODE_CONFIGS, str(shipped))
    settings.reload()
    default = vars(sweep.config_for("default", 1))
    assert default == vars(decode_host.DEFAULT_DECODE_CONFIG)
    assert tables.measured_fields("Some GPU 80GB", torch.bfloat16, 1, (64, 64, 8),
                                          default, range(1, 17)) == vars(sweep.config_for(
                                              "2/sm", 1))


@pytest.mark.parametrize("M", (3, 20))
def test_sweep_configs_compute_the_layer(monkeypatch, M):
    """Every candidate the sweep times, in the row block it runs in, gives the fp64 result
    (here through the interpreter, on a GPU on the device); the timing run itself refuses to
    start without a GPU."""
    sweep = load_bench_script("decode_sweep")
    for name in sweep.CANDIDATES:
        config = sweep.config_for(name, M)
        assert config == replace(decode_host.DEFAULT_DECODE_CONFIGS[
            decode_host.decode_block_rows(M)], **sweep.CANDIDATES[name])
        error = sweep.relative_error(config, 70, 90, 33, M, torch.float32,
                                     torch.device(kernel_device()))
        assert error < 1e-5, name
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            sweep.main(["--out", "unused"])


def test_a_sweep_candidate_that_fails_is_recorded_and_the_point_goes_on(monkeypatch, capsys):
    """One candidate that cannot launch (its tiles past the GPU's shared memory, say) marks
    that candidate failed at that point; the others are still checked and timed."""
    sweep = load_bench_script("decode_sweep")
    monkeypatch.setattr(sweep, "CANDIDATES", {"default": {}, "huge": {"block_out": 4096}})

    def relative_error(config, *args):
        if config.block_out == 4096:
            raise RuntimeError("out of resources: shared memory")
        return 1e-3
    monkeypatch.setattr(sweep, "relative_error", relative_error)
    monkeypatch.setattr(sweep, "time_graph_us", lambda fn, x, sets, calls, repeats: 5.0)
    monkeypatch.setattr(sweep, "floor_us", lambda *args: 2.0)
    row = sweep.time_point(64, 64, 8, 20, [{}], torch.float32, torch.device("cpu"), {}, 3)
    assert (row["M"], row["default"], row["huge"]) == (20, 5.0, None)
    assert row["errors"] == {"default": 1e-3}
    assert row["failures"] == {"huge": "RuntimeError: out of resources: shared memory"}
    sweep.print_table([row])
    assert "failed" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        sweep.main(["--rows", "1,65"])  # past the kernel's 64 rows
