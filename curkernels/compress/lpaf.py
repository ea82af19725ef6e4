"""LPAF (low-rank prune-and-factorize, arXiv 2306.14152). The paper has no public code; this
is the reading implemented, step by step, and why:

1. **First-order pruning.** Importance I = E_batches|W ⊙ ∂L/∂W|. With `importance="loss"`
   (the paper's) L is the whole model's loss (`first_order_importance`: next-token loss for
   causal LMs, distillation to the dense outputs for encoders); with `importance="block"` it
   is each block's output distilled to the dense block's (`block_output_importance`, on the
   dense model's block inputs), which needs one block at a time and so streams. The
   `sparsity` fraction of each matrix's entries with the smallest importance is zeroed — the
   paper's observation is that first-order pruning leaves a matrix of lower effective rank
   than magnitude pruning, so it factors with less loss.
2. **Sparsity-aware SVD.** The factors minimise the importance-weighted error on the pruned
   matrix, Σ_ij Ω_ij (P_ij − (AB)_ij)², with Ω = I / mean(I) + `weight_floor` (the floor
   keeps every entry in the objective, so pruned entries are pulled towards 0 rather than
   left free). There is no closed form for an element-wise weighted low-rank fit, so we run
   alternating weighted least squares — each row of A, then each column of B, is an exact
   r×r weighted ridge solve — started from the plain truncated SVD of P; each sweep cannot
   increase the objective, so the result beats plain SVD on it. The product is
   re-factored by SVD at the end so that components come in descending energy, which the
   mixed-rank step needs.
3. **Mixed-rank fine-tuning** (when `mixed_rank_steps` > 0): A and B (each layer's C and R)
   learn with the healing loss against the dense model; every step samples a rank k uniformly in
   [r_min, r] (r_min = ⌈`min_rank_fraction`·r⌉) and runs each module with its leading k
   components (C[:, :k], R[:k]), so the leading components learn to stand on their own;
   the last `full_rank_steps` steps use the target rank r, at which the model ends.
"""

import copy
import functools
import math
import random

import torch
import torch.nn.functional as F
from torch import nn

from ..nn import CURLinear
from ..ops.factors import split_evenly, truncated_svd
from .calibration import block_output_importance, collect_linear_stats, first_order_importance
from .healing import train_factors
from .layer_selection import block_list
from .lowrank import bias_of, replace_with_low_rank
from .replay import capture_block_inputs, next_block_inputs, targets_in_block
from .report import ModuleReport


def prune_by_importance(weight: torch.Tensor, importance: torch.Tensor,
                        sparsity: float) -> torch.Tensor:
    """`weight` with the `sparsity` fraction of least important entries set to 0."""
    if not 0 <= sparsity < 1:
        raise ValueError(f"sparsity must be a fraction in [0, 1), got {sparsity!r}")
    drop = int(sparsity * weight.numel())
    if drop == 0:
        return weight.clone()
    threshold = importance.flatten().kthvalue(drop).values
    return torch.where(importance > threshold, weight, torch.zeros_like(weight))


def weighted_objective(target: torch.Tensor, weights: torch.Tensor, A: torch.Tensor,
                       B: torch.Tensor) -> float:
    return float((weights * (target - A @ B) ** 2).sum())


def _weighted_rows(target: torch.Tensor, weights: torch.Tensor, basis: torch.Tensor,
                   ridge: float, chunk: int = 256) -> torch.Tensor:
    """Rows a_i = argmin Σ_j w_ij (t_ij − a_i·b_j)² for basis B (r×n): (B W_i Bᵀ) a_i = B W_i t_i.
    The normal matrices are symmetric positive definite (w > 0 and the ridge), so Cholesky
    solves them; batched LU (torch.linalg.solve) failed inside oneMKL on some of them
    ("Parameter 6 was incorrect on entry to DLASWP", torch 2.14 CPU)."""
    r = basis.shape[0]
    eye = ridge * torch.eye(r, dtype=basis.dtype, device=basis.device)
    rows = []
    for start in range(0, target.shape[0], chunk):
        w, t = weights[start:start + chunk], target[start:start + chunk]
        gram = torch.einsum("ij,rj,sj->irs", w, basis, basis) + eye
        rhs = (w * t) @ basis.T
        rows.append(torch.cholesky_solve(rhs.unsqueeze(-1), torch.linalg.cholesky(gram))
                    .squeeze(-1))
    return torch.cat(rows)


def weighted_low_rank(target: torch.Tensor, weights: torch.Tensor, rank: int,
                      sweeps: int = 4, ridge: float = 1e-8) -> tuple[torch.Tensor, torch.Tensor]:
    """A (m×r), B (r×n) fitting `target` under element weights, by alternating least squares
    from the truncated SVD; returned re-factored as (U_r√Σ, √ΣV_rᵀ) of the product (fp64)."""
    if weights.shape != target.shape or (weights < 0).any():
        raise ValueError("weights must be non-negative and shaped like the target")
    target, weights = target.double(), weights.double()
    A, B = split_evenly(*truncated_svd(target, rank))
    scale = ridge * float(weights.mean())
    for _ in range(sweeps):
        A = _weighted_rows(target, weights, B, scale)
        B = _weighted_rows(target.T, weights.T, A.T, scale).T
    return split_evenly(*truncated_svd(A @ B, rank))


def _leading_forward(module: CURLinear, k: int, x: torch.Tensor) -> torch.Tensor:
    return F.linear(F.linear(x, module.R[:k]), module.C[:, :k], module.bias)


