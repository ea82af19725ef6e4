"""The Triton backend's entry point: routing by M and degenerate shapes."""

import pytest
import torch
from cur_linear_cases import assert_matches_reference, kernel_device, make_case

from curkernels.ops import triton_backend
from curkernels.ops.triton_backend import cur_linear_triton

DEVICE = kernel_device()


@pytest.mark.parametrize("M,kernel", ((16, "cur_linear_decode"), (17, "cur_linear_decode"),
                                      (64, "cur_linear_decode"), (65, "_cur_linear_prefill")))
def test_rows_pick_the_kernel(M, kernel, monkeypatch):
    called = []
    original = getattr(triton_backend, kernel)
    monkeypatch.setattr(triton_backend, kernel, lambda *args: called.append(M) or original(*args))
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
    monkeypatch.setattr(triton_backend.decode, "PDL_SUPPORTED", supported)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(triton_backend, "triton_interpreting", lambda: False)
    monkeypatch.setattr(triton_backend, "_multiprocessors", lambda device_index: 132)
    monkeypatch.setattr(triton_backend, "_decode_plans", {})

    def plan():
        return triton_backend._decode_plan(torch.device("cuda", 0), torch.bfloat16, 256, 64, 64,
                                           128, 16, "none", False, False, True,
                                           triton_backend.DecodeConfig(pdl=True))
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
    monkeypatch.setattr(triton_backend, "TRITON_VERSION", version)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    x = _FakeCudaInput(dtype)
    if refused:
        with pytest.raises(triton_backend.BackendUnavailableError, match="Triton ≥ 3.3"):
            triton_backend._check_prefill_compiles(x)
    else:
        triton_backend._check_prefill_compiles(x)


def test_row_blocks_fit_the_rows_and_refuse_too_many():
    assert [triton_backend.decode_block_rows(M) for M in (1, 16, 17, 32, 33, 64)] == [
        16, 16, 32, 32, 64, 64]
    for M in (0, 65):
        with pytest.raises(ValueError, match="1 to 64 input rows, got"):
            triton_backend.decode_block_rows(M)
