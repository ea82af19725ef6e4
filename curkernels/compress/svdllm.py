"""SVD-LLM (Wang et al. 2024): truncation-aware whitening. With XᵀX = LLᵀ (Cholesky of the
damped input Gram matrix), the singular values of W·L are exactly the output errors
‖(W − Ŵ)X‖ each truncated component costs, so truncating the SVD of W·L is optimal for the
calibration outputs: W ≈ (U_r√Σ)·(√ΣV_rᵀL⁻¹).

`sequential=True` calibrates block by block, in forward order, as ROM does: each Linear sees
the inputs x̂ produced by the already-compressed layers before it, and its factors fit the
*dense* layer's outputs on the same tokens, min ‖Wx + b − (Ŵx̂ + b̂)‖² over rank-r Ŵ and b̂.
With E[x̂x̂ᵀ] = LLᵀ and M = W·E[x x̂ᵀ]·L⁻ᵀ the objective is ‖Ŵ·L − M‖² + const, so the
truncated SVD of M gives Ŵ = M_r·L⁻¹ (reduced-rank regression; for x̂ = x, M = W·L and this
is SVD-LLM itself). The damping adds δ‖Ŵ − W‖²: directions the data leaves unexcited keep
the dense weight. A bias absorbs the mean: the moments are then centred and
b̂ = b + W·E[x] − Ŵ·E[x̂]. Errors made early are thus corrected downstream instead of
compounded (the dense twin of each block is kept while the block is compressed).
"""

import copy

import numpy as np
import scipy.linalg
import torch
from scipy.linalg import get_lapack_funcs
from torch import nn

from ..ops.factors import split_evenly, truncated_svd
from .calibration import (
    CHUNK_VALUES,
    PairedInputStats,
    collect_linear_stats,
    model_device,
    output_fisher,
    paired_input_stats,
    to_device,
    token_mask,
)
from .layer_selection import block_list
from .lowrank import allocate_ranks, bias_of, replace_with_low_rank
from .replay import (
    block_passes,
    capture_block_inputs,
    forward_order,
    next_block_inputs,
    targets_in_block,
)
from .report import ModuleReport

ALLOCATIONS = ("uniform", "global")
# one-shot whitening (Gram matrix, its Cholesky factor, the whitened spectrum) in fp32: the
# n×n matrix of a wide input (8192 for a 1B model's down_proj) is then 0.27 GB instead of
# 0.54, held once; the factors are returned in fp64 as every method's are
WHITENING_DTYPE = torch.float32
WEIGHTINGS = ("inputs", "fisher")


def whitening_factor(second_moment: torch.Tensor, damping: float) -> torch.Tensor:
    """Lower Cholesky factor of E[xxᵀ] + damping·mean(diag)·I, fp64, `second_moment` left
    as it is. The damping keeps it positive definite when some input directions are never
    excited."""
    return damped_cholesky_(second_moment.to(torch.float64, copy=True), damping)[0]


def damped_cholesky_(moment: torch.Tensor, damping: float) -> tuple[torch.Tensor, float]:
    """(L, δ) with LLᵀ = moment + δ·I, δ = damping·mean(diag), raised tenfold while rounding
    leaves the matrix indefinite; in `moment`'s dtype. On the CPU in place: L is a
    (transposed) view of `moment`'s memory, so the n×n matrix is held once (LAPACK's potrf
    writes one triangle; the other keeps the matrix, from which a failed attempt is
    restored)."""
    if moment.dim() != 2 or moment.shape[0] != moment.shape[1] or not moment.is_contiguous():
        raise ValueError(f"moment must be a contiguous square matrix, got shape "
                         f"{tuple(moment.shape)}")
    diagonal = moment.diagonal().clone()
    scale = float(diagonal.double().mean().clamp_min(1e-12))
    shift = damping * scale
    if moment.device.type != "cpu":  # potrf in place is LAPACK's (CPU); a GPU factors a copy
        factor, info = torch.linalg.cholesky_ex(_plus_diagonal(moment, shift))
        while int(info) > 0:
            shift = max(shift * 10, 1e-10 * scale)
            factor, info = torch.linalg.cholesky_ex(_plus_diagonal(moment, shift))
        return factor, shift
    # the symmetric matrix read column-major is itself: potrf works on it where it lies
    array = moment.detach().numpy().T
    (potrf,) = get_lapack_funcs(("potrf",), (array,))
    factor = moment.detach().mT
    while True:
        factor.diagonal().copy_(diagonal + shift)
        result, info = potrf(array, lower=True, overwrite_a=True, clean=False)
        if not np.shares_memory(result, array):
            raise RuntimeError("potrf did not factor the matrix in place")
        if info == 0:
            return factor.tril_(), shift
        if info < 0:
            raise ValueError(f"potrf rejected argument {-info}")
        _restore_lower(factor)
        shift = max(shift * 10, 1e-10 * scale)


