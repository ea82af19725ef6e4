"""The sibling-group decode kernel (q/k/v or gate/up in one launch) against the fp64 reference,
outputs poisoned, and the rule that picks it over the shared chain (the measured table itself:
test_tables_group.py)."""

import itertools

import pytest
import torch
from cur_linear_cases import (
    REL_TOLERANCE,
    capture_graph,
    group_backend,
    kernel_device,
    without_interpreter,
)

from curkernels.ops import BackendUnavailableError, dispatch, settings, tables
from curkernels.ops.triton import decode as decode_host
from curkernels.ops.triton import workspace as workspaces
from curkernels.ops.triton.decode import cur_linear_decode, cur_linear_group_decode

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICE = kernel_device()
N = 300  # not a multiple of any block


def make_group(M, ranks, ms, dtype, bias, device=DEVICE, seed=0, n=N):
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator, dtype=torch.float64) * scale).to(
            dtype=dtype, device=device)

    return {"x": randn(M, n), "R": randn(sum(ranks), n, scale=n ** -0.5),
            "expands": [randn(m, k, scale=k ** -0.5) for m, k in zip(ms, ranks, strict=True)],
            "biases": [randn(m) if bias else None for m in ms]}


def run_group(group, poisoned):
    x = group["x"]
    outputs = [poisoned(x.shape[0], C.shape[0], x.dtype, x.device) for C in group["expands"]]
    cur_linear_group_decode(x, group["R"], group["expands"], group["biases"], outputs)
    return outputs


def assert_group_matches_reference(outputs, group):
    product = group["x"].double() @ group["R"].double().t()
    start = 0
    for y, C, bias in zip(outputs, group["expands"], group["biases"], strict=True):
        stop = start + C.shape[1]
        expected = product[:, start:stop] @ C.double().t()
        if bias is not None:
            expected = expected + bias.double()
        start = stop
        assert torch.isfinite(y).all(), "output has NaN/Inf: an element was not written"
        error = ((y.double() - expected.to(y.device)).norm() / expected.norm()).item()
        assert error < REL_TOLERANCE[y.dtype], f"relative error {error:.3e}"


# Row counts over the three row blocks; q/k/v-like (three members, the first widest) and
# gate/up-like (two) groups with ranks and widths off the tile sizes; dtype and bias cycle.
GROUPS = (((5, 3, 7), (130, 40, 41)), ((1, 1, 1), (1, 3, 33)), ((8, 16), (100, 33)),
          ((33, 70), (70, 129)))
GRID = [(M, ranks, ms, i) for i, (M, (ranks, ms)) in
        enumerate(itertools.product((1, 5, 16, 17, 40, 64), GROUPS))]


@pytest.mark.parametrize("M,ranks,ms,i", GRID)
def test_group_grid(M, ranks, ms, i, poisoned):
    group = make_group(M, ranks, ms, (torch.float32, torch.float16)[i % 2], bias=i % 3 == 0,
                       seed=i)
    assert_group_matches_reference(run_group(group, poisoned), group)


def test_group_persistent_form_shares_the_workspace_with_single_layers(poisoned, monkeypatch):
    """The single-launch form (grid barrier, epoch double-buffering) on one program, which the
    interpreter can run; its workspace is the single-layer kernel's of the same rank and row
    block, so calls of both, in turn, must each find their buffer zeroed."""
    monkeypatch.setattr(decode_host, "single_launch", lambda device: True)
    monkeypatch.setattr(decode_host, "_multiprocessors", lambda device_index: 1)
    monkeypatch.setattr(workspaces, "_workspaces", {})
    monkeypatch.setattr(decode_host, "_decode_plans", {})
    from cur_linear_cases import assert_matches_reference, make_case
    for call in range(4):
        group = make_group(3, (6, 4, 5), (20, 9, 11), torch.float32, bias=call % 2 == 0,
                           seed=call)
        assert_group_matches_reference(run_group(group, poisoned), group)
        single = make_case(2, N, 17, 15, torch.float32, device=DEVICE, seed=10 + call)
        y = poisoned(2, 17, torch.float32, DEVICE)
        cur_linear_decode(single["x"], single["C"], None, single["R"], single["bias"], None, y)
        assert_matches_reference(y, single)
    (workspace,) = workspaces._workspaces.values()
    assert workspace.sync.tolist() == [0, 15, 8, 0]  # 8 launches, one barrier each


@pytest.mark.parametrize("ranks,ms,biases,message", (
    ((4,), (10,), (False,), "2 to 3"),
    ((1, 1, 1, 1), (2, 2, 2, 2), (False,) * 4, "2 to 3"),
    ((4, 5), (10, 11), (True, False), "every member's bias or none"),
))
def test_group_call_errors_name_the_argument(ranks, ms, biases, message):
    group = make_group(2, ranks, ms, torch.float32, bias=True)
    group["biases"] = [b if keep else None for b, keep in zip(group["biases"], biases,
                                                               strict=True)]
    outputs = [torch.empty(2, m) for m in ms]
    with pytest.raises(ValueError, match=message):
        cur_linear_group_decode(group["x"], group["R"], group["expands"], group["biases"],
                                outputs)


def test_group_ranks_must_cover_the_stacked_weight():
    group = make_group(2, (4, 5), (10, 11), torch.float32, bias=False)
    with pytest.raises(ValueError, match=r"add up to R's 10 rows"):
        cur_linear_group_decode(group["x"], torch.cat([group["R"], group["R"][:1]]),
                                group["expands"], group["biases"],
                                [torch.empty(2, 10), torch.empty(2, 11)])


