"""The Triton backend's entry point: routing by M and degenerate shapes."""

import pytest
import torch
from cur_linear_cases import assert_matches_reference, kernel_device, make_case, without_interpreter

from curkernels.ops import cur_linear, settings
from curkernels.ops.backend_error import BackendUnavailableError
from curkernels.ops.triton import backend, prefill
from curkernels.ops.triton import decode as decode_host
from curkernels.ops.triton.backend import cur_linear_triton

DEVICE = kernel_device()


@pytest.mark.parametrize("M,kernel", ((16, "cur_linear_decode"), (17, "cur_linear_decode"),
                                      (64, "cur_linear_decode"), (65, "cur_linear_prefill")))
def test_rows_pick_the_kernel(M, kernel, monkeypatch):
    called = []
    original = getattr(backend, kernel)
    monkeypatch.setattr(backend, kernel, lambda *args, **kwargs: called.append(M)
                        or original(*args, **kwargs))
    case = make_case(M, 40, 24, 5, torch.float32, device=DEVICE)
    y = cur_linear_triton(case["x"], case["C"], None, case["R"], case["bias"], None)
    assert called == [M]
    assert_matches_reference(y, case)


@pytest.mark.parametrize("M", (1, 20))
def test_empty_dimensions(M):
    case = make_case(M, 0, 6, 3, torch.float32, device=DEVICE)
    y = cur_linear_triton(case["x"], case["C"], None, case["R"], case["bias"], None)
    torch.testing.assert_close(y, case["bias"].expand(M, 6))
    no_outputs = cur_linear_triton(case["x"], case["C"][:0], None, case["R"], None, None)
    assert no_outputs.shape == (M, 0)


@pytest.mark.parametrize("supported, capability", ((False, (9, 0)), (True, (9, 0)),
                                                    (True, (8, 0))))
def test_pdl_is_refused_where_triton_cannot_compile_it(supported, capability, monkeypatch):
    """Triton 3.4.0's griddepcontrol does not compile and 3.3 has none, and before Hopper ptxas
    rejects it: the plan says so rather than launching a kernel that fails to build."""
    monkeypatch.setattr(decode_host.kernels, "PDL_SUPPORTED", supported)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    without_interpreter(monkeypatch)
    monkeypatch.setattr(decode_host, "_multiprocessors", lambda device_index: 132)
    monkeypatch.setattr(decode_host, "_decode_plans", {})

    def plan():
        return decode_host._decode_plan(torch.device("cuda", 0), torch.bfloat16, 256, 64, 64,
                                           128, 16, "none", False, False, True,
                                           decode_host.DecodeConfig(pdl=True))
    if not supported:
        with pytest.raises(ValueError, match=r"Triton ≥ 3\.5"):
            plan()
    elif capability < (9, 0):
        with pytest.raises(ValueError, match=r"Hopper or newer GPU .* this one is sm_80"):
            plan()
    else:
        (launch,) = plan().launches
        assert launch.constexprs["PDL"] and launch.constexprs["launch_pdl"]


class _FakeCudaInput:
    """Stands in for a CUDA input: the compile check reads only its dtype and device."""
    def __init__(self, dtype):
        self.dtype, self.is_cuda, self.device = dtype, True, torch.device("cuda", 0)


@pytest.mark.parametrize("version,capability,dtype,refused", [
    ((3, 2), (9, 0), torch.bfloat16, True),
    ((3, 2), (9, 0), torch.float16, True),
    ((3, 2), (9, 0), torch.float32, False),
    ((3, 2), (8, 0), torch.bfloat16, False),
    ((3, 3), (9, 0), torch.bfloat16, False),
])
def test_prefill_on_triton_3_2_hopper_half_precision_is_refused(version, capability, dtype,
                                                                 refused, monkeypatch):
    """Triton 3.2's compiler aborts the whole process there (tests/ops/triton_launch_check.py
    with Triton 3.2.0 installed): the backend raises instead."""
    monkeypatch.setattr(prefill, "TRITON_VERSION", version)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    x = _FakeCudaInput(dtype)
    if refused:
        with pytest.raises(BackendUnavailableError, match="Triton ≥ 3.3"):
            prefill._check_prefill_compiles(x)
    else:
        prefill._check_prefill_compiles(x)


def test_row_blocks_fit_the_rows_and_refuse_too_many():
    assert [decode_host.decode_block_rows(M) for M in (1, 16, 17, 32, 33, 64)] == [
        16, 16, 32, 32, 64, 64]
    for M in (0, 65):
        with pytest.raises(ValueError, match="1 to 64 input rows, got"):
            decode_host.decode_block_rows(M)


@pytest.mark.skipif(not settings.current.triton_interpret, reason="needs TRITON_INTERPRET=1")
@pytest.mark.parametrize("M", (3, 65))  # the decode kernel, the prefill kernel
def test_bfloat16_under_the_interpreter_is_refused(M):
    """The interpreter has no bf16 arithmetic: it returned garbage; the backend says so."""
    case = make_case(M, 40, 24, 5, torch.bfloat16, device="cpu")
    with pytest.raises(TypeError, match=r"torch\.bfloat16 under the interpreter"):
        cur_linear(case["x"], case["C"], None, case["R"], case["bias"], backend="triton")
    expands = [torch.zeros(8, 2, dtype=torch.bfloat16), torch.zeros(6, 3, dtype=torch.bfloat16)]
    outputs = [torch.empty(M, 8, dtype=torch.bfloat16), torch.empty(M, 6, dtype=torch.bfloat16)]
    if M <= 64:
        with pytest.raises(TypeError, match=r"torch\.bfloat16 under the interpreter"):
            decode_host.cur_linear_group_decode(case["x"], torch.zeros(5, 40, dtype=torch.bfloat16),
                                                expands, [None, None], outputs)