def _restore_lower(matrix: torch.Tensor, block: int = 1024) -> None:
    """The strict lower triangle of `matrix` copied back from its strict upper one (which a
    lower-triangle factorisation leaves untouched), a block of rows at a time."""
    n = matrix.shape[0]
    for start in range(0, n, block):
        stop = min(start + block, n)
        matrix[start:stop, :start] = matrix[:start, start:stop].mT
        square = matrix[start:stop, start:stop]
        upper = square.triu(1)
        square.copy_(upper + upper.mT)  # the diagonal is set again before each attempt


def _plus_diagonal(matrix: torch.Tensor, shift: float) -> torch.Tensor:
    """matrix + shift·I, without an n×n identity beside it (the same numbers: an
    off-diagonal entry plus 0 is itself)."""
    out = matrix.clone()
    out.diagonal().add_(shift)
    return out


def unwhitened_factors(whitened_svd, L: torch.Tensor, rank: int):
    """(A, B) with A·B = (the rank-r truncation of the whitened matrix)·L⁻¹; `whitened_svd`
    holds at least `rank` leading singular triplets (`truncated_svd`)."""
    left, sigma, right_t = whitened_svd
    A, B_white = split_evenly(left[:, :rank], sigma[:rank], right_t[:rank])
    # B = B_white·L⁻¹, i.e. Bᵀ = L⁻ᵀ·B_whiteᵀ: a triangular solve, no inverse formed
    return A, torch.linalg.solve_triangular(L.T, B_white.T, upper=True).T


