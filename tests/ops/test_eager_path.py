"""The eager path: each dispatch choice is memoized under a key built from the call's own
tensors, so the table is consulted once per new situation and never answers for a stale one;
the environment is read once (settings.reload reads it again)."""

import inspect
import sys
import types

import pytest
import torch
from cur_linear_cases import assert_matches_reference, make_case

from curkernels.nn import CURLinear
from curkernels.ops import BackendUnavailableError, cur_linear, dispatch, settings
from curkernels.ops.tables import DECODE_MAX_ROWS


@pytest.fixture
def consulted(monkeypatch):
    """Every (num_rows, shape, linked) the dispatch table is asked about; a fresh memo."""
    dispatch.choices.clear()
    asked = []
    original = dispatch.single_backend

    def spy(backend, device, dtype, num_rows, shape, linked, capturing):
        asked.append((num_rows, shape, linked))
        return original(backend, device, dtype, num_rows, shape, linked, capturing)

    monkeypatch.setattr(dispatch, "single_backend", spy)
    return asked


def _run(case, x=None, **kwargs):
    return cur_linear(case["x"] if x is None else x, case["C"], case["U"], case["R"],
                      case["bias"], rows=case["rows"], **kwargs)


def test_a_repeated_call_consults_the_table_once(consulted):
    case = make_case(2, 24, 16, 4, torch.float32, link="diagonal")
    for _ in range(3):
        assert_matches_reference(_run(case), case)
    assert consulted == [(2, (16, 24, 4), True)]


def test_row_counts_are_told_apart_up_to_the_fused_limit_only(consulted):
    case = make_case(1, 24, 16, 4, torch.float32)
    limit = DECODE_MAX_ROWS
    for rows in (1, 2, 16, 17, limit, limit + 1, 100, 4096):
        _run(case, x=torch.randn(rows, 24))
    assert [asked[0] for asked in consulted] == [1, 2, 16, 17, limit, limit + 1]


def test_another_layer_shape_dtype_or_link_is_a_new_choice(consulted):
    case = make_case(1, 24, 16, 4, torch.float32)
    _run(case)
    wider = make_case(1, 24, 32, 4, torch.float32)
    _run(wider)
    linked = make_case(1, 24, 16, 4, torch.float32, link="full")
    _run(linked)
    double = make_case(1, 24, 16, 4, torch.float64)
    _run(double)
    assert [(shape, link) for _, shape, link in consulted] == [
        ((16, 24, 4), False), ((32, 24, 4), False), ((16, 24, 4), True), ((16, 24, 4), False)]


def test_a_settings_reload_takes_effect_at_the_next_call(consulted, monkeypatch):
    """CURKERNELS_BACKEND read again by settings.reload counts from the next call, also once
    'auto' has been memoized."""
    case = make_case(1, 24, 16, 4, torch.float32)
    _run(case)
    monkeypatch.setenv(settings.ENV_BACKEND, "cuda")
    settings.reload()
    for _ in range(2):  # a named backend that cannot run raises every time, never falls back
        with pytest.raises(BackendUnavailableError, match="'cuda' is unavailable"):
            _run(case)
    monkeypatch.setenv(settings.ENV_BACKEND, "fast")
    settings.reload()
    with pytest.raises(ValueError, match="CURKERNELS_BACKEND"):
        _run(case)
    monkeypatch.setenv(settings.ENV_BACKEND, "torch")
    settings.reload()
    assert_matches_reference(_run(case), case)
    monkeypatch.delenv(settings.ENV_BACKEND)
    settings.reload()
    assert_matches_reference(_run(case), case)
    assert len(consulted) == 6  # auto, cuda twice, fast, torch, auto: a reload forgets choices


def test_the_environment_is_not_read_per_call(consulted, monkeypatch):
    """Settings are read once: a variable set afterwards changes nothing until a reload."""
    case = make_case(1, 24, 16, 4, torch.float32)
    _run(case)
    monkeypatch.setenv(settings.ENV_BACKEND, "cuda")
    assert_matches_reference(_run(case), case)
    assert len(consulted) == 1
    settings.reload()
    with pytest.raises(BackendUnavailableError):
        _run(case)


def test_float64_with_a_named_kernel_backend_raises_every_call(monkeypatch):
    monkeypatch.setattr(dispatch, "unavailable_reason", lambda backend, device: None)
    case = make_case(1, 24, 16, 4, torch.float64)
    for _ in range(2):
        with pytest.raises(TypeError, match="float64"):
            _run(case, backend="triton")


def test_the_torch_backend_keeps_leading_dimensions_without_a_copy(monkeypatch):
    seen = []
    dispatch.choices.clear()
    monkeypatch.setattr(dispatch, "backend_function",
                        lambda name: lambda x, *factors: seen.append(x) or torch.zeros(2, 3, 16))
    case = make_case(6, 24, 16, 4, torch.float32)
    x = case["x"].reshape(2, 3, 24)
    assert _run(case, x=x, backend="torch").shape == (2, 3, 16)
    assert seen[0] is x


