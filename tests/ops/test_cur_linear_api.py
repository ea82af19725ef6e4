"""The public `cur_linear` through each backend that runs here, and its errors."""

import pytest
import torch
from cur_linear_cases import assert_matches_reference, kernel_device, make_case

from curkernels.ops import BackendUnavailableError, cur_linear

DEVICE = kernel_device()


@pytest.mark.parametrize("backend", ("torch", "triton", "auto"))
@pytest.mark.parametrize("rows", (1, 20))
def test_batched_input_through_each_backend(backend, rows):
    """x of shape (batch, seq, n): decode (2 rows) and prefill (40 rows) paths."""
    case = make_case(2 * rows, 96, 80, 16, torch.float32, link="diagonal", gather=True,
                     device=DEVICE)
    x = case["x"].reshape(2, rows, 96)
    y = cur_linear(x, case["C"], case["U"], case["R"], case["bias"], rows=case["rows"],
                   backend=backend)
    assert y.shape == (2, rows, 80)
    assert_matches_reference(y.reshape(2 * rows, 80), case)


@pytest.mark.parametrize("backend", ("torch", "triton"))
@pytest.mark.parametrize("rows", (1, 20))
def test_strided_batched_input_through_each_backend(backend, rows, poisoned):
    """Rows of x 192 elements apart (a slice of a wider tensor): made contiguous where a kernel
    needs it, never read as if they were packed."""
    case = make_case(2 * rows, 96, 80, 16, torch.float32, device=DEVICE)
    wide = poisoned(2 * rows, 192, torch.float32, DEVICE).reshape(2, rows, 192)
    wide[..., :96] = case["x"].reshape(2, rows, 96)
    x = wide[..., :96]
    assert not x.is_contiguous()
    y = cur_linear(x, case["C"], case["U"], case["R"], case["bias"], backend=backend)
    assert y.shape == (2, rows, 80)
    assert_matches_reference(y.reshape(2 * rows, 80), case)


def test_cuda_backend_without_a_cuda_input_says_why():
    case = make_case(1, 32, 16, 4, torch.float32)
    with pytest.raises(BackendUnavailableError, match="cuda"):
        cur_linear(case["x"], case["C"], None, case["R"], backend="cuda")


def test_out_of_range_rows_are_refused_on_the_host():
    case = make_case(1, 32, 16, 4, torch.float32, gather=True, device=DEVICE)
    case["rows"][0] = 1000
    with pytest.raises(IndexError, match="rows"):
        cur_linear(case["x"], case["C"], None, case["R"], rows=case["rows"], backend="triton")


def test_torch_backend_compiles_fullgraph_on_cpu():
    case = make_case(3, 64, 48, 8, torch.float32, link="full")

    def layer(x):
        return cur_linear(x, case["C"], case["U"], case["R"], case["bias"], backend="torch")

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    assert_matches_reference(compiled(case["x"]), case)