def whiten(weight: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
    """W·L in L's dtype, a block of W's rows at a time (no copy of W in that dtype)."""
    rows = max(1, CHUNK_VALUES // max(weight.shape[1], 1))
    out = torch.empty(weight.shape[0], L.shape[1], dtype=L.dtype, device=L.device)
    for start in range(0, weight.shape[0], rows):
        out[start:start + rows] = weight[start:start + rows].detach().to(L.dtype) @ L
    return out


def whitened_spectrum(weight: torch.Tensor, moment: torch.Tensor, damping: float,
                      K: torch.Tensor | None = None, rank: int | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(U_r, σ_r), descending, the leading `rank` (None: all) singular values and left vectors
    of A = KᵀWL with LLᵀ = `moment` + δI (`damped_cholesky_`, in place of `moment`; K =
    identity when None): all `one_shot_factors` needs. A is formed in `moment`'s dtype; its
    spectrum comes from the leading eigenpairs of the smaller of its Gram matrices, AAᵀ (then
    U directly) or AᵀA (then U = AVΣ⁻¹ = KᵀW·LVΣ⁻¹), summed in fp64 so that squaring loses
    nothing A's own rounding did not: several times faster than A's SVD and without its
    workspace (0.2 GB for a 1B model's down_proj). σ below A's rounding (numpy's
    matrix_rank bound) is noise, and AVσ⁻¹ would make of it a direction not orthogonal to
    the others: such components count as 0."""
    L = damped_cholesky_(moment, damping)[0]
    whitened = whiten(weight, L)
    if K is not None:
        whitened = K.T.to(whitened.dtype) @ whitened
    dtype, wide = whitened.dtype, whitened.shape[0] <= whitened.shape[1]
    noise = max(whitened.shape) * torch.finfo(dtype).eps
    gram = gram64(whitened if wide else whitened.T)
    del whitened
    sigma, vectors = leading_eigenpairs(gram, min(gram.shape[0], rank or gram.shape[0]))
    sigma = sigma.clamp_min(0).sqrt()
    sigma = torch.where(sigma > noise * float(sigma[0]), sigma, torch.zeros_like(sigma))
    if wide:
        return vectors, sigma
    inverse = torch.where(sigma > 0, 1 / sigma, torch.zeros_like(sigma))
    left = whiten(weight, L @ (vectors * inverse).to(dtype))
    return (left if K is None else K.T.to(dtype) @ left), sigma


def leading_eigenpairs(symmetric: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The `count` largest eigenvalues of `symmetric`, descending, and their eigenvectors;
    `symmetric` is overwritten. On the CPU only those are computed (LAPACK's MRRR on a
    subset: less time, and no n×n eigenvector matrix beside the input)."""
    n = symmetric.shape[0]
    if symmetric.device.type != "cpu":
        values, vectors = torch.linalg.eigh(symmetric)
        return values.flip(0)[:count], vectors.flip(1)[:, :count]
    # a symmetric matrix read column-major is itself: LAPACK takes it where it lies
    values, vectors = scipy.linalg.eigh(symmetric.numpy().T, subset_by_index=[n - count, n - 1],
                                        driver="evr", overwrite_a=True, check_finite=False)
    return torch.from_numpy(values).flip(0), torch.from_numpy(vectors).flip(1)


def gram64(matrix: torch.Tensor) -> torch.Tensor:
    """matrix·matrixᵀ in fp64, a block of columns at a time (no fp64 copy of the matrix)."""
    rows, columns = matrix.shape
    out = torch.zeros(rows, rows, dtype=torch.float64, device=matrix.device)
    step = max(1, CHUNK_VALUES // max(rows, 1))
    for start in range(0, columns, step):
        block = matrix[:, start:start + step].double()
        out.addmm_(block, block.T)
    return out


def one_shot_factors(weight: torch.Tensor, K: torch.Tensor | None, left: torch.Tensor,
                     sigma: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B), fp64, with A·B = K⁻ᵀ·[KᵀWL]_r·L⁻¹ from the SVD UΣVᵀ of KᵀWL (K = identity when
    None): A = K⁻ᵀU_r√Σ_r and B = √Σ_rV_rᵀL⁻¹ = Σ_r^{-1/2}U_rᵀKᵀW, as V_rᵀ = Σ_r⁻¹U_rᵀKᵀWL.
    So L is not needed (and A·B = K⁻ᵀU_rU_rᵀKᵀW, a projection of W). A zero σ gives a zero
    component."""
    weight = weight.detach()
    left, root = left[:, :rank].to(torch.float64, copy=True), sigma[:rank].double().sqrt()
    inverse_root = torch.where(root > 0, 1 / root, torch.zeros_like(root))
    projector = left if K is None else K.double() @ left  # B = Σ^{-1/2}·(KU_r)ᵀW
    columns = max(1, CHUNK_VALUES // max(weight.shape[0], 1))
    B = torch.empty(rank, weight.shape[1], dtype=torch.float64, device=weight.device)
    for start in range(0, weight.shape[1], columns):
        B[:, start:start + columns] = projector.T @ weight[:, start:start + columns].double()
    B.mul_(inverse_root[:, None])
    del projector
    # in place: one m×r fp64 matrix at a time (54 MB for a 1B model's gate_proj)
    return fisher_unwhitened(left.mul_(root), None if K is None else K.double()), B


def fisher_unwhitened(A: torch.Tensor, K: torch.Tensor | None) -> torch.Tensor:
    """A = K⁻ᵀ·A_white: the expand factor back from the output-Fisher-whitened space."""
    return A if K is None else torch.linalg.solve_triangular(K.T, A, upper=True)


def mean_absorbing_bias(bias: torch.Tensor, weight: torch.Tensor, dense_mean: torch.Tensor,
                        A: torch.Tensor, B: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """b̂ = b + W·E[x] − AB·E[x̂]: the mean output error of the factored layer moved into its
    bias (fp64)."""
    return bias.double() + weight.detach().double() @ dense_mean - A @ (B @ mean)


def fitted_factors(weight: torch.Tensor, bias: torch.Tensor | None, stats: PairedInputStats,
                   rank: int, damping: float, output_factor: torch.Tensor | None = None):
    """(A, B, b̂) minimising E‖Kᵀ(Wx + b − (ABx̂ + b̂))‖² over the paired calibration tokens
    (b̂ = b when there is no bias to absorb the mean), fp64. K = `output_factor` (KKᵀ the
    output Fisher, see `compress_svdllm`), or the identity: the rank-r truncation is then of
    Kᵀ·M, and A comes back as K⁻ᵀ·A. The bias needs no K: it zeroes the mean error."""
    w = weight.detach().double()
    second, cross = stats.second_moment, stats.cross_moment
    if bias is not None:
        second = second - torch.outer(stats.mean, stats.mean)
        cross = cross - torch.outer(stats.dense_mean, stats.mean)
    L, shift = damped_cholesky_(second, damping)  # `second` is a fresh matrix
    # the damping δ also pulls Ŵ towards W (not towards 0) where x̂ barely varies: the term
    # δ‖Ŵ − W‖² turns C into C + δI, so for x̂ = x, M = W·L exactly as in SVD-LLM.
    # M = W·(C + δI)·L⁻ᵀ, i.e. Mᵀ = L⁻¹·(W·(C + δI))ᵀ
    cross = _plus_diagonal(cross, shift)
    target = torch.linalg.solve_triangular(L, (w @ cross).T, upper=False).T
    if output_factor is not None:
        target = output_factor.T @ target
    A, B = unwhitened_factors(truncated_svd(target, rank), L, rank)
    A = fisher_unwhitened(A, output_factor)
    if bias is not None:
        bias = mean_absorbing_bias(bias, w, stats.dense_mean, A, B, stats.mean)
    return A, B, bias


def compress_svdllm(model: nn.Module, targets: dict[str, nn.Linear], keep: float, *, calib,
                    rank_multiple: int, damping: float, allocation: str, sequential: bool,
                    weighting: str, fisher_damping: float, encoder_target: str,
                    centered: bool) -> list[ModuleReport]:
    """`allocation="uniform"`: every module keeps `keep` of its entries. `"global"`: ranks share
    the whole budget (`allocate_ranks` on the whitened spectra, which measure each module's
    output error; the SVDs are kept in memory until all modules are factored). With
    `sequential=True` the global ranks come from a first, dense calibration pass.

    `weighting="fisher"` whitens the output side too: with E[ggᵀ] + δ_F·I = KKᵀ the output
    Fisher (`output_fisher`, δ_F = `fisher_damping`·mean(diag)), the loss increase of an error
    Δ is ≈ ½‖KᵀΔL‖² (the Kronecker-factored curvature E[xxᵀ] ⊗ E[ggᵀ]), so the truncated SVD
    of KᵀWL is optimal for it: W ≈ (K⁻ᵀU_r√Σ)·(√ΣV_rᵀL⁻¹). Its squared singular values are
    in loss units in every module, so global allocation ranks them as they are instead of as
    shares of each module's error. With `sequential=True` each fit weighs its output error by
    the dense model's K the same way (`fitted_factors`). For sentence encoders
    `encoder_target="pooled"` takes that Fisher from the normalised mean-pooled embedding
    instead of every token's hidden state (`calibration_loss`).

    `centered=True` (one-shot): a Linear with a bias is whitened by the input covariance
    E[xxᵀ] − μμᵀ instead of the second moment, and the bias absorbs the mean error,
    b̂ = b + (W − AB)·μ — the rank is then not spent on the mean input μ, and the
    calibration output error E‖(W − AB)(x − μ)‖² is the minimum over rank-r AB and b̂
    (the sequential fit always centres this way). Options as `SVDLLMConfig` checks them."""
    stats = None
    if allocation == "global" or not sequential:
        stats = collect_linear_stats(model, targets, calib, gram=True, gram_dtype=WHITENING_DTYPE,
                                     desc="svd-llm calibration")
    fisher = (output_fisher(model, targets, calib, encoder_target=encoder_target)
              if weighting == "fisher" else {})

    def input_moment(name, linear):
        """E[xxᵀ] (centred: minus μμᵀ) made in place of the Gram matrix, which it replaces."""
        module_stats = stats[name]
        moment, module_stats.gram = module_stats.gram, None
        moment.div_(max(module_stats.tokens, 1))
        if centered and linear.bias is not None:
            mean = module_stats.mean.to(moment.dtype)
            moment.addr_(mean, mean, alpha=-1)
        return moment

    def spectrum(name, linear, rank=None):
        """(K, U_r, σ_r) of the SVD UΣVᵀ of KᵀWL (K the identity without Fisher weighting),
        the leading `rank` components (None: all)."""
        K = whitening_factor(fisher[name], fisher_damping) if fisher else None
        return K, *whitened_spectrum(linear.weight, input_moment(name, linear), damping, K,
                                     rank)

    svds = {name: spectrum(name, linear) for name, linear in targets.items()} \
        if allocation == "global" else {}
    ranks = None
    if svds:
        ranks = allocate_ranks({name: (sigma.double() ** 2, *targets[name].weight.shape)
                                for name, (_, _, sigma) in svds.items()}, keep, rank_multiple,
                               relative=not fisher)
    if sequential:
        svds.clear()  # only the ranks are needed: the sequential fit redoes each SVD
        output_factors = {name: whitening_factor(f, fisher_damping)
                          for name, f in fisher.items()}
        return _compress_sequential(model, targets, keep, calib, rank_multiple, damping, ranks,
                                    output_factors)

    def factorize(name, linear, rank):
        K, left, sigma = svds.pop(name) if svds else spectrum(name, linear, rank)
        A, B = one_shot_factors(linear.weight, K, left, sigma, rank)
        bias = bias_of(linear)
        if centered and bias is not None:
            mean = stats[name].mean
            bias = mean_absorbing_bias(bias, linear.weight, mean, A, B, mean)
        return A, B, bias

    return replace_with_low_rank(model, targets, keep, rank_multiple, factorize, stats, ranks)


def _compress_sequential(model, targets, keep, calib, rank_multiple, damping, ranks,
                         output_factors) -> list[ModuleReport]:
    """Two streams of cached block inputs, dense and compressed (`compress_block_sequential`
    does each block). Targets outside the blocks are done last from whole-model passes of the
    compressed model (x̂ on both sides). `output_factors`: each target's output-Fisher factor
    K (of the dense model), or empty."""
    prefix, blocks = block_list(model)
    inputs = capture_block_inputs(model, blocks[0], calib)
    dense_inputs = inputs
    reports = []
    remaining = dict(targets)
    replace = sequential_replacer(model, keep, rank_multiple, damping, ranks, output_factors)
    for index, block in enumerate(blocks):
        inside = targets_in_block(remaining, prefix, index)
        for name in inside:
            del remaining[name]
        block_reports, dense_block = compress_block_sequential(
            f"{prefix}.{index}", block, inside, inputs, dense_inputs, replace)
        reports += block_reports
        if not remaining:
            break
        dense_inputs = next_block_inputs(dense_block, dense_inputs)
        inputs = next_block_inputs(block, inputs)
    device = model_device(model)
    for name, linear in remaining.items():  # outside the blocks: the compressed model's inputs
        passes = ((token_mask(batch), lambda batch=batch: model(**batch), None)
                  for batch in (to_device(batch, device) for batch in calib))
        reports += replace(name, linear, paired_input_stats(name, linear, linear, passes,
                                                            desc=f"svd-llm {name}"))
    return reports


def sequential_replacer(model, keep, rank_multiple, damping, ranks, output_factors):
    """(name, linear, paired stats) -> reports: swaps `linear` inside `model` for the factors
    `fitted_factors` gives, at `ranks[name]` or the budget rank."""
    def replace(name, linear, stats):
        return replace_with_low_rank(
            model, {name: linear}, keep, rank_multiple,
            lambda _, lin, rank: fitted_factors(lin.weight, bias_of(lin), stats, rank, damping,
                                                output_factors.get(name)),
            {name: stats}, None if ranks is None else {name: ranks[name]})
    return replace


def compress_block_sequential(block_name: str, block: nn.Module, targets: dict[str, nn.Linear],
                              inputs, dense_inputs, replace) -> tuple[list[ModuleReport],
                                                                       nn.Module]:
    """Fit the `targets` of one block (full names under `block_name`) in forward order, each
    on the block as compressed so far (`inputs`) against its dense twin (`dense_inputs`); the
    block is copied before its first target is replaced, so the twin stays dense. Returns the
    reports and the dense twin (the block itself when it has no targets)."""
    dense_block = copy.deepcopy(block) if targets else block
    reports = []
    for name in forward_order(block, targets, *inputs[0][1:]):
        linear = targets[name]
        twin = dense_block.get_submodule(name[len(f"{block_name}."):])
        passes = ((mask, run_dense, run) for (mask, run_dense), (_, run) in zip(
            block_passes(dense_block, dense_inputs), block_passes(block, inputs), strict=True))
        stats = paired_input_stats(name, twin, linear, passes, desc=f"svd-llm {name}")
        reports += replace(name, linear, stats)
    return reports, dense_block
