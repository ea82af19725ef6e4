"""Operands, the fp64 reference and dispatch helpers for the kernel tests (imported by them)."""

from dataclasses import replace

import torch

from curkernels.ops import dispatch, settings

# ‖y − ref‖ / ‖ref‖ bounds: fp32 ieee dots, fp16/bf16 operands rounded once more than the
# reference (the intermediate enters the second product in the input dtype).
REL_TOLERANCE = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
LINKS = ("none", "diagonal", "full")


def kernel_device() -> str:
    """Where the Triton kernels run here: the GPU, or the CPU through the interpreter."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def make_case(M, n, m, r, dtype, link="none", bias=True, gather=False, device="cpu", seed=0,
              c=None):
    """Random operands of y = C·(U·(R·x)) + b, scaled so that every stage stays O(1)."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator, dtype=torch.float64) * scale).to(
            dtype=dtype, device=device)

    c = (c or r + 3) if link == "full" else r
    case = {"x": randn(M, n), "C": randn(m, c, scale=c ** -0.5), "U": None,
            "bias": randn(m) if bias else None, "rows": None}
    if link == "diagonal":
        case["U"] = randn(r)
    elif link == "full":
        case["U"] = randn(c, r, scale=r ** -0.5)
    if gather:
        base_rows = r + 5
        case["R"] = randn(base_rows, n, scale=max(n, 1) ** -0.5)
        case["rows"] = torch.randperm(base_rows, generator=generator)[:r].to(device)
    else:
        case["R"] = randn(r, n, scale=max(n, 1) ** -0.5)
    return case


def reference(x, C, U, R, bias, rows):
    """fp64 ground truth computed from the operands as given."""
    factor = (R[rows] if rows is not None else R).double()
    t = x.double() @ factor.t()
    if U is not None:
        t = t * U.double() if U.dim() == 1 else t @ U.double().t()
    y = t @ C.double().t()
    return y + bias.double() if bias is not None else y


def assert_matches_reference(y, case):
    expected = reference(case["x"], case["C"], case["U"], case["R"], case["bias"], case["rows"])
    assert y.shape == expected.shape
    assert y.dtype == case["x"].dtype
    assert torch.isfinite(y).all(), "output has NaN/Inf: an element was not written"
    error = ((y.double() - expected.to(y.device)).norm() / expected.norm()).item()
    assert error < REL_TOLERANCE[y.dtype], f"relative error {error:.3e}"



def capture_graph(step, warmups: int = 3):
    """A CUDA graph of step(), captured on a side stream after warm-up calls there (they
    compile the kernels and make their workspaces, which are kept per stream)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmups):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        step()
    return graph


def group_backend(x, rows, members, graph, uniform_bias=True) -> str:
    """The way dispatch runs a sibling group's call: 'triton' (one launch) or 'torch'."""
    return dispatch.group_choice(x, rows, members, graph, uniform_bias)[0]


def without_interpreter(monkeypatch) -> None:
    """The ops settings as if TRITON_INTERPRET were unset (the variable itself stays: Triton
    reads it too, and kernels run later in this process under the interpreter)."""
    monkeypatch.setattr(settings, "current", replace(settings.current, triton_interpret=False))