class _FakeCudaInput:
    """Stands in for a CUDA input: the rule reads device, dtype, is_cuda and the last dim."""
    def __init__(self, dtype=torch.bfloat16, n=64):
        self.device, self.dtype, self.is_cuda, self.shape = (torch.device("cuda", 0), dtype,
                                                             True, (1, n))


THREE, TWO, FOUR = ((40, 6), (24, 4), (24, 5)), ((96, 8), (96, 8)), ((8, 2),) * 4


@pytest.mark.parametrize("environment,rows,members,uniform,dtype,measured_win,expected", (
    (None, 1, THREE, True, torch.bfloat16, True, "triton"),
    (None, 64, TWO, True, torch.float16, True, "triton"),
    (None, 1, THREE, True, torch.bfloat16, False, "torch"),   # not measured to win
    (None, 65, THREE, True, torch.bfloat16, True, "torch"),   # prefill: the chain's wide GEMMs
    (None, 1, FOUR, True, torch.bfloat16, True, "torch"),     # the kernel takes three at most
    (None, 1, THREE, False, torch.bfloat16, True, "torch"),   # some members with a bias only
    (None, 1, THREE, True, torch.float64, True, "torch"),
    ("triton", 1, THREE, True, torch.bfloat16, False, "triton"),  # named: no table needed
    ("cuda", 1, THREE, True, torch.bfloat16, True, "torch"),  # a backend without a group kernel
    ("torch", 1, THREE, True, torch.bfloat16, True, "torch"),
))
def test_group_backend_on_a_gpu(environment, rows, members, uniform, dtype, measured_win,
                                expected, monkeypatch):
    if environment is None:
        monkeypatch.delenv("CURKERNELS_BACKEND", raising=False)
        settings.reload()
    else:
        monkeypatch.setenv("CURKERNELS_BACKEND", environment)
        settings.reload()
    monkeypatch.setattr(dispatch, "unavailable_reason", lambda backend, device: None)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "G")
    asked = []

    def group_kernel_wins(*args):
        asked.append(args)
        return measured_win
    monkeypatch.setattr(tables, "group_kernel_wins", group_kernel_wins)
    for graph in (True, False):
        assert group_backend(_FakeCudaInput(dtype), rows, members, graph, uniform) == expected
    if asked:  # the table is asked about this very call, in each mode
        assert asked == [("G", dtype, rows, 64, members, mode) for mode in ("graph", "eager")]


def test_group_backend_keeps_cpu_inputs_on_the_chain_unless_triton_is_named(monkeypatch):
    monkeypatch.delenv("CURKERNELS_BACKEND", raising=False)
    settings.reload()
    monkeypatch.setattr(dispatch, "unavailable_reason", lambda backend, device: None)
    x = torch.randn(1, 8)
    assert group_backend(x, 1, THREE, graph=False) == "torch"
    monkeypatch.setenv("CURKERNELS_BACKEND", "triton")
    settings.reload()
    assert group_backend(x, 1, THREE, graph=False) == "triton"


def test_group_backend_named_triton_that_cannot_run_raises(monkeypatch):
    monkeypatch.setenv("CURKERNELS_BACKEND", "triton")
    settings.reload()
    without_interpreter(monkeypatch)
    with pytest.raises(BackendUnavailableError, match="'triton' is unavailable"):
        group_backend(torch.randn(1, 8), 1, THREE, graph=False)
    monkeypatch.delenv("CURKERNELS_BACKEND")
    settings.reload()
    assert group_backend(torch.randn(1, 8), 1, THREE, graph=False) == "torch"


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("single_launch", ("1", "0"))
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float32))
def test_group_gpu_both_forms(single_launch, dtype, poisoned, monkeypatch):
    """Llama-like q/k/v and gate/up ranks (unequal, off the tiles) at decode and batched
    decode sizes."""
    monkeypatch.setenv("CURKERNELS_TRITON_SINGLE_LAUNCH", single_launch)
    settings.reload()
    for seed, (M, ranks, ms, bias) in enumerate((
            (1, (264, 96, 96), (2048, 512, 512), False), (16, (200, 72, 80), (2048, 512, 520), True),
            (40, (384, 384), (5632, 5632), False))):
        group = make_group(M, ranks, ms, dtype, bias, device="cuda", seed=seed, n=2048 + 8)
        assert_group_matches_reference(run_group(group, poisoned), group)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("M", (1, 40))
def test_group_kernel_in_cuda_graph(M):
    """Replays read the epoch and barrier words on the device: every replay is correct."""
    group = make_group(M, (128, 64, 64), (1024, 256, 256), torch.bfloat16, bias=True,
                       device="cuda", n=1024)
    outputs = [torch.empty(M, m, dtype=torch.bfloat16, device="cuda") for m in (1024, 256, 256)]

    def step():
        cur_linear_group_decode(group["x"], group["R"], group["expands"], group["biases"],
                                outputs)

    graph = capture_graph(step)
    for seed in range(4):
        group["x"].copy_(make_group(M, (128, 64, 64), (1024, 256, 256), torch.bfloat16,
                                    bias=True, device="cuda", seed=seed + 5, n=1024)["x"])
        for y in outputs:
            y.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert_group_matches_reference(outputs, group)
