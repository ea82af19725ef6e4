"""Arithmetic on a layer's factors: folding a link U into C, and the truncated SVD."""

import torch


def fold_link(C: torch.Tensor, U: torch.Tensor | None,
              compute: torch.dtype = torch.float64) -> torch.Tensor:
    """C·U (C·diag(U) for a 1-D U; C itself without U), computed in `compute` and returned in
    C's dtype: the expand factor of the two-factor form of y = ((x·Rᵀ)·Uᵀ)·Cᵀ.

    fp64 by default, for a fold that is kept (`CURLinear.fold`, loading into vLLM); a fold
    redone on every call (the prefill kernel's host) passes fp32.
    """
    if U is None:
        return C
    expand, link = C.to(compute), U.to(compute)
    return (expand * link if U.dim() == 1 else expand @ link).to(C.dtype)


def truncated_svd(matrix: torch.Tensor, rank: int | None = None,
                  compute: torch.dtype = torch.float64
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U_r (m×r), σ_r (r,), V_rᵀ (r×n)), the leading `rank` singular triplets of `matrix`
    (every one when rank is None), computed in `compute`: U_r·diag(σ_r)·V_rᵀ is its best
    rank-r approximation. fp64 by default, for factors that are kept; CUR's selection, which
    only ranks rows and columns by the singular vectors, passes fp32."""
    m, n = matrix.shape
    if rank is not None and not (isinstance(rank, int) and 1 <= rank <= min(m, n)):
        raise ValueError(f"rank must be in [1, min(m, n) = {min(m, n)}] for a {m}×{n} matrix, "
                         f"got {rank!r}")
    matrix = matrix.detach().to(compute)
    if not torch.isfinite(matrix).all():
        raise ValueError("the matrix holds NaN or Inf: cannot factor it")
    left, sigma, right = torch.linalg.svd(matrix, full_matrices=False)
    return left[:, :rank], sigma[:rank], right[:rank]


def split_evenly(left: torch.Tensor, sigma: torch.Tensor, right: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(U·√Σ, √Σ·Vᵀ): a truncated SVD as two factors of equal scale."""
    root = sigma.sqrt()
    return left * root, root[:, None] * right
