"""fold_link, truncated_svd and split_evenly against fp64 references."""

import pytest
import torch

from curkernels.ops.factors import fold_link, split_evenly, truncated_svd


@pytest.mark.parametrize("link", ["full", "diag"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fold_link_is_c_times_u_rounded_once(link, dtype):
    g = torch.Generator().manual_seed(0)
    C = torch.randn(40, 12, generator=g).to(dtype)
    U = (torch.randn(12, 7, generator=g) if link == "full" else torch.randn(12, generator=g))
    U = U.to(dtype)
    exact = C.double() @ U.double() if link == "full" else C.double() * U.double()
    folded = fold_link(C, U)
    assert folded.dtype == dtype
    assert torch.equal(folded, exact.to(dtype))  # computed in fp64, rounded to C's dtype once
    assert fold_link(C, None) is C


def test_fold_link_in_fp32_matches_the_fp32_product():
    C, U = torch.randn(9, 5, dtype=torch.float16), torch.randn(5, 3, dtype=torch.float16)
    assert torch.equal(fold_link(C, U, torch.float32), (C.float() @ U.float()).half())


def test_truncated_svd_is_the_best_low_rank_approximation():
    W = torch.randn(30, 20, generator=torch.Generator().manual_seed(1))
    sigma = torch.linalg.svdvals(W.double())
    left, kept, right = truncated_svd(W, 6)
    assert left.shape == (30, 6) and kept.shape == (6,) and right.shape == (6, 20)
    assert left.dtype == torch.float64
    error = torch.linalg.norm(W.double() - left @ torch.diag(kept) @ right)
    torch.testing.assert_close(error, sigma[6:].norm())
    assert truncated_svd(W)[1].shape == (20,)  # no rank: every component
    assert truncated_svd(W, 6, compute=torch.float32)[0].dtype == torch.float32


def test_split_evenly_gives_factors_of_equal_scale():
    left, sigma, right = truncated_svd(torch.randn(12, 9), 4)
    A, B = split_evenly(left, sigma, right)
    torch.testing.assert_close(A @ B, left @ torch.diag(sigma) @ right)
    torch.testing.assert_close(A.norm(dim=0), B.norm(dim=1))


@pytest.mark.parametrize("rank", [0, 10, 2.5])
def test_truncated_svd_names_a_bad_rank(rank):
    with pytest.raises(ValueError, match=r"rank must be in \[1, min\(m, n\) = 9\]"):
        truncated_svd(torch.randn(12, 9), rank)


def test_truncated_svd_refuses_nan():
    matrix = torch.randn(4, 4)
    matrix[1, 2] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        truncated_svd(matrix, 2)
