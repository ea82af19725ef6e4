"""Triton decode kernel (few input rows): y = C·(U·(R·x)) + b in one persistent launch.

Three phases over a persistent grid of one program per SM:
  shrink  sums = R·x   tiles (rank block × K slice) spread over every program; partial dots
                       are added into an fp32 workspace with atomics;
  link    s = U·sums   full U only (a diagonal U scales the intermediate while it is loaded);
  expand  y = C·s + b  tiles of output rows.
Phases are separated by a grid barrier (atomics with acquire/release). The shrink buffer is
double-buffered by an epoch counter kept in the workspace: every launch zeroes the buffer of the
next one, so nothing changes on the host between calls and CUDA-graph replays stay correct.

A spin barrier deadlocks where programs run one after another (TRITON_INTERPRET=1), so the same
kernel also runs barrier-free (PERSISTENT=False): one launch per phase, chosen by the DO_*
flags, summing into the first shrink buffer, which the host zeroes before and after: both forms
share one workspace, and the persistent form expects the buffer of the current epoch zeroed.
"""

import triton
import triton.language as tl

SYNC_WORDS = 4  # arrivals, generation, epoch, padding (int32 each)


@triton.jit
def _grid_barrier(sync_ptr, num_programs, BUMP_EPOCH: tl.constexpr):
    """All programs wait here; the last to arrive resets the count, then releases the others."""
    tl.debug_barrier()  # every warp of this program has issued its phase's stores
    seen = tl.atomic_add(sync_ptr + 1, 0, sem="acquire")
    arrived = tl.atomic_add(sync_ptr, 1, sem="acq_rel")
    if arrived == num_programs - 1:
        tl.atomic_xchg(sync_ptr, 0, sem="relaxed")
        if BUMP_EPOCH:
            tl.atomic_add(sync_ptr + 2, 1, sem="relaxed")
        tl.atomic_add(sync_ptr + 1, 1, sem="release")
    else:
        while tl.atomic_add(sync_ptr + 1, 0, sem="acquire") == seen:
            pass
    tl.debug_barrier()


