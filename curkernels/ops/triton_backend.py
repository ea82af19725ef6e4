"""The Triton backend of `cur_linear`: host side of the decode and prefill kernels.

Decode (M ≤ 64) runs the persistent single-launch kernel on a GPU and its barrier-free form
(one launch per phase) under the interpreter or with CURKERNELS_TRITON_SINGLE_LAUNCH=0; its
tiles hold 16, 32 or 64 input rows, the fewest that fit the call (batched decode at batch 32
reads each weight once, as at batch 1). Prefill runs the chained-GEMM kernel with a tuned
config. Launch parameters are computed once per shape and cached, and decode launches skip
Triton's per-call argument binding (triton_launch.py): the per-call host path is a few
dictionary lookups and the launches.
"""

import functools
import os
from dataclasses import dataclass

import torch
import triton

from . import decode_configs
from . import triton_decode as decode
from .backends import triton_interpreting
from .dispatch import FUSED_MAX_ROWS
from .errors import BackendUnavailableError
from .triton_autotune import PrefillConfig, tuned_config
from .triton_launch import CachedLaunch, pointers_aligned
from .triton_prefill import cur_linear_prefill_kernel
from .triton_version import TRITON_VERSION
from .workspace import capturing, persistent_zeros, zeros


def _next_pow2(value: int) -> int:
    return 1 << max(value - 1, 0).bit_length()


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
        return max(16, min(_floor_pow2(fits), _next_pow2(c)))


# 8 KB of bf16 weights a step; 32-row expand tiles give 128 tiles at m = 4096, about one per SM.
# No C ahead of the barrier: on the H100 (bench/results/decode_sweep_h100.md) loading 16 KB of
# it ahead took longer at 30 of 32 points (by up to 1.4 µs). Where a GPU's sweep measured
# another config faster for a shape, that one runs (decode_configs.py).
# One default per row block (16 rows: the tensor-core minimum): input tiles of more rows take
# more registers, and with 128-column steps the 32- and 64-row kernels spilled (144 and 832
# bytes a thread, bf16, sm_90); with 64-column steps, and 8 warps at 64 rows, none spills
# (tests/ops/triton_aot_compile.py checks).
DEFAULT_DECODE_CONFIGS = {16: DecodeConfig(), 32: DecodeConfig(block_k=64, block_in=64),
                          FUSED_MAX_ROWS: DecodeConfig(block_k=64, block_in=64, num_warps=8)}
DEFAULT_DECODE_CONFIG = DEFAULT_DECODE_CONFIGS[16]
DECODE_ROW_BLOCKS = tuple(DEFAULT_DECODE_CONFIGS)
TRITON_DECODE_MAX_ROWS = DECODE_ROW_BLOCKS[-1]


def decode_block_rows(M: int) -> int:
    """The input rows a decode tile holds for M rows: the smallest row block that fits them.
    The kernel reads every weight once whatever the block; larger blocks cost registers and
    tensor-core work only."""
    if not 0 < M <= TRITON_DECODE_MAX_ROWS:
        raise ValueError(f"the decode kernels take 1 to {TRITON_DECODE_MAX_ROWS} input rows, "
                         f"got {M}")
    return next(rows for rows in DECODE_ROW_BLOCKS if rows >= M)


def decode_row_block(M: int) -> range:
    """The row counts that run the same tiles as M rows (those of `decode_block_rows(M)`)."""
    block = decode_block_rows(M)
    smaller = [rows for rows in DECODE_ROW_BLOCKS if rows < block]
    return range(smaller[-1] + 1 if smaller else 1, block + 1)


@dataclass(frozen=True)
class _DecodeWorkspace:
    sync: torch.Tensor        # int32 [arrivals, release flag, epoch, pad]
    sums: torch.Tensor        # fp32, two (block rows × r) shrink buffers
    first_sums: torch.Tensor  # view of the first buffer (the barrier-free path zeroes it)
    link: torch.Tensor        # fp32, block rows × c (full U)


