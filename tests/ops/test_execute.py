"""The eager runner: each dispatch choice is memoized under a key built from the call's own
tensors and CURKERNELS_BACKEND, so the table is consulted once per new situation and never
answers for a stale one."""

import pytest
import torch
from cur_linear_cases import assert_matches_reference, make_case

from curkernels.ops import BackendUnavailableError, cur_linear, dispatch, execute


@pytest.fixture
def consulted(monkeypatch):
    """Every (num_rows, shape, linked) the dispatch table is asked about; a fresh memo."""
    monkeypatch.setattr(execute, "_choices", {})
    asked = []
    original = execute.choose_backend

    def spy(backend, x, num_rows, shape=None, linked=False):
        asked.append((num_rows, shape, linked))
        return original(backend, x, num_rows, shape, linked)

    monkeypatch.setattr(execute, "choose_backend", spy)
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
    limit = dispatch.FUSED_MAX_ROWS
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


def test_the_environment_variable_takes_effect_at_the_next_call(consulted, monkeypatch):
    """CURKERNELS_BACKEND is read on every call, also once 'auto' has been memoized."""
    case = make_case(1, 24, 16, 4, torch.float32)
    _run(case)
    monkeypatch.setenv(dispatch.ENV_BACKEND, "cuda")
    for _ in range(2):  # a named backend that cannot run raises every time, never falls back
        with pytest.raises(BackendUnavailableError, match="'cuda' is unavailable"):
            _run(case)
    monkeypatch.setenv(dispatch.ENV_BACKEND, "fast")
    with pytest.raises(ValueError, match="CURKERNELS_BACKEND"):
        _run(case)
    monkeypatch.setenv(dispatch.ENV_BACKEND, "torch")
    assert_matches_reference(_run(case), case)
    monkeypatch.delenv(dispatch.ENV_BACKEND)
    assert_matches_reference(_run(case), case)
    assert len(consulted) == 5  # auto, cuda twice, fast, torch; auto again is memoized


def test_the_environment_variable_is_seen_through_a_replaced_os_environ(monkeypatch):
    case = make_case(1, 24, 16, 4, torch.float32)
    monkeypatch.setattr("os.environ", {dispatch.ENV_BACKEND: "cuda"})
    with pytest.raises(BackendUnavailableError):
        _run(case)


def test_float64_with_a_named_kernel_backend_raises_every_call(monkeypatch):
    monkeypatch.setattr(execute, "choose_backend", lambda *args, **kwargs: "triton")
    case = make_case(1, 24, 16, 4, torch.float64)
    for _ in range(2):
        with pytest.raises(TypeError, match="float64"):
            _run(case, backend="triton")


def test_the_torch_backend_keeps_leading_dimensions_without_a_copy(monkeypatch):
    seen = []
    monkeypatch.setattr(execute, "_choices", {})
    monkeypatch.setattr(execute, "backend_function",
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


@pytest.fixture
def graphs_pick_triton(monkeypatch):
    monkeypatch.setattr(dispatch, "graph_mode", lambda: False)
    monkeypatch.setattr(dispatch, "graph_decode_backend", lambda *args: "triton")


def test_eager_decode_reserves_the_workspace_cuda_graphs_will_use(graphs_pick_triton):
    pytest.importorskip("triton")
    from curkernels.ops import triton_backend
    for rows in (1, 40):  # batched decode too: the workspace of its row block
        before = execute._graph_reservation("auto", _FakeCudaInput(), rows, (64, 32, 8), False,
                                            "cuda")
        assert before.func is triton_backend.reserve_decode_workspace
        assert before.args == (torch.device("cuda", 0), 8, 8, rows)


@pytest.mark.parametrize("backend, rows, chosen", (
    ("auto", 1, "triton"),   # the eager call makes the workspace itself
    ("cuda", 1, "cuda"),     # a named backend runs in graphs too
    ("auto", 65, "torch"),   # prefill: no decode workspace
))
def test_no_reservation_where_graphs_need_none(graphs_pick_triton, backend, rows, chosen):
    assert execute._graph_reservation(backend, _FakeCudaInput(), rows, (64, 32, 8), False,
                                      chosen) is None


def test_no_reservation_where_graphs_keep_the_chain(monkeypatch):
    monkeypatch.setattr(dispatch, "graph_mode", lambda: False)
    monkeypatch.setattr(dispatch, "graph_decode_backend", lambda *args: "torch")
    assert execute._graph_reservation("auto", _FakeCudaInput(), 1, (64, 32, 8), False,
                                      "cuda") is None


def test_cpu_calls_reserve_nothing():
    case = make_case(1, 24, 16, 4, torch.float32)
    execute._choices.clear()
    _run(case)
    assert all(before is None for _, _, before in execute._choices.values())
