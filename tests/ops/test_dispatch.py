"""Backend choice: named backends run or raise with the reason; 'auto' follows the table."""

import json

import pytest
import torch
from cur_linear_cases import without_interpreter

from curkernels.ops import cur_linear, dispatch, op, settings
from curkernels.ops.backend_error import BackendUnavailableError


def choose(backend, x, num_rows, shape=(4096, 4096, 256), linked=False, graph=False) -> str:
    """The backend dispatch picks for a call of `num_rows` rows of x's device and dtype through
    a layer of `shape` (m, n, r), eagerly or inside a CUDA graph capture (`graph`)."""
    return dispatch.single_backend(backend, x.device, x.dtype, num_rows, shape, linked, graph)


def test_cpu_auto_is_torch():
    assert choose("auto", torch.randn(2, 8), 2) == "torch"


def test_environment_forces_a_backend(monkeypatch):
    monkeypatch.setenv(settings.ENV_BACKEND, "torch")
    settings.reload()
    assert dispatch.requested_backend("auto") == "torch"
    assert dispatch.requested_backend("triton") == "triton"  # an argument wins over the variable


def test_unknown_backend_names_the_choices(monkeypatch):
    with pytest.raises(ValueError, match="'bogus'"):
        dispatch.requested_backend("bogus")
    monkeypatch.setenv(settings.ENV_BACKEND, "fast")
    settings.reload()
    with pytest.raises(ValueError, match="CURKERNELS_BACKEND"):
        choose("auto", torch.randn(1, 4), 1)


def test_cuda_backend_on_cpu_tensors_says_why():
    with pytest.raises(BackendUnavailableError, match="'cuda' is unavailable"):
        choose("cuda", torch.randn(1, 4), 1)


def test_triton_on_cpu_without_interpreter_says_why(monkeypatch):
    # Not TRITON_INTERPRET itself: Triton reads it too, and kernels run later in this process
    # (under the interpreter) fail after it was switched off and on again.
    without_interpreter(monkeypatch)
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET=1"):
        choose("triton", torch.randn(1, 4), 1)


def test_forced_unavailable_backend_raises_instead_of_falling_back(monkeypatch):
    monkeypatch.setenv(settings.ENV_BACKEND, "cuda")
    settings.reload()
    with pytest.raises(BackendUnavailableError):
        choose("auto", torch.randn(1, 4), 1)


class _FakeCudaTensor:
    """Stands in for a CUDA input: dispatch reads only the device and dtype."""
    device = torch.device("cuda", 0)
    dtype = torch.bfloat16


@pytest.fixture
def all_backends_available(monkeypatch):
    monkeypatch.setattr(dispatch, "unavailable_reason", lambda backend, device: None)


LAYER = (4096, 4096, 256)  # (m, n, r)


@pytest.fixture
def unmeasured_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "A100")


