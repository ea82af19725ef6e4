"""Host side of the Triton decode kernels (few input rows): a layer, and a sibling group.

Decode (M ≤ DECODE_MAX_ROWS) runs the persistent single-launch kernel on a GPU and its
barrier-free form (one launch per phase) under the interpreter or with
CURKERNELS_TRITON_SINGLE_LAUNCH=0; its tiles hold 16, 32 or 64 input rows, the fewest that fit
the call (batched decode at batch 32 reads each weight once, as at batch 1). Launch parameters
are computed once per shape and cached, and launches skip Triton's per-call argument binding
(launch.py): the per-call host path is a few dictionary lookups and the launches.

Sibling projections that read one input and whose shrink factors are stacked in one weight
(curkernels.nn.share_input_shrinks) need not run one launch each: the group kernel
(`decode_kernels.cur_linear_group_decode_kernel`) computes x·R_stackedᵀ once, spread over the
persistent grid, and after one grid barrier expands every member's columns with its own
factor. For q/k/v that is one launch and one barrier where the single-layer kernel takes
three of each. Same row blocks, tiles, workspace and launch path as the single-layer decode.
"""

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton

from .. import settings, tables
from ..tables import DECODE_MAX_ROWS, MAX_GROUP_MEMBERS
from . import decode_kernels as kernels
from .launch import CachedLaunch, pointers_aligned
from .prefill_tuning import next_pow2
from .runtime import check_interpretable
from .workspace import ReservedWorkspaces, decode_workspace, reserved_workspaces


def _floor_pow2(value: int) -> int:
    return 1 << (max(value, 1).bit_length() - 1)


L2_LINE_BYTES = 128


@dataclass(frozen=True)
class DecodeConfig:
    """Tiles of the decode kernel. A shrink tile is block_r rank rows × a K slice, read
    block_k columns a step; expand and link tiles are block_out rows, read block_in columns a
    step. Before the first barrier each program loads up to prefetch_bytes of its first expand
    tile's C (0: none). Once its shrink is done, each program asks L2 for up to
    l2_prefetch_bytes of its expand tiles' C, which then streams from DRAM across the barrier
    (0: none; single launch only). The persistent grid has programs_per_sm programs on each
    SM: all of them must be resident at once for the grid barrier. With pdl the kernel is a
    programmatic dependent launch (Hopper on; Triton ≥ 3.5): it loads its first shrink weights
    while the previous kernel finishes and lets the next one launch during its expand. The
    input rows are padded to a row block (`decode_block_rows`)."""
    block_r: int = 32
    block_k: int = 128
    block_out: int = 32
    block_in: int = 128
    num_warps: int = 4
    prefetch_bytes: int = 0
    programs_per_sm: int = 1
    pdl: bool = False
    l2_prefetch_bytes: int = 0

    def l2_prefetch_lines(self, step: int) -> int:
        """Cache lines each program asks L2 for, rounded up to whole steps of `step` lines."""
        lines = triton.cdiv(self.l2_prefetch_bytes, L2_LINE_BYTES)
        return triton.cdiv(lines, step) * step

    def prefetch_columns(self, c: int, element_size: int) -> int:
        """Columns of C loaded ahead: a power of two ≥ 16 (a tl.dot's minimum K), at most c's."""
        fits = self.prefetch_bytes // (self.block_out * element_size)
        return max(16, min(_floor_pow2(fits), next_pow2(c)))


# 8 KB of bf16 weights a step; 32-row expand tiles give 128 tiles at m = 4096, about one per SM.
# No C ahead of the barrier: on the H100 (bench/results/decode_sweep_h100.md) loading 16 KB of
# it ahead took longer at 30 of 32 points (by up to 1.4 µs). Where a GPU's sweep measured
# another config faster for a shape, that one runs (tables.py).
# One default per row block (16 rows: the tensor-core minimum): input tiles of more rows take
# more registers, and with 128-column steps the 32- and 64-row kernels spilled (144 and 832
# bytes a thread, bf16, sm_90); with 64-column steps, and 8 warps at 64 rows, none spills
# (tests/ops/triton_aot_compile.py checks).
DEFAULT_DECODE_CONFIGS = {16: DecodeConfig(), 32: DecodeConfig(block_k=64, block_in=64),
                          DECODE_MAX_ROWS: DecodeConfig(block_k=64, block_in=64, num_warps=8)}
