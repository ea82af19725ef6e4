"""Backend choice: named backends run or raise with the reason; 'auto' follows the table."""

import json

import pytest
import torch

from curkernels.ops import backends, dispatch
from curkernels.ops.errors import BackendUnavailableError


def test_cpu_auto_is_torch():
    assert dispatch.choose_backend("auto", torch.randn(2, 8), 2) == "torch"


def test_environment_forces_a_backend(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_BACKEND, "torch")
    assert dispatch.requested_backend("auto") == "torch"
    assert dispatch.requested_backend("triton") == "triton"  # an argument wins over the variable


def test_unknown_backend_names_the_choices(monkeypatch):
    with pytest.raises(ValueError, match="'bogus'"):
        dispatch.requested_backend("bogus")
    monkeypatch.setenv(dispatch.ENV_BACKEND, "fast")
    with pytest.raises(ValueError, match="CURKERNELS_BACKEND"):
        dispatch.choose_backend("auto", torch.randn(1, 4), 1)


def test_cuda_backend_on_cpu_tensors_says_why():
    with pytest.raises(BackendUnavailableError, match="'cuda' is unavailable"):
        dispatch.choose_backend("cuda", torch.randn(1, 4), 1)


def test_triton_on_cpu_without_interpreter_says_why(monkeypatch):
    # Not TRITON_INTERPRET itself: Triton reads it too, and kernels run later in this process
    # (under the interpreter) fail after it was switched off and on again.
    monkeypatch.setattr(backends, "triton_interpreting", lambda: False)
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET=1"):
        dispatch.choose_backend("triton", torch.randn(1, 4), 1)


def test_forced_unavailable_backend_raises_instead_of_falling_back(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_BACKEND, "cuda")
    with pytest.raises(BackendUnavailableError):
        dispatch.choose_backend("auto", torch.randn(1, 4), 1)


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
                                             (3, None)])
def test_eager_decode_on_an_unmeasured_gpu_goes_to_the_cuda_extension(
        num_rows, shape, all_backends_available, unmeasured_gpu, monkeypatch):
    """No table for this GPU: the rules measured on the first H100 run apply."""
    monkeypatch.setattr(dispatch, "graph_mode", lambda: False)
    assert dispatch.choose_backend("auto", _FakeCudaTensor(), num_rows, shape) == "cuda"


@pytest.mark.parametrize("shape", [(14336, 4096, 1024), (4096, 14336, 1024)])
def test_eager_decode_on_an_unmeasured_gpu_at_16_rows_rank_1024_wide_layers_keeps_the_chain(
        shape, all_backends_available, unmeasured_gpu, monkeypatch):
    """Measured on the first H100 run: the CUDA kernel lost to chain2 there (77–89 vs 54–58 µs)."""
    monkeypatch.setattr(dispatch, "graph_mode", lambda: False)
    assert dispatch.choose_backend("auto", _FakeCudaTensor(), 16, shape) == "torch"


@pytest.mark.parametrize("num_rows, shape, expected", [
    (1, (4096, 4096, 256), "cuda"),        # 14.6 vs 47.5 µs eager
    (1, (4096, 14336, 1536), "torch"),     # r = 2048 covers it: 49.0 vs 35.8
    (4, (4096, 4096, 2048), "triton"),     # triton 38.7, cuda 40.0, chain2 45.0
    (16, (4096, 4096, 1024), "torch"),     # 45.1 vs 31.6
    (16, (1024, 4096, 512), "cuda"),       # 26.9 vs 45.4
    (1, (4096, 4096, 4096), "cuda"),       # past every measured rank: the rules above
    (3, None, "cuda"),                     # shape unknown: the rules above
])
def test_eager_decode_follows_the_h100_measurements(num_rows, shape, expected,
                                                    all_backends_available, h100, monkeypatch):
    """bench/results/NVIDIA_H100_80GB_HBM3.md, eager times of cuda, triton and chain2."""
    monkeypatch.setattr(dispatch, "graph_mode", lambda: False)
    monkeypatch.delenv("CURKERNELS_DECODE_TABLE", raising=False)
    assert dispatch.choose_backend("auto", _FakeCudaTensor(), num_rows, shape) == expected


def test_eager_decode_without_the_extension_keeps_the_chain(h100, monkeypatch):
    """Eager Triton (63.9 µs a call, before its launches skipped Triton's binding) did not beat
    chain2 (47.5 µs) there on the H100."""
    monkeypatch.setattr(dispatch, "graph_mode", lambda: False)
    monkeypatch.setattr(dispatch, "unavailable_reason",
                        lambda backend, device: "not built" if backend == "cuda" else None)
    assert dispatch.choose_backend("auto", _FakeCudaTensor(), 1, LAYER) == "torch"


