"""Which inputs of a refit layer to keep, chosen for the refit's own error.

Ridge-leverage scores (MoDeGPT's choice) rank the inputs by how much of the inputs' span each
one holds, whatever the layer does with it. When the layer is refit on the kept inputs —
min over Ŵ of E‖Wx − Ŵx̂_K‖², x the dense inputs, x̂ the compressed ones — that error has a
closed form for any K: E‖Wx‖² − tr(B_K G_KK⁻¹ B_Kᵀ) with G = E[x̂x̂ᵀ] and B = W·E[x x̂ᵀ]. Greedy
forward selection adds, one candidate at a time, the one that lowers it most: a pivoted
Cholesky of G in which each pivot is scored by the output it explains. A candidate may stand
for several inputs that are kept together (a value dimension shared by every query head of
its group feeds one o_proj input per head).
"""

import torch

from .calibration import PairedInputStats


def refit_moments(stats: PairedInputStats, centred: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(E[x̂x̂ᵀ], E[x x̂ᵀ]) in fp64, centred when the refit has a bias to absorb the means."""
    gram, cross = stats.second_moment.double(), stats.cross_moment.double()
    if centred:
        mean = stats.mean.double()
        gram = gram - torch.outer(mean, mean)
        cross = cross - torch.outer(stats.dense_mean.double(), mean)
    return gram, cross


def greedy_refit_selection(weight: torch.Tensor, stats: PairedInputStats, columns: torch.Tensor,
                           count: int, ridge: float, centred: bool = False) -> torch.Tensor:
    """The `count` candidates (rows of `columns`: candidate × the input indices it keeps)
    picked greedily for the least refit error of `weight` (see the module docstring), with
    ridge·mean(diag G) added to G's diagonal as the refit's damping adds it. Candidate
    indices, ascending.

    The residual G − G_:K G_KK⁻¹ G_K: is kept as G − LLᵀ (L: the pivoted Cholesky columns so
    far, inputs × picked inputs) and B's residual is updated in place, so a pick costs
    O(inputs · (picked + outputs)) and no inputs × inputs matrix is rewritten."""
    if columns.dim() != 2 or not 1 <= count <= columns.shape[0]:
        raise ValueError(f"count must be in [1, {columns.shape[0]}] candidates of a 2-d "
                         f"columns table, got {count} of shape {tuple(columns.shape)}")
    gram, cross = refit_moments(stats, centred)
    gram = gram + ridge * float(gram.diagonal().mean().clamp_min(1e-30)) * torch.eye(
        gram.shape[0], dtype=gram.dtype, device=gram.device)
    # Bᵀ = (W·E[x x̂ᵀ])ᵀ, what the outputs see, one row an input: its norms are row sums
    explained = cross.T @ weight.detach().double().T
    columns = columns.to(gram.device)
    width = columns.shape[1]
    factors = gram.new_zeros(gram.shape[0], count * width)  # L
    blocks = gram[columns[:, :, None], columns[:, None, :]]  # each candidate's residual G block
    free = torch.ones(columns.shape[0], dtype=torch.bool, device=gram.device)
    picks = []
    for step in range(count):
        # gain of candidate c: tr(B_c G_cc⁻¹ B_cᵀ) on the residuals after the picks so far
        open_ = free.nonzero().flatten()
        if width == 1:
            norms = explained.square().sum(1)
            gain = norms[columns[open_, 0]] / blocks[open_, 0, 0]
        else:
            outputs = explained[columns[open_]]  # (c, w, m)
            gain = (outputs * torch.linalg.solve(blocks[open_], outputs)).sum((1, 2))
        pick = int(open_[gain.argmax()])
        picks.append(pick)
        free[pick] = False
        kept, done = columns[pick], step * width
        residual = gram[:, kept] - factors[:, :done] @ factors[kept, :done].T  # G_res[:, K]
        pivot = torch.linalg.cholesky(residual[kept])  # G_res[K, K] = PPᵀ
        new = torch.linalg.solve_triangular(pivot, residual.T, upper=False).T
        factors[:, done:done + width] = new
        # B ← B − B_K G_KK⁻¹ G_K: = B − (B_K P⁻ᵀ)·newᵀ; G ← G − new·newᵀ on the candidates' blocks
        scaled = torch.linalg.solve_triangular(pivot, explained[kept], upper=False)  # (w, m)
        explained.addmm_(new, scaled, alpha=-1)
        rows = new[columns]  # (c, w, w)
        blocks = blocks - rows @ rows.transpose(1, 2)
    return torch.sort(torch.tensor(picks, device=columns.device)).values
