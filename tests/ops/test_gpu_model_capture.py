"""A small model made of CURLinear layers, on a GPU: torch.compile(fullgraph=True) and CUDA-graph
capture give the eager result, through each backend."""

import pytest
import torch
from torch import nn

from curkernels.nn import CURLinear

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _model(backend: str) -> nn.Module:
    torch.manual_seed(0)
    layers = []
    for n, m, r in ((512, 1024, 64), (1024, 512, 32)):
        C = torch.randn(m, r) / r ** 0.5
        U = torch.randn(r, r) / r ** 0.5
        R = torch.randn(r, n) / n ** 0.5
        layers += [CURLinear(C, U, R, torch.randn(m), trainable=(), backend=backend), nn.GELU()]
    return nn.Sequential(*layers).to("cuda", torch.bfloat16)


def _reference(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    y = x.double()
    for layer in model:
        if isinstance(layer, CURLinear):
            y = y @ layer.R.double().t() @ layer.U.double().t() @ layer.C.double().t()
            y = y + layer.bias.double()
        else:
            y = torch.nn.functional.gelu(y)
    return y


def _assert_close(y, expected):
    assert torch.isfinite(y).all()
    assert ((y.double() - expected).norm() / expected.norm()).item() < 2e-2


def _assert_replays_match(graph, model, x, y):
    """Replays on fresh inputs, the output poisoned before each, match the float64 reference."""
    for _ in range(3):
        x.copy_(torch.randn_like(x))
        y.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        _assert_close(y, _reference(model, x))


@pytest.mark.parametrize("backend,rows", (("cuda", 1), ("triton", 1), ("auto", 1), ("auto", 40),
                                          ("triton", 40)))
def test_compiled_model_fullgraph(backend, rows):
    model = _model(backend)
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(rows, 512, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        _assert_close(compiled(x), _reference(model, x))


@pytest.mark.parametrize("backend", ("auto", "cuda", "triton"))
def test_model_replays_in_a_cuda_graph(backend):
    model = _model(backend)
    x = torch.randn(4, 512, device="cuda", dtype=torch.bfloat16)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(stream):
        for _ in range(3):
            model(x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph, stream=stream):
        y = model(x)
    _assert_replays_match(graph, model, x, y)


@pytest.mark.parametrize("backend", ("auto", "cuda", "triton"))
def test_reduce_overhead_compile_keeps_workspaces_out_of_the_graph_pool(backend):
    """torch.compile's CUDA graphs (cudagraph trees) warm up in their own memory pool and refuse
    pool blocks that outlive the graph; the kernels' persistent workspaces must not be there.
    Eager calls first (another stream's workspaces), then warm-up, recording and replays."""
    model = _model(backend)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, mode="reduce-overhead")
    with torch.no_grad():
        x = torch.randn(1, 512, device="cuda", dtype=torch.bfloat16)
        _assert_close(model(x), _reference(model, x))
        for _ in range(4):
            x = torch.randn(1, 512, device="cuda", dtype=torch.bfloat16)
            _assert_close(compiled(x).clone(), _reference(model, x))


def test_capture_finds_the_workspace_its_eager_warm_up_reserved(monkeypatch):
    """Eager decode calls on a stream reserve the Triton workspace that CUDA graphs on that
    stream will use, so the capture keeps it rather than adding zeroing nodes to each replay."""
    from curkernels.ops import dispatch, tables
    from curkernels.ops.triton import workspace as workspaces
    dispatch.choices.clear()
    monkeypatch.setattr(tables, "decode_winners",  # Triton in graphs, chain2 eagerly
                        lambda *args: ("triton",) if args[-1] == "graph" else ())
    model = _model("auto")  # frozen U: folded into C at the call, so the op gets two factors
    x = torch.randn(1, 512, device="cuda", dtype=torch.bfloat16)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(stream):
        model(x)
        raw = torch._C._cuda_getCurrentRawStream(torch.cuda.current_device())
    torch.cuda.current_stream().wait_stream(stream)
    kept = {key for key in workspaces._workspaces if key[1] == raw}
    assert {(key[2], key[3]) for key in kept} == {(64, 64), (32, 32)}
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph, stream=stream):
        y = model(x)
    assert {key for key in workspaces._workspaces if key[1] == raw} == kept
    _assert_replays_match(graph, model, x, y)
