"""CURLinear (three factors, or two without U) against fp64 reconstructions of its factors."""

import pytest
import torch
from torch import nn

from curkernels import CURLinear
from curkernels.ops import settings


def random_factors(m=37, n=53, r=9, c=11, u="full", seed=0):
    g = torch.Generator().manual_seed(seed)
    C = torch.randn(m, c if u == "full" else r, generator=g)
    U = {"full": torch.randn(c, r, generator=g), "diag": torch.randn(r, generator=g),
         "none": None}[u]
    return C, U, torch.randn(r, n, generator=g), torch.randn(m, generator=g)


def fp64_weight(C, U, R):
    C, R = C.double(), R.double()
    if U is not None:
        C = C * U.double() if U.dim() == 1 else C @ U.double()
    return C @ R


@pytest.mark.parametrize("u", ["full", "diag", "none"])
@pytest.mark.parametrize("batch_shape", [(1,), (4,), (2, 3)])
def test_cur_linear_matches_fp64_reconstruction(u, batch_shape):
    C, U, R, bias = random_factors(u=u)
    module = CURLinear(C, U, R, bias)
    x = torch.randn(*batch_shape, 53)
    expected = x.double() @ fp64_weight(C, U, R).t() + bias.double()
    out = module(x)
    assert out.shape == (*batch_shape, 37) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-4)


def test_gather_form_reads_rows_of_a_shared_base_weight():
    C, U, _, bias = random_factors()
    base = torch.randn(70, 53)
    rows = torch.tensor([3, 69, 0, 12, 40, 41, 7, 8, 50])
    module = CURLinear(C, U, base, bias, row_indices=rows, gather=True)
    x = torch.randn(5, 53)
    expected = x.double() @ fp64_weight(C, U, base[rows]).t() + bias.double()
    torch.testing.assert_close(module(x).double(), expected, rtol=1e-5, atol=1e-4)
    assert module.rank == 9 and module.factor_parameters == 37 * 11 + 11 * 9 + 9 * 53


def test_from_linear_at_full_rank_reproduces_the_layer():
    linear = nn.Linear(24, 40)
    x = torch.randn(6, 24)
    for module in (CURLinear.from_linear(linear, 24),
                   CURLinear.from_linear(linear, 24, link=False)):
        torch.testing.assert_close(module(x), linear(x), rtol=1e-5, atol=1e-5)


def test_truncated_svd_error_is_the_tail_of_the_spectrum():
    linear = nn.Linear(30, 20, bias=False)
    sigma = torch.linalg.svdvals(linear.weight.double())
    for rank in (1, 5, 19):
        dense = CURLinear.from_linear(linear, rank, link=False).to_dense()
        error = torch.linalg.norm(dense.weight.double() - linear.weight.double())
        torch.testing.assert_close(error, sigma[rank:].norm(), rtol=1e-4, atol=1e-5)


def test_to_dense_and_fold_keep_the_function():
    C, U, R, bias = random_factors()
    module = CURLinear(C, U, R, bias, row_indices=range(9), col_indices=range(11))
    x = torch.randn(3, 53)
    before = module(x)
    dense = module.to_dense()
    torch.testing.assert_close(dense.weight.double(), fp64_weight(C, U, R), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dense(x), before, rtol=1e-5, atol=1e-4)
    module.fold()
    assert module.U is None and module.col_indices is None and module.C.shape == (37, 9)
    torch.testing.assert_close(module(x), before, rtol=1e-5, atol=1e-4)


def test_cur_linear_trains_u_and_freezes_c_r_by_default():
    C, U, R, bias = random_factors()
    module = CURLinear(C, U, R, bias)
    assert module.U.requires_grad and not module.C.requires_grad and not module.R.requires_grad
    module(torch.randn(4, 53)).square().sum().backward()
    assert module.U.grad is not None and module.U.grad.abs().sum() > 0
    assert module.C.grad is None and module.R.grad is None
    every = CURLinear(C, U, R, bias, trainable=("C", "U", "R"))
    assert all(p.requires_grad for p in every.parameters())


