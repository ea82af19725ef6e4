"""Host side of the sibling-group decode kernel: q/k/v (or gate/up) in one Triton launch.

Sibling projections that read one input and whose shrink factors are stacked in one weight
(curkernels.nn.share_input_shrinks) need not run one launch each: the group kernel
(`triton_decode.cur_linear_group_decode_kernel`) computes x·R_stackedᵀ once, spread over the
persistent grid, and after one grid barrier expands every member's columns with its own
factor. For q/k/v that is one launch and one barrier where the single-layer kernel takes
three of each. Same row blocks, tiles, workspace and launch path as the single-layer decode
(triton_backend.py); the barrier-free form (one launch per phase) runs under the interpreter.
"""

from collections.abc import Sequence

import torch
import triton

from . import triton_backend
from . import triton_decode as decode
from .shared_group import MAX_MEMBERS
from .triton_launch import CachedLaunch, pointers_aligned

_group_plans: dict[tuple, triton_backend.DecodePlan] = {}


def _group_plan(device: torch.device, dtype: torch.dtype, n: int, ranks: tuple[int, ...],
                ms: tuple[int, ...], rows: int, has_bias: bool,
                persistent: bool) -> triton_backend.DecodePlan:
    """The launches of a group call. The key holds every integer the kernel gets but the row
    count, which the launch specialises on: Triton compiles integers by value (1, multiples of
    16), so a cached kernel must not serve other ranks or widths."""
    key = (device, dtype, n, ranks, ms, rows, has_bias, persistent)
    plan = _group_plans.get(key)
    if plan is not None:
        return plan
    r = sum(ranks)
    config = triton_backend.DEFAULT_DECODE_CONFIGS[rows]
    element_size = torch.empty((), dtype=dtype).element_size()
    programs, tile_k, k_tiles = triton_backend.shrink_split(device, config, element_size, rows,
                                                            n, r, persistent)
    tiles = {"DO_SHRINK": triton.cdiv(r, config.block_r) * k_tiles,
             "DO_EXPAND": sum(triton.cdiv(m, config.block_out) for m in ms)}
    common = dict(MEMBERS=len(ms), HAS_BIAS=has_bias, DOT_FP32=dtype == torch.float32,
                  BLOCK_M=rows, BLOCK_R=config.block_r, BLOCK_K=config.block_k,
                  BLOCK_OUT=config.block_out, BLOCK_IN=config.block_in, WORKSPACE_ROWS=rows,
                  num_warps=config.num_warps)
    kernel = decode.cur_linear_group_decode_kernel
    if persistent:
        launches = (CachedLaunch(kernel, min(programs, max(tiles.values())),
                                 dict(common, PERSISTENT=True, DO_SHRINK=True, DO_EXPAND=True)),)
    else:
        launches = tuple(CachedLaunch(kernel, tiles[phase],
                                      dict(common, PERSISTENT=False,
                                           **{flag: flag == phase for flag in tiles}))
                         for phase in tiles)
    plan = _group_plans[key] = triton_backend.DecodePlan(tile_k, k_tiles, launches)
    return plan


def cur_linear_group_decode(x: torch.Tensor, R: torch.Tensor, expands: Sequence[torch.Tensor],
                            biases: Sequence[torch.Tensor | None],
                            outputs: Sequence[torch.Tensor]) -> None:
    """Writes outputs[i] (..., m_i) = (x·Rᵀ)[..., cols_i]·expands[i]ᵀ (+ biases[i]) for a
    contiguous x (..., n) of at most TRITON_DECODE_MAX_ROWS rows. R (r, n) stacks the members'
    shrink factors in order, member i's rank being expands[i].shape[1]; every bias is given or
    none is. The caller has checked shapes, dtypes and devices."""
    members = len(expands)
    if not 2 <= members <= MAX_MEMBERS:
        raise ValueError(f"expands must hold 2 to {MAX_MEMBERS} factors, got {members}")
    n, r = x.shape[-1], R.shape[0]
    M = x.numel() // n
    ms = tuple(C.shape[0] for C in expands)
    ranks = tuple(C.shape[1] for C in expands)
    if sum(ranks) != r:
        raise ValueError(f"the expands' ranks {ranks} must add up to R's {r} rows")
    has_bias = biases[0] is not None
    if any((bias is not None) != has_bias for bias in biases):
        raise ValueError("biases: give every member's bias or none")
    rows = triton_backend.decode_block_rows(M)
    persistent = triton_backend.single_launch(x.device)
    plan = _group_plan(x.device, x.dtype, n, ranks, ms, rows, has_bias, persistent)
    workspace = triton_backend.decode_workspace(x.device, r, r, rows)
    if not persistent:  # as in cur_linear_decode: both forms share the workspace
        workspace.first_sums.zero_()
    padded = [*expands, None][:MAX_MEMBERS], [*biases, None][:MAX_MEMBERS]
    (c0, c1, c2), (b0, b1, b2) = padded
    y0, y1, y2 = [*outputs, None][:MAX_MEMBERS]
    col1 = ranks[0]
    col2 = col1 + ranks[1] if members == MAX_MEMBERS else 0
    m2 = ms[2] if members == MAX_MEMBERS else 0
    args = (x, R, workspace.sums, workspace.sync, c0, c1, c2, b0, b1, b2, y0, y1, y2,
            M, n, r, ms[0], ms[1], m2, col1, col2, plan.shrink_tile_k, plan.shrink_k_tiles)
    specialization = (M,) if pointers_aligned(x, R, *expands, *biases, *outputs) else None
    for launch in plan.launches:
        launch(specialization, *args)
    if not persistent:
        workspace.first_sums.zero_()
