"""The CUDA extension curkernels._C: it loads without a GPU; on a GPU its fused decode kernel
matches the fp64 reference (all dtypes, links, gather, unaligned rows, > 16 rows) and replays
in CUDA graphs (torch.compile: test_gpu_model_capture.py).

CI sets CURKERNELS_REQUIRE_EXTENSION=1: there a missing extension fails instead of skipping.
"""

import importlib
import importlib.util
import os

import pytest
import torch
from cur_linear_cases import LINKS, assert_matches_reference, make_case

from curkernels.ops import unavailable_reason

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
REQUIRED = os.environ.get("CURKERNELS_REQUIRE_EXTENSION") == "1"
BUILT = importlib.util.find_spec("curkernels._C") is not None


def load_extension():
    if not BUILT and not REQUIRED:
        pytest.skip("curkernels._C was not built (set CURKERNELS_REQUIRE_EXTENSION=1 to fail)")
    return importlib.import_module("curkernels._C")


def test_extension_loads_and_registers_the_op():
    load_extension()
    schema = str(torch.ops.curkernels_C.cur_linear.default._schema)
    assert schema.startswith("curkernels_C::cur_linear(Tensor x, Tensor C, Tensor? U, Tensor R")


def test_extension_rejects_cpu_tensors():
    load_extension()
    case = make_case(1, 16, 8, 4, torch.float32)
    with pytest.raises(NotImplementedError, match="curkernels_C::cur_linear"):
        torch.ops.curkernels_C.cur_linear(case["x"], case["C"], None, case["R"], None, None)


def test_cuda_backend_names_its_reason_on_cpu():
    load_extension()
    assert "CUDA tensors" in unavailable_reason("cuda", torch.device("cpu"))


def run_cuda(case):
    load_extension()
    return torch.ops.curkernels_C.cur_linear(case["x"], case["C"], case["U"], case["R"],
                                             case["bias"], case["rows"])


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16))
@pytest.mark.parametrize("link", LINKS)
@pytest.mark.parametrize("M", (1, 2, 5, 16, 17, 40))
def test_cuda_kernel_matches_reference(dtype, link, M):
    for index, (n, m, r) in enumerate(((4096, 1024, 256), (300, 130, 7), (4104, 1000, 100))):
        case = make_case(M, n, m, r, dtype, link=link, bias=index != 1, gather=index == 2,
                         device="cuda", seed=index)
        assert_matches_reference(run_cuda(case), case)


@gpu
@pytest.mark.gpu
def test_cuda_kernel_unaligned_rows_take_the_scalar_path():
    case = make_case(3, 4097, 515, 33, torch.bfloat16, link="full", device="cuda")
    assert_matches_reference(run_cuda(case), case)


@gpu
@pytest.mark.gpu
def test_cuda_kernel_in_cuda_graph():
    case = make_case(4, 4096, 2048, 256, torch.bfloat16, link="diagonal", device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            run_cuda(case)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        y = run_cuda(case)
    for _ in range(5):  # new inputs each replay, output poisoned
        case["x"].copy_(torch.randn_like(case["x"]))
        y.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert_matches_reference(y, case)


@gpu
@pytest.mark.gpu
def test_cuda_kernel_empty_dimensions():
    case = make_case(3, 0, 6, 3, torch.float16, device="cuda")
    torch.testing.assert_close(run_cuda(case), case["bias"].expand(3, 6))
    assert run_cuda(dict(case, C=case["C"][:0], bias=None)).shape == (3, 0)


@gpu
@pytest.mark.gpu
def test_cuda_kernel_takes_leading_dimensions_and_strided_x():
    """x (..., n) as F.linear takes it: no flattening by the caller, strided x made contiguous."""
    case = make_case(6, 512, 300, 32, torch.bfloat16, link="full", device="cuda")
    y = run_cuda(dict(case, x=case["x"].reshape(2, 3, 512)))
    assert y.shape == (2, 3, 300)
    assert_matches_reference(y.reshape(6, 300), case)
    strided = dict(case, x=torch.randn(512, 6, device="cuda", dtype=torch.bfloat16).t())
    assert not strided["x"].is_contiguous()
    assert_matches_reference(run_cuda(strided), strided)
