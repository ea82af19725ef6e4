"""The custom op's hand-written backward against numerical gradients (fp64 gradcheck)."""

import pytest
import torch

from curkernels.ops import cur_linear


@pytest.mark.parametrize("u", ["full", "diag", "none"])
@pytest.mark.parametrize("gather", [False, True])
def test_gradients_of_every_input(u, gather):
    g = torch.Generator().manual_seed(3)

    def leaf(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)

    r, c = 4, 5 if u == "full" else 4
    x, C, bias = leaf(2, 3, 7), leaf(6, c), leaf(6)
    U = {"full": leaf(c, r), "diag": leaf(r), "none": None}[u]
    R = leaf(9, 7) if gather else leaf(r, 7)
    rows = torch.tensor([8, 0, 3, 5]) if gather else None
    inputs = tuple(t for t in (x, C, U, R, bias) if t is not None)

    def run(*tensors):
        it = iter(tensors)
        x_, C_ = next(it), next(it)
        U_ = next(it) if U is not None else None
        R_, b_ = next(it), next(it)
        return cur_linear(x_, C_, U_, R_, b_, rows=rows, backend="torch")

    assert torch.autograd.gradcheck(run, inputs)