@dataclass(frozen=True)
class DecodePlan:
    """The launches of a decode call (single layer or sibling group) and the shrink's K split
    they take as arguments."""
    shrink_tile_k: int
    shrink_k_tiles: int
    launches: tuple[CachedLaunch, ...]


_workspaces: dict[tuple, _DecodeWorkspace] = {}
_decode_plans: dict[tuple, DecodePlan] = {}
_measured_configs: dict[tuple, DecodeConfig] = {}


@functools.cache
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def single_launch(device: torch.device) -> bool:
    return (device.type == "cuda" and not triton_interpreting()
            and os.environ.get("CURKERNELS_TRITON_SINGLE_LAUNCH", "1") != "0")


def decode_workspace(device: torch.device, r: int, c: int, rows: int) -> _DecodeWorkspace:
    """Zeroed once and kept: captured CUDA graphs hold its pointers; one per stream, so that
    concurrent streams never share counters, and one per row block, whose buffers the kernel
    zeroes for its own next launch. While capturing, a workspace not made before is a fresh
    temporary of the graph (see `workspace.persistent_zeros`)."""
    # The raw-stream query Triton's own launcher uses: torch.cuda.current_stream() costs µs.
    stream = torch._C._cuda_getCurrentRawStream(device.index) if device.type == "cuda" else 0
    key = (device, stream, r, c, rows)
    workspace = _workspaces.get(key)
    if workspace is not None:
        return workspace
    numels = (decode.SYNC_WORDS, 2 * rows * r, rows * c)
    dtypes = (torch.int32, torch.float32, torch.float32)
    kept = not capturing(device)
    sync, sums, link = (persistent_zeros if kept else zeros)(numels, dtypes, device)
    workspace = _DecodeWorkspace(sync=sync, sums=sums, first_sums=sums[: rows * r], link=link)
    if kept:
        _workspaces[key] = workspace
    return workspace


def reserve_decode_workspace(device: torch.device, r: int, c: int, M: int) -> None:
    """Makes the current stream's kept workspace for rank r (and link width c) and M rows now,
    outside any capture. torch.compile's CUDA graphs warm up on the stream they then capture
    on, and their warm-up calls run the eager backend; a workspace first met during the capture
    would be a graph temporary, zeroed by extra memset nodes on every replay."""
    decode_workspace(device, r, c, decode_block_rows(M))


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
    pdl = config.pdl and persistent and device.type == "cuda" and not triton_interpreting()
    # One line a thread a step; only the single launch has a barrier for C to stream across,
    # and the interpreter (which runs it on one program in tests) has no inline PTX.
    l2_step = 32 * config.num_warps
    l2_lines = (config.l2_prefetch_lines(l2_step) if persistent and not triton_interpreting()
                else 0)
    if pdl and not decode.PDL_SUPPORTED:
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
    kernel = decode.cur_linear_decode_kernel
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
    """The tile config the GPU's measured sweep chose for this call (decode_configs.py), or the
    default one of its row block; memoized per call shape."""
    key = (device, dtype, M, shape)
    config = _measured_configs.get(key)
    if config is None:
        default = DEFAULT_DECODE_CONFIGS[decode_block_rows(M)]
        fields = (decode_configs.measured_fields(_device_name(device.index), dtype, M, shape,
                                                 vars(default), decode_row_block(M))
                  if device.type == "cuda" else None)
        config = _measured_configs[key] = (DecodeConfig(**fields) if fields is not None
                                           else default)
    return config


@functools.cache
def _device_name(device_index: int | None) -> str:
    return torch.cuda.get_device_name(device_index)


def cur_linear_decode(x, C, U, R, bias, rows, y, config: DecodeConfig | None = None) -> None:
    """Writes y (..., m) from a contiguous x (..., n) of at most TRITON_DECODE_MAX_ROWS rows with
    the decode kernel;
    `config` picks its tiles (None: the measured choice for this GPU and shape; benchmarks
    compare configs through it)."""
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
    workspace = decode_workspace(x.device, r, c, block_rows)
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


