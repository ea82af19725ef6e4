"""The Triton backend's entry point: routing by M and degenerate shapes."""

import pytest
import torch
from cur_linear_cases import assert_matches_reference, kernel_device, make_case

from curkernels.ops import triton_backend
from curkernels.ops.triton_backend import cur_linear_triton

DEVICE = kernel_device()


@pytest.mark.parametrize("M,kernel", ((16, "cur_linear_decode"), (17, "_cur_linear_prefill")))
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