def test_two_factor_layer_trains_both_factors_by_default():
    C, _, R, bias = random_factors(u="none")
    module = CURLinear(C, None, R, bias)
    assert module.healable == ("C", "R") and module.C.requires_grad and module.R.requires_grad
    module(torch.randn(4, 53)).square().sum().backward()
    assert module.C.grad.abs().sum() > 0 and module.R.grad.abs().sum() > 0
    frozen = CURLinear(C, None, R, bias, trainable=())
    assert not frozen.C.requires_grad and not frozen.R.requires_grad


def test_healable_factors_are_never_picked_rows_or_columns_of_a_weight():
    C, U, R, _ = random_factors()
    assert CURLinear(C, U, R).healable == ("U",)
    C, _, R, _ = random_factors(u="none")
    assert CURLinear(C, None, R, row_indices=range(9)).healable == ("C",)
    assert CURLinear(C, None, torch.randn(40, 53), row_indices=range(9),
                     gather=True).healable == ("C",)
    assert CURLinear(C, None, R, col_indices=range(9)).healable == ("R",)
    module = CURLinear(*random_factors()[:3], col_indices=range(11))
    assert module.fold().healable == ("C", "R")  # folded: C no longer holds columns of W


def test_from_linear_without_link_splits_the_spectrum_evenly():
    linear = nn.Linear(30, 20, bias=False)
    module = CURLinear.from_linear(linear, 5, link=False)
    assert module.U is None and module.rank == 5
    torch.testing.assert_close(module.C.norm(dim=0), module.R.norm(dim=1))


def test_parameter_counts_and_repr():
    C, U, R, _ = random_factors()
    module = CURLinear(C, U, R)
    assert module.factor_parameters == 37 * 11 + 11 * 9 + 9 * 53
    assert module.dense_parameters == 37 * 53
    assert "rank=9" in repr(module) and "U=full" in repr(module)
    low = CURLinear(torch.randn(37, 4), None, torch.randn(4, 53))
    assert low.factor_parameters == 4 * (37 + 53) and "rank=4" in repr(low)
    assert "U=none" in repr(low)


@pytest.mark.parametrize("make, message", [
    (lambda: CURLinear(torch.randn(5, 3), torch.randn(3, 4), torch.randn(2, 7)), "U must have"),
    (lambda: CURLinear(torch.randn(5, 3), None, torch.randn(2, 7)), "without U"),
    (lambda: CURLinear(torch.randn(5, 2), None, torch.randn(2, 7), torch.randn(4)), "bias"),
    (lambda: CURLinear(torch.randn(5, 2), None, torch.randn(2, 7), trainable=("W",)),
     "trainable"),
    (lambda: CURLinear(torch.randn(5, 2), None, torch.randn(9, 7), gather=True), "row_indices"),
    (lambda: CURLinear(torch.randn(5, 2), None, torch.randn(9, 7), row_indices=[1, 1],
                       gather=True), "repeat"),
    (lambda: CURLinear(torch.randn(5, 2), None, torch.randn(9, 7), row_indices=[1, 9],
                       gather=True), "rows must index"),
    (lambda: CURLinear.from_linear(nn.Linear(4, 6), 5, link=False), "rank must be in"),
])
def test_bad_construction_is_refused_with_a_clear_message(make, message):
    with pytest.raises((ValueError, IndexError), match=message):
        make()


def test_nan_weight_cannot_be_factored():
    linear = nn.Linear(4, 6)
    with torch.no_grad():
        linear.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        CURLinear.from_linear(linear, 2)