@pytest.fixture
def h100(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")


@pytest.mark.parametrize("num_rows, shape", [(1, LAYER), (4, (14336, 4096, 1024)),
                                             (16, (4096, 14336, 512)), (16, (4096, 4096, 1024)),
                                             ])
def test_eager_decode_on_an_unmeasured_gpu_goes_to_the_cuda_extension(
        num_rows, shape, all_backends_available, unmeasured_gpu, monkeypatch):
    """No table for this GPU: the rules measured on the first H100 run apply."""
    assert choose("auto", _FakeCudaTensor(), num_rows, shape) == "cuda"


@pytest.mark.parametrize("shape", [(14336, 4096, 1024), (4096, 14336, 1024)])
def test_eager_decode_on_an_unmeasured_gpu_at_16_rows_rank_1024_wide_layers_keeps_the_chain(
        shape, all_backends_available, unmeasured_gpu, monkeypatch):
    """Measured on the first H100 run: the CUDA kernel lost to chain2 there (77–89 vs 54–58 µs)."""
    assert choose("auto", _FakeCudaTensor(), 16, shape) == "torch"


@pytest.mark.parametrize("num_rows, shape, expected", [
    (1, (4096, 4096, 256), "cuda"),        # 14.6 vs 47.5 µs eager
    (1, (4096, 14336, 1536), "torch"),     # r = 2048 covers it: 49.0 vs 35.8
    (4, (4096, 4096, 2048), "triton"),     # triton 38.7, cuda 40.0, chain2 45.0
    (16, (4096, 4096, 1024), "torch"),     # 45.1 vs 31.6
    (16, (1024, 4096, 512), "cuda"),       # 26.9 vs 45.4
    (1, (4096, 4096, 4096), "cuda"),       # past every measured rank: the rules above
])
def test_eager_decode_follows_the_h100_measurements(num_rows, shape, expected,
                                                    all_backends_available, h100, monkeypatch):
    """bench/results/NVIDIA_H100_80GB_HBM3.md, eager times of cuda, triton and chain2."""
    monkeypatch.delenv("CURKERNELS_DECODE_TABLE", raising=False)
    settings.reload()
    assert choose("auto", _FakeCudaTensor(), num_rows, shape) == expected


def test_eager_decode_without_the_extension_keeps_the_chain(h100, monkeypatch):
    """Eager Triton (63.9 µs a call, before its launches skipped Triton's binding) did not beat
    chain2 (47.5 µs) there on the H100."""
    monkeypatch.setattr(dispatch, "unavailable_reason",
                        lambda backend, device: "not built" if backend == "cuda" else None)
    assert choose("auto", _FakeCudaTensor(), 1, LAYER) == "torch"


@pytest.mark.parametrize("num_rows", (65, 128, 4096))
@pytest.mark.parametrize("graph", (False, True))
def test_prefill_keeps_the_cublas_chain(num_rows, graph, all_backends_available, monkeypatch,
                                        tmp_path):
    """Past DECODE_MAX_ROWS even a table that has the fused kernels winning is not read."""
    monkeypatch.setenv("CURKERNELS_DECODE_TABLE", str(_batched_table(tmp_path, 4096)))
    settings.reload()
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some GPU")
    assert choose("auto", _FakeCudaTensor(), num_rows, LAYER, graph=graph) == "torch"


def _batched_table(tmp_path, rows: int):
    """A layer-bench report of 'Some GPU' where the Triton kernel beat chain2 at `rows` rows
    (eagerly and in graphs) and the CUDA kernel did not."""
    times = {"chain2": 10.0, "triton": 6.0, "cuda": 12.0}
    report = {"meta": {"device": "Some GPU", "dtype": "bfloat16"}, "results": [
        {"M": rows, "m": 4096, "n": 4096, "r": 256, "variant": variant, "graph_us": us,
         "eager_us": 3 * us} for variant, us in times.items()]}
    path = tmp_path / "batched.json"
    path.write_text(json.dumps(report))
    return path


@pytest.mark.parametrize("graph", (False, True))
@pytest.mark.parametrize("num_rows, measured_rows, expected", [
    (20, 32, "triton"),   # a point at 32 rows covers 17..32
    (32, 32, "triton"),
    (33, 32, "torch"),    # past the measured rows: no verdict, and no rule to fall back on
    (64, 64, "triton"),   # the Triton decode kernel's largest row block
    (17, 16, "torch"),    # the M ≤ 16 rules do not extend past 16 rows
])
def test_batched_decode_follows_a_measured_table_only(graph, num_rows, measured_rows, expected,
                                                      all_backends_available, monkeypatch,
                                                      tmp_path):
    monkeypatch.setenv("CURKERNELS_DECODE_TABLE", str(_batched_table(tmp_path, measured_rows)))
    settings.reload()
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some GPU")
    assert choose("auto", _FakeCudaTensor(), num_rows, LAYER, graph=graph) == expected


@pytest.mark.parametrize("graph", (False, True))
def test_batched_decode_on_the_shipped_tables_keeps_the_chain(graph, all_backends_available,
                                                              h100, monkeypatch):
    """The shipped H100 table has decode points up to 16 rows only: nothing covers 32."""
    monkeypatch.delenv("CURKERNELS_DECODE_TABLE", raising=False)
    settings.reload()
    assert choose("auto", _FakeCudaTensor(), 32, LAYER, graph=graph) == "torch"


def test_graph_decode_keeps_the_chain_where_nothing_was_measured(all_backends_available,
                                                                 monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "A100")
    assert choose("auto", _FakeCudaTensor(), 1, LAYER, graph=True) == "torch"


@pytest.mark.parametrize("shape, linked, expected", [
    ((4096, 4096, 256), False, "triton"),
    ((1024, 4096, 512), False, "triton"),
    ((4096, 14336, 256), False, "triton"),
    ((4096, 14336, 512), False, "torch"),    # tied with chain2
    ((14336, 4096, 256), False, "torch"),    # tied
    ((4096, 4096, 1024), False, "torch"),    # within 3%: not a measured win
    ((4096, 4096, 256), True, "torch"),      # a U stage left: not measured in graphs
])
def test_graph_decode_follows_the_h100_measurements(shape, linked, expected,
                                                     all_backends_available, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name",
                        lambda device=None: "NVIDIA H100 80GB HBM3")
    assert choose("auto", _FakeCudaTensor(), 1, shape, linked, graph=True) == expected
    # nothing measured at 17 rows or more on the H100
    assert choose("auto", _FakeCudaTensor(), 17, shape, linked, graph=True) == "torch"


def test_graph_decode_on_a_gpu_measured_by_the_user(all_backends_available, monkeypatch,
                                                   tmp_path):
    """A GPU the package ships no table for gets the fused kernel once its own layer-bench run is
    named by CURKERNELS_DECODE_TABLE."""
    report = {"meta": {"device": "Some GPU", "dtype": "bfloat16"}, "results": [
        {"M": 1, "m": 4096, "n": 4096, "r": 256, "variant": "chain2", "graph_us": 10.0},
        {"M": 1, "m": 4096, "n": 4096, "r": 256, "variant": "triton", "graph_us": 7.0}]}
    (tmp_path / "some.json").write_text(json.dumps(report))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some GPU")
    assert choose("auto", _FakeCudaTensor(), 1, LAYER, graph=True) == "torch"
    monkeypatch.setenv("CURKERNELS_DECODE_TABLE", str(tmp_path / "some.json"))
    settings.reload()
    assert choose("auto", _FakeCudaTensor(), 1, LAYER, graph=True) == "triton"


@pytest.mark.parametrize("graph", (False, True))
def test_decode_takes_the_fastest_measured_winner_that_can_run(graph, monkeypatch, tmp_path):
    """Both fused kernels beat chain2 at this point (Triton by more): Triton runs; without it,
    the CUDA extension; with neither, the chain."""
    times = {"chain2": 10.0, "triton": 6.0, "cuda": 8.0}
    report = {"meta": {"device": "Some GPU", "dtype": "bfloat16"}, "results": [
        {"M": 1, "m": 4096, "n": 4096, "r": 256, "variant": variant, "graph_us": us,
         "eager_us": 3 * us} for variant, us in times.items()]}
    (tmp_path / "some.json").write_text(json.dumps(report))
    monkeypatch.setenv("CURKERNELS_DECODE_TABLE", str(tmp_path / "some.json"))
    settings.reload()
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some GPU")
    missing = set()
    monkeypatch.setattr(dispatch, "unavailable_reason",
                        lambda backend, device: "missing" if backend in missing else None)
    chosen = []
    for gone in ("", "triton", "cuda"):
        missing.add(gone)
        chosen.append(choose("auto", _FakeCudaTensor(), 1, LAYER, graph=graph))
    assert chosen == ["triton", "cuda", "torch"]


def test_capture_is_asked_about_only_for_cuda_inputs(monkeypatch):
    def fail():
        raise AssertionError("capture queried for a CPU input")
    monkeypatch.setattr(op, "stream_capturing", fail)
    dispatch.choices.clear()
    C, R = torch.randn(6, 3), torch.randn(3, 4)
    torch.testing.assert_close(cur_linear(torch.ones(1, 4), C, None, R), torch.ones(1, 4) @ R.t() @ C.t())