DEFAULT_DECODE_CONFIG = DEFAULT_DECODE_CONFIGS[16]
DECODE_ROW_BLOCKS = tuple(DEFAULT_DECODE_CONFIGS)


def decode_block_rows(M: int) -> int:
    """The input rows a decode tile holds for M rows: the smallest row block that fits them.
    The kernel reads every weight once whatever the block; larger blocks cost registers and
    tensor-core work only."""
    if not 0 < M <= DECODE_MAX_ROWS:
        raise ValueError(f"the decode kernels take 1 to {DECODE_MAX_ROWS} input rows, got {M}")
    return next(rows for rows in DECODE_ROW_BLOCKS if rows >= M)


def decode_row_block(M: int) -> range:
    """The row counts that run the same tiles as M rows (those of `decode_block_rows(M)`)."""
    block = decode_block_rows(M)
    smaller = [rows for rows in DECODE_ROW_BLOCKS if rows < block]
    return range(smaller[-1] + 1 if smaller else 1, block + 1)


@dataclass(frozen=True)
class DecodePlan:
    """The launches of a decode call (single layer or sibling group) and the shrink's K split
    they take as arguments."""
    shrink_tile_k: int
    shrink_k_tiles: int
    launches: tuple[CachedLaunch, ...]


_decode_plans: dict[tuple, DecodePlan] = {}
_measured_configs: dict[tuple, DecodeConfig] = {}
settings.on_reload(_measured_configs.clear)  # CURKERNELS_DECODE_CONFIGS may name another sweep


@functools.cache
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def single_launch(device: torch.device) -> bool:
    """Whether decode runs the persistent single-launch kernel (else one launch a phase)."""
    current = settings.current
    return device.type == "cuda" and not current.triton_interpret and current.single_launch


def reserve_decode_workspaces(device: torch.device, r: int, c: int) -> ReservedWorkspaces:
    """Makes the current stream's kept workspaces for rank r (and link width c) now, one per
    row block, outside any capture (`prepare_for_inference`: none is then made while serving,
    and a capture on this stream finds them, not a temporary zeroed on every replay); returns
    the reservation that memoized dispatch choices hand to the kernels."""
    reserved = reserved_workspaces(device, r, c)
    for M in range(1, DECODE_MAX_ROWS + 1):
        reserved.get(M, decode_block_rows(M))
    return reserved


def _shared_bytes_bound(config: DecodeConfig, element_size: int, rows: int) -> int:
    """An upper bound on a decode program's shared memory: three pipeline stages of the input
    (fp32 when read from the workspace) and weight tiles (Triton takes two at this kernel's
    sizes, bench/NOTES.md)."""
    width = max(config.block_k, config.block_in)
    return 3 * (rows * 4 + max(config.block_r, config.block_out) * element_size) * width


