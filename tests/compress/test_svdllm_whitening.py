"""SVD-LLM's one-shot whitening as it runs within a small memory: the damped Cholesky factor
made in place of the moment, the whitened spectrum from the smaller Gram matrix, the factors
from that spectrum without L, and the fp32 whitening's distance from an fp64 reference
(bounded)."""

import pytest
import torch
from conftest import random_batches

import curkernels as ck
from curkernels.compress.calibration import collect_linear_stats
from curkernels.compress.svdllm import (
    damped_cholesky_,
    one_shot_factors,
    unwhitened_factors,
    whitened_spectrum,
    whitening_factor,
)
from curkernels.compress.targets import block_linears


def moment_of(tokens: int, n: int, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, n, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3, n)
    return (x.T @ x / tokens).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_damped_cholesky_factors_in_place(dtype):
    moment = moment_of(200, 12, dtype=dtype)
    expected_shift = 0.05 * float(moment.double().diagonal().mean())
    reference = torch.linalg.cholesky(moment.double()
                                  + expected_shift * torch.eye(12, dtype=torch.float64))
    L, shift = damped_cholesky_(moment, 0.05)
    assert L.dtype == dtype and L.data_ptr() == moment.data_ptr()  # held once
    assert shift == pytest.approx(expected_shift)
    tolerance = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(L.double(), reference, rtol=tolerance, atol=tolerance)
    assert torch.equal(L, L.tril())


def test_a_failed_attempt_is_restored_and_the_shift_raised():
    """Rank 3 of 12 with no damping: the first attempt fails part-way through the matrix,
    which is rebuilt from its untouched triangle for the next, shifted attempt."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 12, generator=g, dtype=torch.float64)
    moment = x.T @ x
    original = moment.clone()
    L, shift = damped_cholesky_(moment, 0.0)
    assert shift > 0
    torch.testing.assert_close(L @ L.T, original + shift * torch.eye(12, dtype=torch.float64))


def test_whitening_factor_leaves_its_argument():
    moment = moment_of(100, 8)
    kept = moment.clone()
    L = whitening_factor(moment, 0.01)
    assert torch.equal(moment, kept) and L.dtype == torch.float64


@pytest.mark.parametrize("shape", [(6, 16), (16, 6), (10, 10)])
@pytest.mark.parametrize("fisher", [False, True])
def test_whitened_spectrum_equals_the_svd_of_the_whitened_weight(shape, fisher):
    """Wide, tall and square weights (each side's Gram matrix), with and without the output
    factor K: σ and the leading singular subspaces equal those of KᵀWL's SVD (fp64), and the
    moment is not copied but overwritten."""
    m, n = shape
    g = torch.Generator().manual_seed(m * n)
    weight = torch.randn(m, n, generator=g, dtype=torch.float64)
    moment = moment_of(300, n, seed=3)
    K = whitening_factor(moment_of(40, m, seed=4), 0.01) if fisher else None
    L = whitening_factor(moment, 0.05)
    whitened = weight @ L if K is None else K.T @ weight @ L
    U0, sigma0, _ = torch.linalg.svd(whitened, full_matrices=False)
    U, sigma = whitened_spectrum(weight, moment, 0.05, K)
    rank = min(m, n)
    assert U.shape == (m, rank) and sigma.shape == (rank,)
    torch.testing.assert_close(sigma, sigma0, rtol=1e-10, atol=1e-10)
    for r in (1, rank // 2, rank):  # projectors, which do not depend on the vectors' signs
        torch.testing.assert_close(U[:, :r] @ U[:, :r].T, U0[:, :r] @ U0[:, :r].T,
                                   rtol=1e-8, atol=1e-8)
        leading, sigma_r = whitened_spectrum(weight, moment_of(300, n, seed=3), 0.05, K, r)
        assert leading.shape == (m, r)  # only the leading components are computed
        torch.testing.assert_close(sigma_r, sigma0[:r], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(leading @ leading.T, U0[:, :r] @ U0[:, :r].T,
                                   rtol=1e-8, atol=1e-8)


def test_whitened_spectrum_of_a_rank_deficient_weight_gives_zero_components():
    """A weight of rank 2 in 5 rows: the spare σ are 0, not NaN, and the factors stay finite."""
    g = torch.Generator().manual_seed(5)
    weight = torch.randn(8, 2, generator=g, dtype=torch.float64) @ \
        torch.randn(2, 5, generator=g, dtype=torch.float64)
    U, sigma = whitened_spectrum(weight, moment_of(100, 5), 0.01)
    assert torch.isfinite(U).all() and torch.all(sigma[2:] < 1e-6 * sigma[0])
    A, B = one_shot_factors(weight, None, U, sigma, 2)
    assert torch.isfinite(A).all() and torch.isfinite(B).all()


@pytest.mark.parametrize("fisher", [False, True])
def test_factors_from_the_spectrum_equal_the_factors_through_L(fisher):
    """B = Σ_r^{-1/2}U_rᵀKᵀW equals √Σ_rV_rᵀL⁻¹ (with A = K⁻ᵀU_r√Σ_r): L is not needed."""
    torch.manual_seed(0)
    weight = torch.randn(10, 16, dtype=torch.float64)
    L = whitening_factor(moment_of(300, 16), 0.01)
    K = whitening_factor(moment_of(40, 10, seed=2), 0.01) if fisher else None
    whitened = weight @ L if K is None else K.T @ weight @ L
    svd = torch.linalg.svd(whitened, full_matrices=False)
    A0, B0 = unwhitened_factors(svd, L, 4)
    if K is not None:
        A0 = torch.linalg.solve_triangular(K.T, A0, upper=True)
    A, B = one_shot_factors(weight, K, svd[0], svd[1], 4)
    torch.testing.assert_close(A, A0)
    torch.testing.assert_close(B, B0)


def test_a_zero_singular_value_gives_a_zero_component():
    weight = torch.zeros(6, 8, dtype=torch.float64)
    weight[0, 0] = 1.0  # rank 1: σ_2.. are 0
    svd = torch.linalg.svd(weight, full_matrices=False)
    A, B = one_shot_factors(weight, None, svd[0], svd[1], 3)
    assert torch.isfinite(B).all()
    torch.testing.assert_close(A @ B, weight)


def test_fp32_whitening_stays_within_a_bound_of_fp64(tiny_llama):
    """One-shot SVD-LLM whitens in fp32 (a 1B model's down_proj moment is then 0.27 GB, not
    0.54, and held once). Against the same factors computed in fp64 from the same moments,
    each module's product A·B differs by less than 1e-4 of ‖W‖."""
    batches = random_batches()
    targets = block_linears(tiny_llama)
    dense = {name: linear.weight.detach().clone() for name, linear in targets.items()}
    stats = collect_linear_stats(tiny_llama, targets, batches, gram=True)
    ck.compress(tiny_llama, "svdllm", keep=0.5, calib=batches)
    differences = []
    for name, W in dense.items():
        module = tiny_llama.get_submodule(name)
        L = whitening_factor(stats[name].second_moment, 1e-4)
        A0, B0 = unwhitened_factors(torch.linalg.svd(W.double() @ L, full_matrices=False), L,
                                    module.rank)
        approx = (module.C.double() @ module.R.double()).detach()
        differences.append(float(torch.linalg.norm(approx - A0 @ B0) / torch.linalg.norm(W.double())))
    assert len(differences) == 35 and max(differences) < 1e-4, differences