def test_non_contiguous_factors_are_made_contiguous():
    C = torch.randn(9, 5).t()  # (5, 9) view with column-major strides
    module = CURLinear(C, None, torch.randn(9, 7))
    assert module.C.is_contiguous()
    x = torch.randn(2, 7)
    torch.testing.assert_close(module(x), x @ (C @ module.R).t(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_modules_compile_fullgraph_with_dispatch_at_run_time(backend, monkeypatch):
    monkeypatch.setenv("CURKERNELS_BACKEND", "torch")  # read when the op runs, not traced
    settings.reload()
    C, U, R, bias = random_factors()
    layers = torch.nn.Sequential(CURLinear(C, U, R, bias, backend=backend),
                                 torch.nn.ReLU(),
                                 CURLinear(torch.randn(53, 5), None, torch.randn(5, 37),
                                           backend=backend))
    x = torch.randn(3, 53)
    explanation = torch._dynamo.explain(layers)(x)
    assert explanation.graph_break_count == 0
    compiled = torch.compile(layers, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), layers(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("module", [
    CURLinear(*random_factors()[:3]),
    CURLinear(torch.randn(37, 4), None, torch.randn(4, 53)),
])
def test_modules_check_each_input_against_their_factors(module):
    """Factors are validated once; every call still checks x (a kernel must never read past
    it)."""
    with pytest.raises(ValueError, match="53 features"):
        module(torch.randn(2, 52))
    with pytest.raises(TypeError, match="dtype"):
        module(torch.randn(2, 53, dtype=torch.float16))
    with pytest.raises(ValueError, match="53 features"):
        module(torch.tensor(1.0))
    with pytest.raises(ValueError, match="factors are on cpu"):
        module(torch.randn(2, 53, device="meta"))
    with pytest.raises(TypeError, match="torch.Tensor"):
        module([0.0] * 53)
    with pytest.raises(ValueError, match="53 features"):  # the autograd path checks too
        module(torch.randn(2, 52, requires_grad=True))


def _factors_of(module):
    return module.C, module.U, module.R, module.bias


def _assert_computes_its_factors(module, dtype=torch.float32):
    x = torch.randn(3, 53, dtype=dtype)
    C, U, R, bias = _factors_of(module)
    expected = x.double() @ fp64_weight(C, U, R).t()
    if bias is not None:
        expected = expected + bias.double()
    with torch.no_grad():
        out = module(x)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("make", [
    lambda: CURLinear(*random_factors(u="full"), trainable=()),  # U folded per call, cached
    lambda: CURLinear(*random_factors(u="none"), trainable=()),
    lambda: CURLinear(torch.randn(37, 4), None, torch.randn(4, 53), torch.randn(37)),  # trains
])
def test_modules_follow_factors_changed_in_place_replaced_or_moved(make):
    """Per-call caches (the backend choice, the folded U) never answer for old factors."""
    module = make()
    _assert_computes_its_factors(module)
    C, U, R, bias = _factors_of(module)
    with torch.no_grad():
        C.mul_(2.0)
        if U is not None:
            U.add_(1.0)
    _assert_computes_its_factors(module)
    with torch.no_grad():  # .data assignment keeps the Parameter object, swaps its tensor
        C.data = torch.randn_like(C)
    _assert_computes_its_factors(module)
    rank, trains = 6, module.C.requires_grad
    C, U, R, _ = random_factors(r=rank, c=rank + 2, u="full" if U is not None else "none", seed=1)
    module.C, module.R = nn.Parameter(C, requires_grad=trains), nn.Parameter(R)
    if U is not None:
        module.U = nn.Parameter(U, requires_grad=False)
    _assert_computes_its_factors(module)
    module.double()
    _assert_computes_its_factors(module, torch.float64)
    with pytest.raises(TypeError, match="dtype"):
        module(torch.randn(2, 53))


def test_batched_input_with_an_empty_feature_dimension():
    from curkernels.ops import cur_linear
    y = cur_linear(torch.randn(2, 3, 0), torch.randn(4, 2), None, torch.randn(2, 0),
                   torch.ones(4))
    assert y.shape == (2, 3, 4) and torch.equal(y, torch.ones(2, 3, 4))