@functools.cache
def _programs_per_sm(device_index: int, config: DecodeConfig, element_size: int,
                     rows: int) -> int:
    """config.programs_per_sm, lowered until that many programs fit on an SM together whatever
    the compiler gives them (up to 255 registers a thread, allocated 256 at a time; the shared
    memory bound above): the grid barrier deadlocks unless every program is resident."""
    if config.programs_per_sm == 1:
        return 1
    props = torch.cuda.get_device_properties(device_index)
    threads = 32 * config.num_warps
    fits = min(getattr(props, "regs_per_multiprocessor", 65536) // (256 * threads),
               props.max_threads_per_multi_processor // threads,
               props.shared_memory_per_multiprocessor
               // (_shared_bytes_bound(config, element_size, rows) + 1024))
    return max(1, min(config.programs_per_sm, fits))


def shrink_split(device: torch.device, config: DecodeConfig, element_size: int, rows: int,
                 n: int, r: int, persistent: bool) -> tuple[int, int, int]:
    """(programs, K slice length, K slices) of a decode launch's shrink: a persistent grid of
    programs_per_sm programs per SM, the shrink cut into enough K slices that (rank blocks ×
    slices) covers it; barrier-free, one program per tile."""
    groups = triton.cdiv(r, config.block_r)
    chunks = triton.cdiv(n, config.block_k)
    programs = (_multiprocessors(device.index) * _programs_per_sm(device.index, config,
                                                                  element_size, rows)
                if persistent else groups * chunks)
    slices = min(chunks, max(1, programs // groups))
    tile_k = triton.cdiv(chunks, slices) * config.block_k
    return programs, tile_k, triton.cdiv(n, tile_k)


def _decode_plan(device: torch.device, dtype: torch.dtype, n: int, r: int, c: int, m: int,
                 rows: int, u_kind: str, has_bias: bool, gather: bool, persistent: bool,
                 config: DecodeConfig) -> DecodePlan:
    """The launches of a decode call with `rows` input rows a tile (`decode_block_rows`)."""
    key = (device, dtype, n, r, c, m, rows, u_kind, has_bias, gather, persistent, config)
    plan = _decode_plans.get(key)
    if plan is not None:
        return plan
    element_size = torch.empty((), dtype=dtype).element_size()
    programs, tile_k, k_tiles = shrink_split(device, config, element_size, rows, n, r,
                                             persistent)
    groups = triton.cdiv(r, config.block_r)
    full_u = u_kind == "full"
    tiles = {"DO_SHRINK": groups * k_tiles, "DO_LINK": triton.cdiv(c, config.block_out),
             "DO_EXPAND": triton.cdiv(m, config.block_out)}
    phases = ["DO_SHRINK"] + (["DO_LINK"] if full_u else []) + ["DO_EXPAND"]
    pdl = config.pdl and persistent and device.type == "cuda" and not settings.current.triton_interpret
    # One line a thread a step; only the single launch has a barrier for C to stream across,
    # and the interpreter (which runs it on one program in tests) has no inline PTX.
    l2_step = 32 * config.num_warps
    l2_lines = (config.l2_prefetch_lines(l2_step) if persistent and not settings.current.triton_interpret
                else 0)
    if pdl and not kernels.PDL_SUPPORTED:
        raise ValueError(f"DecodeConfig(pdl=True) needs Triton ≥ 3.5 (griddepcontrol); this is "
                         f"Triton {triton.__version__}")
    if pdl and torch.cuda.get_device_capability(device)[0] < 9:
        major, minor = torch.cuda.get_device_capability(device)
        raise ValueError(f"DecodeConfig(pdl=True) needs a Hopper or newer GPU (griddepcontrol, "
                         f"sm_90); this one is sm_{major}{minor}")
    common = dict(BLOCK_M=rows, BLOCK_R=config.block_r, BLOCK_K=config.block_k,
                  BLOCK_OUT=config.block_out, BLOCK_IN=config.block_in,
                  PREFETCH=config.prefetch_bytes > 0,
                  PREFETCH_IN=config.prefetch_columns(c, element_size),
                  SHRINK_HEAD=config.pdl, PDL=pdl, L2_LINES=l2_lines, L2_STEP=l2_step,
                  LINE_ELEMENTS=L2_LINE_BYTES // element_size,
                  WORKSPACE_ROWS=rows, DIAGONAL_U=u_kind == "diagonal", FULL_U=full_u,
                  HAS_BIAS=has_bias, GATHER=gather, DOT_FP32=dtype == torch.float32,
                  num_warps=config.num_warps, **({"launch_pdl": True} if pdl else {}))
    kernel = kernels.cur_linear_decode_kernel
    if persistent:
        grid = min(programs, max(tiles[phase] for phase in phases))
        launches = (CachedLaunch(kernel, grid, dict(common, PERSISTENT=True, DO_SHRINK=True,
                                                    DO_LINK=full_u, DO_EXPAND=True)),)
    else:
        launches = tuple(CachedLaunch(kernel, tiles[phase],
                                      dict(common, PERSISTENT=False,
                                           **{flag: flag == phase for flag in tiles}))
                         for phase in phases)
    plan = DecodePlan(tile_k, k_tiles, launches)
    _decode_plans[key] = plan
    return plan


def _u_kind(U: torch.Tensor | None) -> str:
    if U is None:
        return "none"
    return "diagonal" if U.dim() == 1 else "full"


def _measured_config(device: torch.device, dtype: torch.dtype, M: int,
                     shape: tuple[int, int, int]) -> DecodeConfig:
    """The tile config the GPU's measured sweep chose for this call (tables.py), or the
    default one of its row block; memoized per call shape."""
    key = (device, dtype, M, shape)
    config = _measured_configs.get(key)
    if config is None:
        default = DEFAULT_DECODE_CONFIGS[decode_block_rows(M)]
        fields = (tables.measured_fields(_device_name(device.index), dtype, M, shape,
                                         vars(default), decode_row_block(M))
                  if device.type == "cuda" else None)
        config = _measured_configs[key] = (DecodeConfig(**fields) if fields is not None
                                           else default)
    return config


@functools.cache
def _device_name(device_index: int | None) -> str:
    return torch.cuda.get_device_name(device_index)


def cur_linear_decode(x, C, U, R, bias, rows, y, config: DecodeConfig | None = None,
                      workspaces: ReservedWorkspaces | None = None) -> None:
    """Writes y (..., m) from a contiguous x (..., n) of at most DECODE_MAX_ROWS rows with the
    decode kernel; `config` picks its tiles (None: the measured choice for this GPU and shape;
    benchmarks compare configs through it); `workspaces`, the layer's reservation (dispatch
    passes it; None: looked up by key)."""
    check_interpretable(x.dtype)
    n = x.shape[-1]
    M = x.numel() // n
    m, c = C.shape
    r = rows.shape[0] if rows is not None else R.shape[0]
    if config is None:
        config = _measured_config(x.device, x.dtype, M, (m, n, r))
    persistent = single_launch(x.device)
    block_rows = decode_block_rows(M)
    plan = _decode_plan(x.device, x.dtype, n, r, c, m, block_rows, _u_kind(U), bias is not None,
                        rows is not None, persistent, config)
    workspace = (decode_workspace(x.device, r, c, block_rows) if workspaces is None
                 else workspaces.get(M, block_rows))
    # The barrier-free form sums into the first buffer, which the single launch may have left
    # full; the workspace is shared with the single launch, which reads the buffer of the
    # current epoch (either one) as zero, so the first buffer is zeroed again afterwards.
    if not persistent:
        workspace.first_sums.zero_()
    args = (x, R, rows, U, C, bias, y, workspace.sums, workspace.link, workspace.sync,
            M, n, r, c, m, R.shape[0], plan.shrink_tile_k, plan.shrink_k_tiles)
    # What Triton specialises on that the plan does not fix (all factors share x's dtype).
    specialization = ((M, R.shape[0]) if pointers_aligned(x, R, rows, U, C, bias, y)
                      else None)
    for launch in plan.launches:
        launch(specialization, *args)
    if not persistent:
        workspace.first_sums.zero_()


_group_plans: dict[tuple, DecodePlan] = {}


def _group_plan(device: torch.device, dtype: torch.dtype, n: int, ranks: tuple[int, ...],
                ms: tuple[int, ...], rows: int, has_bias: bool,
                persistent: bool) -> DecodePlan:
    """The launches of a group call. The key holds every integer the kernel gets but the row
    count, which the launch specialises on: Triton compiles integers by value (1, multiples of
    16), so a cached kernel must not serve other ranks or widths."""
    key = (device, dtype, n, ranks, ms, rows, has_bias, persistent)
    plan = _group_plans.get(key)
    if plan is not None:
        return plan
    r = sum(ranks)
    config = DEFAULT_DECODE_CONFIGS[rows]
    element_size = torch.empty((), dtype=dtype).element_size()
    programs, tile_k, k_tiles = shrink_split(device, config, element_size, rows, n, r,
                                             persistent)
    tiles = {"DO_SHRINK": triton.cdiv(r, config.block_r) * k_tiles,
             "DO_EXPAND": sum(triton.cdiv(m, config.block_out) for m in ms)}
    common = dict(MEMBERS=len(ms), HAS_BIAS=has_bias, DOT_FP32=dtype == torch.float32,
                  BLOCK_M=rows, BLOCK_R=config.block_r, BLOCK_K=config.block_k,
                  BLOCK_OUT=config.block_out, BLOCK_IN=config.block_in, WORKSPACE_ROWS=rows,
                  num_warps=config.num_warps)
    kernel = kernels.cur_linear_group_decode_kernel
    if persistent:
        launches = (CachedLaunch(kernel, min(programs, max(tiles.values())),
                                 dict(common, PERSISTENT=True, DO_SHRINK=True, DO_EXPAND=True)),)
    else:
        launches = tuple(CachedLaunch(kernel, tiles[phase],
                                      dict(common, PERSISTENT=False,
                                           **{flag: flag == phase for flag in tiles}))
                         for phase in tiles)
    plan = _group_plans[key] = DecodePlan(tile_k, k_tiles, launches)
    return plan


def cur_linear_group_decode(x: torch.Tensor, R: torch.Tensor, expands: Sequence[torch.Tensor],
                            biases: Sequence[torch.Tensor | None],
                            outputs: Sequence[torch.Tensor],
                            workspaces: ReservedWorkspaces | None = None) -> None:
    """Writes outputs[i] (..., m_i) = (x·Rᵀ)[..., cols_i]·expands[i]ᵀ (+ biases[i]) for a
    contiguous x (..., n) of at most DECODE_MAX_ROWS rows. R (r, n) stacks the members'
    shrink factors in order, member i's rank being expands[i].shape[1]; every bias is given or
    none is. `workspaces`: the group's (r, r) reservation, or None (looked up by key). The
    caller has checked shapes, dtypes and devices."""
    check_interpretable(x.dtype)
    members = len(expands)
    if not 2 <= members <= MAX_GROUP_MEMBERS:
        raise ValueError(f"expands must hold 2 to {MAX_GROUP_MEMBERS} factors, got {members}")
    n, r = x.shape[-1], R.shape[0]
    M = x.numel() // n
    ms = tuple(C.shape[0] for C in expands)
    ranks = tuple(C.shape[1] for C in expands)
    if sum(ranks) != r:
        raise ValueError(f"the expands' ranks {ranks} must add up to R's {r} rows")
    has_bias = biases[0] is not None
    if any((bias is not None) != has_bias for bias in biases):
        raise ValueError("biases: give every member's bias or none")
    rows = decode_block_rows(M)
    persistent = single_launch(x.device)
    plan = _group_plan(x.device, x.dtype, n, ranks, ms, rows, has_bias, persistent)
    workspace = (decode_workspace(x.device, r, r, rows) if workspaces is None
                 else workspaces.get(M, rows))
    if not persistent:  # as in cur_linear_decode: both forms share the workspace
        workspace.first_sums.zero_()
    padded = [*expands, None][:MAX_GROUP_MEMBERS], [*biases, None][:MAX_GROUP_MEMBERS]
    (c0, c1, c2), (b0, b1, b2) = padded
    y0, y1, y2 = [*outputs, None][:MAX_GROUP_MEMBERS]
    col1 = ranks[0]
    col2 = col1 + ranks[1] if members == MAX_GROUP_MEMBERS else 0
    m2 = ms[2] if members == MAX_GROUP_MEMBERS else 0
    args = (x, R, workspace.sums, workspace.sync, c0, c1, c2, b0, b1, b2, y0, y1, y2,
            M, n, r, ms[0], ms[1], m2, col1, col2, plan.shrink_tile_k, plan.shrink_k_tiles)
    specialization = (M,) if pointers_aligned(x, R, *expands, *biases, *outputs) else None
    for launch in plan.launches:
        launch(specialization, *args)
    if not persistent:
        workspace.first_sums.zero_()


def cur_linear_group_triton(x: torch.Tensor, weight: torch.Tensor,
                            expands: Sequence[torch.Tensor],
                            biases: Sequence[torch.Tensor | None],
                            workspaces: ReservedWorkspaces | None = None) -> list[torch.Tensor]:
    """Every member's output by one group launch: the group way of dispatch.py, which hands it
    the calls the kernel takes (and the group's reserved workspaces)."""
    x = x.contiguous()
    outputs = [x.new_empty((*x.shape[:-1], C.shape[0])) for C in expands]
    cur_linear_group_decode(x, weight, expands, biases, outputs, workspaces)
    return outputs