def _check_prefill_compiles(x2d: torch.Tensor) -> None:
    """Triton 3.2's compiler aborts the process (an assertion in LinearLayout::reshapeOuts) on
    the prefill kernel in half precision for sm_90 (compiled without a GPU: sm_80, fp32 and
    Triton 3.1, 3.3 to 3.8 build it); an exception is the least a caller is owed."""
    if (TRITON_VERSION == (3, 2) and x2d.dtype in (torch.float16, torch.bfloat16)
            and x2d.is_cuda and torch.cuda.get_device_capability(x2d.device)[0] >= 9):
        raise BackendUnavailableError(
            f"the Triton prefill kernel does not compile with Triton {triton.__version__} for "
            f"{x2d.dtype} on this GPU (sm_90); use backend='auto' or 'torch' (the cuBLAS chain) "
            f"for more than {TRITON_DECODE_MAX_ROWS} rows, or Triton ≥ 3.3")


def _cur_linear_prefill(x2d, C, U, R, bias, rows, y) -> None:
    _check_prefill_compiles(x2d)
    M, n = x2d.shape
    m = C.shape[0]
    scale = None
    if U is not None and U.dim() == 2:
        # The kernel keeps one rank-sized intermediate on chip; a full U is folded into C here
        # (m·c·r flops, small next to a prefill). Frozen modules fold U once at load instead.
        C = (C.float() @ U.float()).to(C.dtype)
    elif U is not None:
        scale = U
    r = C.shape[1]
    partial = None

    def run(config: PrefillConfig) -> None:
        nonlocal partial
        chunk_starts = range(0, r, config.r_chunk)
        if len(chunk_starts) > 1 and partial is None:
            partial = torch.empty((M, m), dtype=torch.float32, device=x2d.device)
        grid = (triton.cdiv(M, config.block_m), min(config.split_n, triton.cdiv(m, config.block_n)))
        for index, r_begin in enumerate(chunk_starts):
            cur_linear_prefill_kernel[grid](
                x2d, R, rows, scale, C, bias, y, partial, M, n, r, m, R.shape[0], r_begin,
                GATHER=rows is not None, HAS_SCALE=scale is not None, HAS_BIAS=bias is not None,
                ACCUMULATE=index > 0, FINAL=index == len(chunk_starts) - 1,
                DOT_FP32=x2d.dtype == torch.float32, BLOCK_M=config.block_m,
                R_CHUNK=config.r_chunk, BLOCK_K=config.block_k, BLOCK_N=config.block_n,
                SPLIT_N=config.split_n, num_warps=config.num_warps, num_stages=config.num_stages)

    key = (x2d.device.index, x2d.dtype, min(_next_pow2(M), 8192), n, m, r, rows is not None,
           scale is not None)
    run(tuned_config(key, x2d.device, x2d.dtype, M, r, triton_interpreting(), run))


def cur_linear_triton(x: torch.Tensor, C: torch.Tensor, U: torch.Tensor | None,
                      R: torch.Tensor, bias: torch.Tensor | None,
                      rows: torch.Tensor | None) -> torch.Tensor:
    """y = ((x·Rᵀ)·Uᵀ)·Cᵀ + b for a contiguous x (..., n); the backend contract of
    ops/backends.py."""
    n, m = x.shape[-1], C.shape[0]
    y = torch.empty((*x.shape[:-1], m), dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    if n == 0:  # an empty input dimension: R·x = 0
        return y.copy_(bias.expand_as(y)) if bias is not None else y.zero_()
    M = y.numel() // m
    if M <= TRITON_DECODE_MAX_ROWS:
        cur_linear_decode(x, C, U, R, bias, rows, y)
    else:
        _cur_linear_prefill(x.view(M, n), C, U, R, bias, rows, y.view(M, m))
    return y