@pytest.mark.parametrize("make_x, error, message", [
    (lambda: torch.randn(2, 23), ValueError, "24 features"),
    (lambda: torch.tensor(1.0), ValueError, "24 features"),
    (lambda: torch.randn(2, 24, dtype=torch.float64), TypeError, "dtype"),
])
def test_the_registered_op_checks_x_against_the_factors(make_x, error, message):
    """torch.ops.curkernels.cur_linear called directly (as compiled graphs call it) gets the
    same clear error as the Python op: a kernel must never read past x."""
    case = make_case(1, 24, 16, 4, torch.float32)
    with pytest.raises(error, match=message):
        torch.ops.curkernels.cur_linear(make_x(), case["C"], None, case["R"], None, None,
                                        "auto")


class _FakeCudaInput:
    is_cuda = True
    device = torch.device("cuda", 0)
    dtype = torch.bfloat16


def _reservation(backend, rows, chosen):
    return dispatch._graph_reservation(backend, _FakeCudaInput.device, _FakeCudaInput.dtype,
                                       rows, (64, 32, 8), False, False, chosen)


@pytest.fixture
def graphs_pick_triton(monkeypatch):
    monkeypatch.setattr(dispatch, "_graph_decode_backend", lambda *args: "triton")


def test_eager_decode_reserves_the_workspace_cuda_graphs_will_use(graphs_pick_triton):
    pytest.importorskip("triton")
    from curkernels.ops.triton import workspace
    reserved = workspace.reserved_workspaces(torch.device("cuda", 0), 8, 8)
    for rows, block in ((1, 16), (40, 64)):  # batched decode too: the workspace of its row block
        before = _reservation("auto", rows, "cuda")
        assert before.func == reserved.get  # the layer's reservation: no key built per call
        assert before.args == (rows, block)


@pytest.mark.parametrize("backend, rows, chosen", (
    ("auto", 1, "triton"),   # the eager call makes the workspace itself
    ("cuda", 1, "cuda"),     # a named backend runs in graphs too
    ("auto", 65, "torch"),   # prefill: no decode workspace
))
def test_no_reservation_where_graphs_need_none(graphs_pick_triton, backend, rows, chosen):
    assert _reservation(backend, rows, chosen) is None


def test_no_reservation_where_graphs_keep_the_chain(monkeypatch):
    monkeypatch.setattr(dispatch, "_graph_decode_backend", lambda *args: "torch")
    assert _reservation("auto", 1, "cuda") is None


def test_cpu_calls_reserve_nothing():
    case = make_case(1, 24, 16, 4, torch.float32)
    dispatch.choices.clear()
    _run(case)
    assert all(before is None for _, _, before in dispatch.choices.values())


def test_the_eager_cuda_extension_path_is_a_few_python_frames(monkeypatch):
    """From CURLinear.forward to the CUDA extension's launch (stubbed: no GPU here) at most 8
    Python functions run once the choice is memoized, and none reads the environment or asks a
    device anything: the capture query of a CUDA input is a C function, no Python frame."""
    output = torch.zeros(1, 16)
    binding = types.ModuleType("curkernels.ops.cuda")
    binding.cur_linear_cuda = lambda x, C, U, R, bias, rows: output
    monkeypatch.setitem(sys.modules, "curkernels.ops.cuda", binding)
    monkeypatch.setattr(dispatch, "unavailable_reason", lambda backend, device: None)
    dispatch.choices.clear()
    layer = CURLinear(torch.randn(16, 4), None, torch.randn(4, 24), trainable=(), backend="cuda")
    x = torch.randn(1, 24)
    assert layer(x) is output  # memoizes the choice
    entered, depth = [], {}

    def stub(x, C, U, R, bias, rows):
        depth["stub"] = len(inspect.stack())
        return output

    def profile(frame, event, arg):
        if event == "call" and (entered or frame.f_code is CURLinear.forward.__code__):
            entered.append(frame.f_code.co_name)

    binding.cur_linear_cuda = stub
    dispatch.choices.clear()
    layer(x)
    base = len(inspect.stack())
    for grad in (True, False):
        entered.clear()
        with torch.set_grad_enabled(grad):
            sys.setprofile(profile)
            try:
                assert layer(x) is output
            finally:
                sys.setprofile(None)
        frames = entered[:entered.index("stub")]
        assert frames[0] == "forward" and len(frames) <= 8, frames
        assert not {"get", "getenv", "get_device_name", "current_device",
                    "is_current_stream_capturing"} & set(frames), frames
    assert depth["stub"] - base <= 8
    if torch.backends.cuda.is_built():
        assert inspect.isbuiltin(dispatch.stream_capturing)