@pytest.mark.parametrize("num_rows", (65, 128, 4096))
@pytest.mark.parametrize("graph", (False, True))
def test_prefill_keeps_the_cublas_chain(num_rows, graph, all_backends_available, monkeypatch,
                                        tmp_path):
    """Past FUSED_MAX_ROWS even a table that has the fused kernels winning is not read."""
    monkeypatch.setenv("CURKERNELS_DECODE_TABLE", str(_batched_table(tmp_path, 4096)))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some GPU")
    monkeypatch.setattr(dispatch, "graph_mode", lambda: graph)
    assert dispatch.choose_backend("auto", _FakeCudaTensor(), num_rows, LAYER) == "torch"


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
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some GPU")
    monkeypatch.setattr(dispatch, "graph_mode", lambda: graph)
    assert dispatch.choose_backend("auto", _FakeCudaTensor(), num_rows, LAYER) == expected


@pytest.mark.parametrize("graph", (False, True))
def test_batched_decode_on_the_shipped_tables_keeps_the_chain(graph, all_backends_available,
                                                              h100, monkeypatch):
    """The shipped H100 table has decode points up to 16 rows only: nothing covers 32."""
    monkeypatch.delenv("CURKERNELS_DECODE_TABLE", raising=False)
    monkeypatch.setattr(dispatch, "graph_mode", lambda: graph)
    assert dispatch.choose_backend("auto", _FakeCudaTensor(), 32, LAYER) == "torch"


def test_graph_decode_keeps_the_chain_where_nothing_was_measured(all_backends_available,
                                                                 monkeypatch):
    monkeypatch.setattr(dispatch, "graph_mode", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "A100")
    assert dispatch.choose_backend("auto", _FakeCudaTensor(), 1, LAYER) == "torch"


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
    monkeypatch.setattr(dispatch, "graph_mode", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name",
                        lambda device=None: "NVIDIA H100 80GB HBM3")
    assert dispatch.choose_backend("auto", _FakeCudaTensor(), 1, shape, linked) == expected
    # nothing measured at 17 rows or more on the H100
    assert dispatch.choose_backend("auto", _FakeCudaTensor(), 17, shape, linked) == "torch"


def test_graph_decode_on_a_gpu_measured_by_the_user(all_backends_available, monkeypatch,
                                                   tmp_path):
    """A GPU the package ships no table for gets the fused kernel once its own layer-bench run is
    named by CURKERNELS_DECODE_TABLE."""
    report = {"meta": {"device": "Some GPU", "dtype": "bfloat16"}, "results": [
        {"M": 1, "m": 4096, "n": 4096, "r": 256, "variant": "chain2", "graph_us": 10.0},
        {"M": 1, "m": 4096, "n": 4096, "r": 256, "variant": "triton", "graph_us": 7.0}]}
    (tmp_path / "some.json").write_text(json.dumps(report))
    monkeypatch.setattr(dispatch, "graph_mode", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some GPU")
    assert dispatch.choose_backend("auto", _FakeCudaTensor(), 1, LAYER) == "torch"
    monkeypatch.setenv("CURKERNELS_DECODE_TABLE", str(tmp_path / "some.json"))
    assert dispatch.choose_backend("auto", _FakeCudaTensor(), 1, LAYER) == "triton"


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
    monkeypatch.setattr(dispatch, "graph_mode", lambda: graph)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some GPU")
    missing = set()
    monkeypatch.setattr(dispatch, "unavailable_reason",
                        lambda backend, device: "missing" if backend in missing else None)
    chosen = []
    for gone in ("", "triton", "cuda"):
        missing.add(gone)
        chosen.append(dispatch.choose_backend("auto", _FakeCudaTensor(), 1, LAYER))
    assert chosen == ["triton", "cuda", "torch"]


class _FakeCudaInput(_FakeCudaTensor):
    is_cuda = True


def _key(x, num_rows):
    return dispatch.choice_key("auto", x, x.device, x.dtype, num_rows, *LAYER, False)


def test_choice_key_tells_cuda_graph_capture_apart(monkeypatch):
    monkeypatch.setattr(dispatch, "graph_mode", lambda: False)
    eager = _key(_FakeCudaInput(), 1)
    monkeypatch.setattr(dispatch, "graph_mode", lambda: True)
    assert _key(_FakeCudaInput(), 1) != eager
    assert _key(_FakeCudaInput(), 100) == _key(_FakeCudaInput(), 65)  # prefill: no capture query
    assert _key(_FakeCudaInput(), 32) != _key(_FakeCudaInput(), 17)  # batched decode


def test_choice_key_asks_about_capture_only_for_cuda_inputs(monkeypatch):
    def fail():
        raise AssertionError("capture queried for a CPU input")
    monkeypatch.setattr(dispatch, "graph_mode", fail)
    _key(torch.randn(1, 4), 1)


def test_choice_key_reads_the_environment_variable(monkeypatch):
    x = torch.randn(1, 4)
    monkeypatch.delenv(dispatch.ENV_BACKEND, raising=False)
    unset = _key(x, 1)
    monkeypatch.setenv(dispatch.ENV_BACKEND, "torch")
    forced = _key(x, 1)
    monkeypatch.setenv(dispatch.ENV_BACKEND, "cuda")
    assert len({unset, forced, _key(x, 1)}) == 3