@triton.jit
def _row_block_dot(acc, a_ptr, a_rows, a_row_mask, lda, in_ptr, ld_in, scale_ptr, M, k_begin,
                   k_end, IN_IS_WORKSPACE: tl.constexpr, HAS_SCALE: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, DOT_FP32: tl.constexpr):
    """acc[i, j] += Σ_k in[i, k]·scale[k]·A[a_rows[j], k] over k in [k_begin, k_end)."""
    offs_m = tl.arange(0, BLOCK_M)
    for k0 in range(k_begin, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < k_end
        in_mask = (offs_m[:, None] < M) & k_mask[None, :]
        in_ptrs = in_ptr + offs_m[:, None] * ld_in + offs_k[None, :]
        if IN_IS_WORKSPACE:  # written by other programs in this launch: skip the L1
            inputs = tl.load(in_ptrs, mask=in_mask, other=0.0, cache_modifier=".cg")
        else:
            inputs = tl.load(in_ptrs, mask=in_mask, other=0.0)
        if HAS_SCALE:
            scale = tl.load(scale_ptr + offs_k, mask=k_mask, other=0.0)
            inputs = inputs * scale.to(tl.float32)[None, :]
        weights = tl.load(a_ptr + a_rows[:, None] * lda + offs_k[None, :],
                          mask=a_row_mask[:, None] & k_mask[None, :], other=0.0)
        if DOT_FP32:
            acc = tl.dot(inputs.to(tl.float32), tl.trans(weights.to(tl.float32)), acc,
                         input_precision="ieee")
        else:  # half-precision operands on the tensor cores, as the cuBLAS chain rounds them
            acc = tl.dot(inputs.to(weights.dtype), tl.trans(weights), acc)
    return acc


@triton.jit
def cur_linear_decode_kernel(
        x_ptr, r_ptr, rows_ptr, u_ptr, c_ptr, bias_ptr, y_ptr, sums_ptr, link_ptr, sync_ptr,
        M, n, r, c, m, base_rows, shrink_tile_k, shrink_k_tiles,
        PERSISTENT: tl.constexpr, DO_SHRINK: tl.constexpr, DO_LINK: tl.constexpr,
        DO_EXPAND: tl.constexpr, DIAGONAL_U: tl.constexpr, FULL_U: tl.constexpr,
        HAS_BIAS: tl.constexpr, GATHER: tl.constexpr, DOT_FP32: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_OUT: tl.constexpr,
        BLOCK_IN: tl.constexpr, WORKSPACE_ROWS: tl.constexpr):
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    offs_m = tl.arange(0, BLOCK_M)
    sums_size = WORKSPACE_ROWS * r
    sums = sums_ptr
    if PERSISTENT:
        # Read before the first barrier, whose last arriver bumps it: every program agrees.
        epoch = tl.atomic_add(sync_ptr + 2, 0, sem="relaxed")
        sums = sums_ptr + (epoch % 2) * sums_size
        next_sums = sums_ptr + ((epoch + 1) % 2) * sums_size
        for start in range(pid * BLOCK_IN, sums_size, num_programs * BLOCK_IN):
            offs = start + tl.arange(0, BLOCK_IN)
            tl.store(next_sums + offs, tl.zeros((BLOCK_IN,), tl.float32), mask=offs < sums_size)

    if DO_SHRINK:
        tiles = tl.cdiv(r, BLOCK_R) * shrink_k_tiles
        for tile in range(pid, tiles, num_programs):
            offs_r = (tile // shrink_k_tiles) * BLOCK_R + tl.arange(0, BLOCK_R)
            r_mask = offs_r < r
            if GATHER:  # rows of the base weight, clamped so that no index reads outside it
                rows = tl.load(rows_ptr + offs_r, mask=r_mask, other=0)
                rows = tl.minimum(tl.maximum(rows, 0), base_rows - 1)
            else:
                rows = offs_r
            k_begin = (tile % shrink_k_tiles) * shrink_tile_k
            k_end = tl.minimum(k_begin + shrink_tile_k, n)
            acc = tl.zeros((BLOCK_M, BLOCK_R), tl.float32)
            acc = _row_block_dot(acc, r_ptr, rows.to(tl.int64), r_mask, n, x_ptr, n, u_ptr, M,
                                 k_begin, k_end, False, False, BLOCK_M, BLOCK_K, DOT_FP32)
            tl.atomic_add(sums + offs_m[:, None] * r + offs_r[None, :], acc,
                          mask=(offs_m[:, None] < M) & r_mask[None, :], sem="relaxed")
    if PERSISTENT:
        _grid_barrier(sync_ptr, num_programs, True)

    if FULL_U:
        if DO_LINK:
            for tile in range(pid, tl.cdiv(c, BLOCK_OUT), num_programs):
                offs_out = tile * BLOCK_OUT + tl.arange(0, BLOCK_OUT)
                out_mask = offs_out < c
                acc = tl.zeros((BLOCK_M, BLOCK_OUT), tl.float32)
                acc = _row_block_dot(acc, u_ptr, offs_out.to(tl.int64), out_mask, r, sums, r,
                                     u_ptr, M, 0, r, True, False, BLOCK_M, BLOCK_IN, DOT_FP32)
                tl.store(link_ptr + offs_m[:, None] * c + offs_out[None, :], acc,
                         mask=(offs_m[:, None] < M) & out_mask[None, :])
        if PERSISTENT:
            _grid_barrier(sync_ptr, num_programs, False)

    if DO_EXPAND:
        for tile in range(pid, tl.cdiv(m, BLOCK_OUT), num_programs):
            offs_out = tile * BLOCK_OUT + tl.arange(0, BLOCK_OUT)
            out_mask = offs_out < m
            acc = tl.zeros((BLOCK_M, BLOCK_OUT), tl.float32)
            if FULL_U:
                acc = _row_block_dot(acc, c_ptr, offs_out.to(tl.int64), out_mask, c, link_ptr, c,
                                     u_ptr, M, 0, c, True, False, BLOCK_M, BLOCK_IN, DOT_FP32)
            else:
                acc = _row_block_dot(acc, c_ptr, offs_out.to(tl.int64), out_mask, c, sums, r,
                                     u_ptr, M, 0, c, True, DIAGONAL_U, BLOCK_M,
                                     BLOCK_IN, DOT_FP32)
            if HAS_BIAS:
                acc += tl.load(bias_ptr + offs_out, mask=out_mask, other=0.0).to(tl.float32)[None, :]
            tl.store(y_ptr + offs_m[:, None] * m + offs_out[None, :],
                     acc.to(y_ptr.dtype.element_ty),
                     mask=(offs_m[:, None] < M) & out_mask[None, :])
