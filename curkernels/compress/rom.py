"""ROM (reduced order modelling of latent features, arXiv 2312.07046).

Layer by layer in forward order, each Linear is calibrated on inputs produced by the
already-compressed layers before it (so errors are corrected downstream, not compounded).
For outputs y = Wx + b with mean μ and mean-centred covariance Σ_y = E[(y − μ)(y − μ)ᵀ],
the symmetric eigensolver gives eigenvectors in descending eigenvalue order; V_r (m×r) keeps
the leading r. The layer is re-parameterised as

    y' = V_r·(V_rᵀW)·x + b',    b' = V_rV_rᵀb + (I − V_rV_rᵀ)μ,

i.e. y' = μ + V_rV_rᵀ(y − μ): the centred output projected on its r principal directions,
whose mean is exactly μ (E[y'] = V_rV_rᵀ(μ − b) + V_rV_rᵀb + (I − V_rV_rᵀ)μ = μ).
Stored as A = V_r (m×r), B = V_rᵀW (r×n). The budget rule r = ⌊keep·mn/(m+n)⌋ is the
largest rank whose factors fit `keep` of the layer (`rank_for_keep`); `layers=` picks the
blocks (the paper compresses the last N). Everything runs on the model's device — a CPU is
enough, as in the paper.

Presets (`compress(..., preset="80%")`, `ROM_PRESETS`): the paper's three settings for
LLaMA-7B (32 blocks), named by the fraction of the whole model's parameters that remain —
90%: the last 8 blocks at keep 0.60; 80%: the last 12 at 0.46; 50%: the last 24 at 0.33.
Later blocks are chosen because errors made early are compounded by every block after them.
The block count scales with depth (a quarter, 3/8 and 3/4 of the blocks). The paper's ranks
follow the rule (4096×4096: 1228, 675; 4096×11008: 1791, 1373, 985) except 954 for
4096×4096 at 0.46, where the rule gives 942.
"""

import math
from dataclasses import dataclass

import torch
from torch import nn

from .calibration import collect_linear_stats, stats_from_passes
from .layer_selection import block_list
from .lowrank import bias_of, replace_with_low_rank
from .replay import (
    block_passes,
    capture_block_inputs,
    forward_order,
    next_block_inputs,
    targets_in_block,
)
from .report import ModuleReport


@dataclass(frozen=True)
class BudgetPreset:
    """Compress the last `block_fraction` of the blocks, each targeted Linear at `keep`."""
    keep: float
    block_fraction: float

    def layers(self, num_blocks: int) -> list[int]:
        """The last round(block_fraction·num_blocks) block indices (at least one)."""
        count = min(num_blocks, max(1, math.floor(self.block_fraction * num_blocks + 0.5)))
        return list(range(num_blocks - count, num_blocks))


ROM_PRESETS = {"90%": BudgetPreset(keep=0.60, block_fraction=8 / 32),
               "80%": BudgetPreset(keep=0.46, block_fraction=12 / 32),
               "50%": BudgetPreset(keep=0.33, block_fraction=24 / 32)}


def rom_factors(weight: torch.Tensor, bias: torch.Tensor | None, output_mean: torch.Tensor,
                output_covariance: torch.Tensor, rank: int):
    """(A = V_r, B = V_rᵀW, b') from the output statistics, all fp64."""
    eigenvalues, eigenvectors = torch.linalg.eigh(output_covariance.double())
    basis = eigenvectors[:, torch.argsort(eigenvalues, descending=True)[:rank]]
    w = weight.detach().double()
    mean = output_mean.double()
    new_bias = mean - basis @ (basis.T @ mean)
    if bias is not None:
        new_bias = new_bias + basis @ (basis.T @ bias.double())
    return basis, basis.T @ w, new_bias


def compress_rom(model: nn.Module, targets: dict[str, nn.Linear], keep: float, *, calib,
                 rank_multiple: int) -> list[ModuleReport]:
    """Block by block: the inputs of block 0 are captured once, then each block is replayed
    on its cached inputs — once per target (cut short after it) and once more, fully
    compressed, to produce the next block's inputs. Targets outside the blocks are done last
    with whole-model passes."""
    prefix, blocks = block_list(model)
    inputs = capture_block_inputs(model, blocks[0], calib)
    reports = []
    remaining = dict(targets)
    for index, block in enumerate(blocks):
        inside = targets_in_block(remaining, prefix, index)
        for name in inside:
            del remaining[name]
        reports += compress_block_rom(model, block, inside, inputs, keep, rank_multiple)
        if not remaining:
            break
        inputs = next_block_inputs(block, inputs)
    for name, linear in remaining.items():  # outside the blocks: whole-model passes
        stats = collect_linear_stats(model, {name: linear}, calib, outputs=True,
                                     stop_after=True, desc=f"rom {name}")
        reports += _replace(model, name, linear, keep, rank_multiple, stats)
    return reports


def compress_block_rom(model: nn.Module, block: nn.Module, targets: dict[str, nn.Linear],
                       inputs, keep: float, rank_multiple: int) -> list[ModuleReport]:
    """The `targets` of one block (full names in `model`) in forward order, each calibrated on
    the block as compressed so far, replayed on its cached `inputs` (cut short after it)."""
    reports = []
    for name in forward_order(block, targets, *inputs[0][1:]):
        linear = targets[name]
        stats = stats_from_passes({name: linear}, block_passes(block, inputs), outputs=True,
                                  stop_after=True, desc=f"rom {name}")
        reports += _replace(model, name, linear, keep, rank_multiple, stats)
    return reports


def _replace(model, name, linear, keep, rank_multiple, stats) -> list[ModuleReport]:
    s = stats[name]
    return replace_with_low_rank(
        model, {name: linear}, keep, rank_multiple,
        lambda _, lin, rank: rom_factors(lin.weight, bias_of(lin), s.output_mean,
                                         s.output_covariance, rank), stats)
