"""pytest-benchmark microbenchmarks of one factored layer call.

CPU set (runs anywhere, quickly): the torch backend against dense F.linear, and the module
call of nn.Linear against CURLinear at a tiny size, where the time is the Python
above the kernels (bench/host_overhead.py prints the same comparison as a table).
GPU set (skipped without CUDA): per-call time of dense, chain2 and each backend, eager, at
decode and prefill sizes; and the host time a call costs (enqueue only), which must not exceed
dense F.linear's, for the functional op and for a CURLinear module.

    pytest bench/test_cur_linear_microbench.py --benchmark-columns=median,iqr
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from curkernels.nn import CURLinear
from curkernels.ops import cur_linear

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CALLS = 50  # calls per timed round on the GPU, so that launches queue as in a model


def _layer(m, n, r, dtype, device):
    return {"W": torch.randn(m, n, dtype=dtype, device=device) / n ** 0.5,
            "C": torch.randn(m, r, dtype=dtype, device=device) / r ** 0.5,
            "R": torch.randn(r, n, dtype=dtype, device=device) / n ** 0.5}


@pytest.mark.parametrize("M", (1, 64))
@pytest.mark.parametrize("variant", ("dense", "torch"))
def test_cpu_layer(benchmark, variant, M):
    layer = _layer(512, 512, 64, torch.float32, "cpu")
    x = torch.randn(M, 512)
    if variant == "dense":
        benchmark(F.linear, x, layer["W"])
    else:
        benchmark(cur_linear, x, layer["C"], None, layer["R"], backend="torch")


@pytest.mark.parametrize("variant", ("nn.Linear", "CURLinear"))
def test_cpu_module_host_time(benchmark, variant):
    """64×64, r = 8, one row, no grad: the arithmetic is negligible next to the Python."""
    layer = _layer(64, 64, 8, torch.float32, "cpu")
    module = {"nn.Linear": lambda: nn.Linear(64, 64, bias=False),
              "CURLinear": lambda: CURLinear(layer["C"], None, layer["R"], trainable=())
              }[variant]()
    x = torch.randn(1, 64)
    with torch.no_grad():
        benchmark(module, x)


def _gpu_call(variant, layer, x):
    if variant == "dense":
        return lambda: F.linear(x, layer["W"])
    if variant == "chain2":
        return lambda: F.linear(F.linear(x, layer["R"]), layer["C"])
    if variant == "CURLinear":
        module = CURLinear(layer["C"], None, layer["R"], trainable=())
        return lambda: module(x)
    return lambda: cur_linear(x, layer["C"], None, layer["R"], backend=variant)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("M", (1, 16, 1024))
@pytest.mark.parametrize("r", (256, 1024))
@pytest.mark.parametrize("variant", ("dense", "chain2", "triton", "cuda"))
def test_gpu_layer_eager(benchmark, variant, r, M):
    """Wall time per call of CALLS back-to-back calls, synchronised at the end of each round."""
    layer = _layer(4096, 4096, r, torch.bfloat16, "cuda")
    x = torch.randn(M, 4096, dtype=torch.bfloat16, device="cuda")
    call = _gpu_call(variant, layer, x)

    def rounds():
        for _ in range(CALLS):
            call()
        torch.cuda.synchronize()

    rounds()
    benchmark.pedantic(rounds, rounds=20, warmup_rounds=2)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("variant", ("dense", "auto", "cuda", "triton", "CURLinear"))
def test_gpu_host_time_per_call(benchmark, variant):
    """Enqueue cost only: the GPU is synchronised before each round, not inside it."""
    layer = _layer(4096, 4096, 256, torch.bfloat16, "cuda")
    x = torch.randn(1, 4096, dtype=torch.bfloat16, device="cuda")
    call = _gpu_call(variant, layer, x)
    call()
    with torch.no_grad():
        benchmark.pedantic(lambda: [call() for _ in range(CALLS)], setup=torch.cuda.synchronize,
                           rounds=50, warmup_rounds=3)