def use_leading_components(modules: list[CURLinear], fraction: float) -> None:
    """Run each module with its leading ⌈fraction·r⌉ components (C[:, :k], R[:k]) until
    `use_all_components`; an instance-level forward, so the module class is untouched."""
    for module in modules:
        module.forward = functools.partial(_leading_forward, module,
                                           max(1, math.ceil(fraction * module.rank)))


def use_all_components(modules: list[CURLinear]) -> None:
    for module in modules:
        module.__dict__.pop("forward", None)


def mixed_rank_finetune(model: nn.Module, teacher: nn.Module, modules: list[CURLinear],
                        data, steps: int, *, lr: float, min_rank_fraction: float,
                        full_rank_steps: int, seed: int = 0) -> list[float]:
    """Train C and R of `modules` towards `teacher`, each step at a rank fraction drawn
    uniformly from [min_rank_fraction, 1]; the final `full_rank_steps` steps at full rank."""
    if not 0 < min_rank_fraction <= 1:
        raise ValueError(f"min_rank_fraction must be in (0, 1], got {min_rank_fraction!r}")
    rng = random.Random(seed)
    params = [p for m in modules for p in (m.C, m.R)]
    trained = {id(p) for p in params}
    flags = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in trained)

    def sample_rank(step: int) -> None:
        full = step >= steps - full_rank_steps
        use_leading_components(modules, 1.0 if full else rng.uniform(min_rank_fraction, 1.0))

    try:
        return train_factors(model, teacher, data, params, steps, lr, before_step=sample_rank,
                             desc="lpaf mixed-rank")
    finally:
        use_all_components(modules)
        for p, flag in flags.items():
            p.requires_grad_(flag)


IMPORTANCES = ("loss", "block")


def blockwise_importance(model: nn.Module, targets: dict[str, nn.Linear], calib, *,
                         seed: int) -> dict[str, torch.Tensor]:
    """`block_output_importance` of every target, block by block on the dense model's block
    inputs (each block's scores from the same seed, as streaming computes them)."""
    prefix, blocks = block_list(model)
    inside = {name for i in range(len(blocks)) for name in targets_in_block(targets, prefix, i)}
    outside = [name for name in targets if name not in inside]
    if outside:
        raise ValueError(f"importance='block' scores targets inside {prefix}; {outside[0]!r} "
                         f"lies outside: use importance='loss'")
    inputs = capture_block_inputs(model, blocks[0], calib)
    scores = {}
    for index, block in enumerate(blocks):
        local = targets_in_block(targets, prefix, index)
        if local:
            scores |= block_output_importance(block, local, inputs, seed=seed)
        if len(scores) == len(targets):
            break
        inputs = next_block_inputs(block, inputs)
    return scores


def prune_and_factorize(model: nn.Module, targets: dict[str, nn.Linear], keep: float,
                        importance: dict[str, torch.Tensor], calib, *, rank_multiple: int,
                        sparsity: float, weight_floor: float, sweeps: int) -> list[ModuleReport]:
    """Steps 1 and 2 on scores already taken: prune each target by `importance`, factor the
    rest by importance-weighted ALS, and swap the factors in (reports measured on `calib`)."""
    stats = collect_linear_stats(model, targets, calib, desc="lpaf calibration")

    def factorize(name, linear, rank):
        score = importance[name]
        if not torch.isfinite(score).all():
            raise ValueError(f"the importance of {name!r} holds NaN or Inf")
        pruned = prune_by_importance(linear.weight.detach().double(), score, sparsity)
        weights = score / score.mean().clamp_min(1e-30) + weight_floor
        return (*weighted_low_rank(pruned, weights, rank, sweeps), bias_of(linear))

    return replace_with_low_rank(model, targets, keep, rank_multiple, factorize, stats)


def compress_lpaf(model: nn.Module, targets: dict[str, nn.Linear], keep: float, *, calib,
                  rank_multiple: int, importance: str, sparsity: float, weight_floor: float,
                  sweeps: int, mixed_rank_steps: int, lr: float, min_rank_fraction: float,
                  full_rank_steps: int | None, teacher: nn.Module | None, train_data,
                  seed: int) -> list[ModuleReport]:
    """Prune by first-order importance (`importance`: "loss" or "block", see the module
    docstring), factor by importance-weighted ALS, then (if `mixed_rank_steps` > 0)
    mixed-rank fine-tuning on `train_data` (input dicts; `calib` when None) towards `teacher`
    (a frozen deep copy of the dense model when None). Options as `LPAFConfig` checks them."""
    if mixed_rank_steps > 0 and teacher is None:
        teacher = copy.deepcopy(model).eval()
    scores = blockwise_importance(model, targets, calib, seed=seed) if importance == "block" \
        else first_order_importance(model, targets, calib, seed=seed)
    reports = prune_and_factorize(model, targets, keep, scores, calib,
                                  rank_multiple=rank_multiple, sparsity=sparsity,
                                  weight_floor=weight_floor, sweeps=sweeps)
    if mixed_rank_steps > 0:
        modules = [model.get_submodule(name) for name in targets]
        tail = max(1, mixed_rank_steps // 10) if full_rank_steps is None else full_rank_steps
        data = calib if train_data is None else train_data
        mixed_rank_finetune(model, teacher, modules, data, mixed_rank_steps, lr=lr,
                            min_rank_fraction=min_rank_fraction, full_rank_steps=tail,
                            seed=seed)
    return reports
