"""Triton decode kernel (few input rows): y = C·(U·(R·x)) + b in one persistent launch.

Three phases over a persistent grid of one program per SM:
  shrink  sums = R·x   tiles (rank block × K slice) spread over every program; partial dots
                       are added into an fp32 workspace with atomics;
  link    s = U·sums   full U only (a diagonal U scales the intermediate while it is loaded);
  expand  y = C·s + b  tiles of output rows.
Phases are separated by a grid barrier (atomics with acquire/release). With PREFETCH, each
program loads the first PREFETCH_IN columns of its first expand tile before the first barrier:
those weight reads overlap the shrink and the barrier instead of following them. With L2_LINES,
each program instead asks L2 for the first L2_LINES cache lines of its expand tiles once its
shrink is done (`prefetch.global.L2`: no register holds them and nothing waits on them), so
that DRAM streams C while the grid waits at the barrier.

The shrink buffer is double-buffered by an epoch counter kept in the workspace: every launch
zeroes the buffer of the next one once it is done, so nothing changes on the host between
calls and CUDA-graph replays stay correct.

With PDL the kernel is launched as a programmatic dependent launch: each program loads its
first shrink weights (SHRINK_HEAD), then waits for the previous kernel (griddepcontrol.wait)
before reading anything that kernel may write (x, the workspace), and once past its last grid
barrier lets the next kernel launch. SHRINK_HEAD also runs alone, which the interpreter can.

A spin barrier deadlocks where programs run one after another (TRITON_INTERPRET=1), so the same
kernel also runs barrier-free (PERSISTENT=False): one launch per phase, chosen by the DO_*
flags, summing into the first shrink buffer, which the host zeroes before and after: both forms
share one workspace, and the persistent form expects the buffer of the current epoch zeroed.
"""

import triton
import triton.language as tl

from .runtime import TRITON_VERSION

SYNC_WORDS = 4  # arrivals, release flag, epoch, padding (int32 each)
# griddepcontrol compiles from Triton 3.5 on (3.4.0's gdc_wait takes `_builder` where its
# compiler passes `_semantic`; 3.3 has none). The kernel names it only through these helpers:
# Triton hashes every function a kernel's source names, PDL or not, and an attribute missing
# from tl.extra.cuda would fail every launch. The launch plan refuses PDL before 3.5.
PDL_SUPPORTED = TRITON_VERSION >= (3, 5) and hasattr(tl.extra.cuda, "gdc_wait")

if PDL_SUPPORTED:
    @triton.jit
    def _wait_for_previous_kernel():
        tl.extra.cuda.gdc_wait()

    @triton.jit
    def _let_next_kernel_launch():
        tl.extra.cuda.gdc_launch_dependents()
else:
    @triton.jit
    def _wait_for_previous_kernel():
        pass

    @triton.jit
    def _let_next_kernel_launch():
        pass


@triton.jit
def _prefetch_l2(ptrs):
    """Asks L2 for the cache line holding each pointer. Not pure, so it is kept although its
    (unwritten) result is unused; PTX, so never under the interpreter."""
    tl.inline_asm_elementwise("prefetch.global.L2 [$1];", "=r,l", [ptrs], dtype=tl.int32,
                              is_pure=False, pack=1)


@triton.jit
def _expand_line_offsets(line, pid, num_programs, m, c, BLOCK_OUT: tl.constexpr,
                         LINE_ELEMENTS: tl.constexpr):
    """Element offsets into C, one per cache line, of the `line`-th lines of this program's
    expand tiles taken in the order it expands them (tile pid, pid + num_programs, ...): a
    tile's rows are one contiguous range of C. Clamped to C's last element."""
    tile_elements = BLOCK_OUT * c.to(tl.int64)
    lines_per_tile = tl.cdiv(tile_elements, LINE_ELEMENTS)
    tile = pid + (line // lines_per_tile) * num_programs
    offsets = tile * tile_elements + (line % lines_per_tile) * LINE_ELEMENTS
    return tl.minimum(offsets, m.to(tl.int64) * c - 1)


@triton.jit
def _grid_barrier(sync_ptr, num_programs, flag, BUMP_EPOCH: tl.constexpr):
    """All programs wait here; the last to arrive resets the count and publishes `flag`, a value
    that no earlier barrier wrote (it grows with the epoch), so waiting takes no extra read."""
    tl.debug_barrier()  # every warp of this program has issued its phase's stores
    arrived = tl.atomic_add(sync_ptr, 1, sem="acq_rel")
    if arrived == num_programs - 1:
        tl.atomic_xchg(sync_ptr, 0, sem="relaxed")
        if BUMP_EPOCH:
            tl.atomic_add(sync_ptr + 2, 1, sem="relaxed")
        tl.atomic_xchg(sync_ptr + 1, flag, sem="release")
    else:
        while tl.atomic_add(sync_ptr + 1, 0, sem="acquire") != flag:
            pass
    tl.debug_barrier()


@triton.jit
def _epoch_sums(sync_ptr, sums_ptr, sums_size):
    """The epoch and the shrink buffer of this launch. Read before the first barrier, whose
    last arriver bumps the epoch: every program agrees."""
    epoch = tl.atomic_add(sync_ptr + 2, 0, sem="relaxed")
    return epoch, sums_ptr + (epoch % 2) * sums_size


@triton.jit
def _zero_next_sums(sums_ptr, epoch, sums_size, pid, num_programs, BLOCK: tl.constexpr):
    """The next launch sums into the other buffer: this program's share of it, zeroed."""
    next_sums = sums_ptr + ((epoch + 1) % 2) * sums_size
    for start in range(pid * BLOCK, sums_size, num_programs * BLOCK):
        offs = start + tl.arange(0, BLOCK)
        tl.store(next_sums + offs, tl.zeros((BLOCK,), tl.float32), mask=offs < sums_size)


@triton.jit
def _load_inputs(in_ptr, ld_in, offs_k, k_mask, scale_ptr, M, IN_IS_WORKSPACE: tl.constexpr,
                 HAS_SCALE: tl.constexpr, BLOCK_M: tl.constexpr):
    """in[:, offs_k] for the first M rows (zero beyond), times scale[offs_k] if given."""
    offs_m = tl.arange(0, BLOCK_M)
    in_mask = (offs_m[:, None] < M) & k_mask[None, :]
    in_ptrs = in_ptr + offs_m[:, None] * ld_in + offs_k[None, :]
    if IN_IS_WORKSPACE:  # written by other programs in this launch: skip the L1
        inputs = tl.load(in_ptrs, mask=in_mask, other=0.0, cache_modifier=".cg")
    else:
        inputs = tl.load(in_ptrs, mask=in_mask, other=0.0)
    if HAS_SCALE:
        scale = tl.load(scale_ptr + offs_k, mask=k_mask, other=0.0)
        inputs = inputs * scale.to(tl.float32)[None, :]
    return inputs


@triton.jit
def _dot(acc, inputs, weights, DOT_FP32: tl.constexpr):
    """acc += inputs · weightsᵀ with fp32 accumulation."""
    if DOT_FP32:
        return tl.dot(inputs.to(tl.float32), tl.trans(weights.to(tl.float32)), acc,
                      input_precision="ieee")
    # half-precision operands on the tensor cores, as the cuBLAS chain rounds them
    return tl.dot(inputs.to(weights.dtype), tl.trans(weights), acc)


@triton.jit
def _row_block_dot(acc, a_ptr, a_rows, a_row_mask, lda, in_ptr, ld_in, scale_ptr, M, k_begin,
                   k_end, IN_IS_WORKSPACE: tl.constexpr, HAS_SCALE: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, DOT_FP32: tl.constexpr):
    """acc[i, j] += Σ_k in[i, k]·scale[k]·A[a_rows[j], k] over k in [k_begin, k_end)."""
    for k0 in range(k_begin, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < k_end
        inputs = _load_inputs(in_ptr, ld_in, offs_k, k_mask, scale_ptr, M, IN_IS_WORKSPACE,
                              HAS_SCALE, BLOCK_M)
        weights = tl.load(a_ptr + a_rows[:, None] * lda + offs_k[None, :],
                          mask=a_row_mask[:, None] & k_mask[None, :], other=0.0)
        acc = _dot(acc, inputs, weights, DOT_FP32)
    return acc


@triton.jit
def _shrink_rows(rows_ptr, tile, r, base_rows, shrink_k_tiles, GATHER: tl.constexpr,
                 BLOCK_R: tl.constexpr):
    """The rank rows of a shrink tile, their mask, and the rows of R (or of the base weight,
    clamped so that no index reads outside it) they read."""
    offs_r = (tile // shrink_k_tiles) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = offs_r < r
    if GATHER:
        rows = tl.load(rows_ptr + offs_r, mask=r_mask, other=0)
        rows = tl.minimum(tl.maximum(rows, 0), base_rows - 1)
    else:
        rows = offs_r
    return offs_r, r_mask, rows.to(tl.int64)


@triton.jit
def _shrink_tile(tile, head, x_ptr, r_ptr, rows_ptr, sums, M, n, r, base_rows, shrink_tile_k,
                 shrink_k_tiles, USE_HEAD: tl.constexpr, GATHER: tl.constexpr,
                 DOT_FP32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    """sums[:, tile's rank rows] += x[:, tile's K slice] · R[rows, slice]ᵀ; `head` holds the
    slice's first BLOCK_K columns of R when USE_HEAD, loaded earlier by the caller."""
    offs_m = tl.arange(0, BLOCK_M)
    offs_r, r_mask, rows = _shrink_rows(rows_ptr, tile, r, base_rows, shrink_k_tiles, GATHER,
                                        BLOCK_R)
    k_begin = (tile % shrink_k_tiles) * shrink_tile_k
    k_end = tl.minimum(k_begin + shrink_tile_k, n)
    acc = tl.zeros((BLOCK_M, BLOCK_R), tl.float32)
    if USE_HEAD:
        offs_k = k_begin + tl.arange(0, BLOCK_K)
        inputs = _load_inputs(x_ptr, n, offs_k, offs_k < k_end, x_ptr, M, False, False,
                              BLOCK_M)
        acc = _dot(acc, inputs, head, DOT_FP32)
        k_begin += BLOCK_K
    acc = _row_block_dot(acc, r_ptr, rows, r_mask, n, x_ptr, n, x_ptr, M, k_begin, k_end,
                         False, False, BLOCK_M, BLOCK_K, DOT_FP32)
    tl.atomic_add(sums + offs_m[:, None] * r + offs_r[None, :], acc,
                  mask=(offs_m[:, None] < M) & r_mask[None, :], sem="relaxed")


@triton.jit
def _expand_tile(tile, head, c_ptr, in_ptr, ld_in, u_ptr, bias_ptr, y_ptr, M, c, m,
                 USE_HEAD: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr,
                 DOT_FP32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_OUT: tl.constexpr,
                 BLOCK_IN: tl.constexpr, PREFETCH_IN: tl.constexpr):
    """y[:, tile rows] = in · C[tile rows, :]ᵀ (+ b); `head` holds C's first PREFETCH_IN
    columns of these rows when USE_HEAD, loaded earlier by the caller."""
    offs_m = tl.arange(0, BLOCK_M)
    offs_out = tile * BLOCK_OUT + tl.arange(0, BLOCK_OUT)
    out_mask = offs_out < m
    acc = tl.zeros((BLOCK_M, BLOCK_OUT), tl.float32)
    k_begin = 0
    if USE_HEAD:
        offs_k = tl.arange(0, PREFETCH_IN)
        inputs = _load_inputs(in_ptr, ld_in, offs_k, offs_k < c, u_ptr, M, True, HAS_SCALE,
                              BLOCK_M)
        acc = _dot(acc, inputs, head, DOT_FP32)
        k_begin = PREFETCH_IN
    acc = _row_block_dot(acc, c_ptr, offs_out.to(tl.int64), out_mask, c, in_ptr, ld_in, u_ptr,
                         M, k_begin, c, True, HAS_SCALE, BLOCK_M, BLOCK_IN, DOT_FP32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_out, mask=out_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * m + offs_out[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(offs_m[:, None] < M) & out_mask[None, :])


@triton.jit
def cur_linear_decode_kernel(
        x_ptr, r_ptr, rows_ptr, u_ptr, c_ptr, bias_ptr, y_ptr, sums_ptr, link_ptr, sync_ptr,
        M, n, r, c, m, base_rows, shrink_tile_k, shrink_k_tiles,
        PERSISTENT: tl.constexpr, DO_SHRINK: tl.constexpr, DO_LINK: tl.constexpr,
        DO_EXPAND: tl.constexpr, DIAGONAL_U: tl.constexpr, FULL_U: tl.constexpr,
        HAS_BIAS: tl.constexpr, GATHER: tl.constexpr, DOT_FP32: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_OUT: tl.constexpr,
        BLOCK_IN: tl.constexpr, PREFETCH: tl.constexpr, PREFETCH_IN: tl.constexpr,
        SHRINK_HEAD: tl.constexpr, PDL: tl.constexpr, WORKSPACE_ROWS: tl.constexpr,
        L2_LINES: tl.constexpr, L2_STEP: tl.constexpr, LINE_ELEMENTS: tl.constexpr):
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    offs_m = tl.arange(0, BLOCK_M)
    sums_size = WORKSPACE_ROWS * r
    shrink_tiles = tl.cdiv(r, BLOCK_R) * shrink_k_tiles
    shrink_head = tl.zeros((BLOCK_R, BLOCK_K), r_ptr.dtype.element_ty)
    if DO_SHRINK and SHRINK_HEAD:  # weights only: nothing an earlier kernel writes
        head_r, head_mask, head_rows = _shrink_rows(rows_ptr, pid, r, base_rows, shrink_k_tiles,
                                                    GATHER, BLOCK_R)
        head_k0 = (pid % shrink_k_tiles) * shrink_tile_k
        head_k = head_k0 + tl.arange(0, BLOCK_K)
        head_kmask = head_k < tl.minimum(head_k0 + shrink_tile_k, n)
        shrink_head = tl.load(r_ptr + head_rows[:, None] * n + head_k[None, :],
                              mask=(head_mask & (pid < shrink_tiles))[:, None]
                              & head_kmask[None, :], other=0.0)
    if PDL:  # launched early beside the previous kernel: wait for it before touching its data
        _wait_for_previous_kernel()
    sums = sums_ptr
    epoch = 0
    if PERSISTENT:
        epoch, sums = _epoch_sums(sync_ptr, sums_ptr, sums_size)

    if DO_SHRINK:
        if pid < shrink_tiles:
            _shrink_tile(pid, shrink_head, x_ptr, r_ptr, rows_ptr, sums, M, n, r, base_rows,
                         shrink_tile_k, shrink_k_tiles, SHRINK_HEAD, GATHER, DOT_FP32, BLOCK_M,
                         BLOCK_R, BLOCK_K)
        for tile in range(pid + num_programs, shrink_tiles, num_programs):
            _shrink_tile(tile, shrink_head, x_ptr, r_ptr, rows_ptr, sums, M, n, r, base_rows,
                         shrink_tile_k, shrink_k_tiles, False, GATHER, DOT_FP32, BLOCK_M,
                         BLOCK_R, BLOCK_K)

    # C does not depend on the shrink: stream it meanwhile (programs with expand tiles only).
    # Parenthesized: Triton 3.1 (which torch 2.5 pins) rejects a chain of three boolean operands.
    if (DO_EXPAND and L2_LINES > 0) and pid < tl.cdiv(m, BLOCK_OUT):
        for start in range(0, L2_LINES, L2_STEP):
            line = start + tl.arange(0, L2_STEP)
            _prefetch_l2(c_ptr + _expand_line_offsets(line, pid, num_programs, m, c, BLOCK_OUT,
                                                      LINE_ELEMENTS))

    head = tl.zeros((BLOCK_OUT, PREFETCH_IN), c_ptr.dtype.element_ty)
    if DO_EXPAND and PREFETCH:  # C does not depend on the shrink: start reading it now
        head_rows = pid * BLOCK_OUT + tl.arange(0, BLOCK_OUT)
        head_cols = tl.arange(0, PREFETCH_IN)
        head = tl.load(c_ptr + head_rows.to(tl.int64)[:, None] * c + head_cols[None, :],
                       mask=(head_rows < m)[:, None] & (head_cols < c)[None, :], other=0.0)
    if PERSISTENT:
        _grid_barrier(sync_ptr, num_programs, epoch * 2 + 1, True)

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
            _grid_barrier(sync_ptr, num_programs, epoch * 2 + 2, False)

    if PDL:  # every program is past its last barrier: the next kernel may start launching
        _let_next_kernel_launch()

    if DO_EXPAND:
        if FULL_U:
            expand_in = link_ptr
            ld_in = c
        else:
            expand_in = sums
            ld_in = r
        expand_tiles = tl.cdiv(m, BLOCK_OUT)
        if pid < expand_tiles:
            _expand_tile(pid, head, c_ptr, expand_in, ld_in, u_ptr, bias_ptr, y_ptr, M, c, m,
                         PREFETCH, DIAGONAL_U, HAS_BIAS, DOT_FP32, BLOCK_M, BLOCK_OUT,
                         BLOCK_IN, PREFETCH_IN)
        for tile in range(pid + num_programs, expand_tiles, num_programs):
            _expand_tile(tile, head, c_ptr, expand_in, ld_in, u_ptr, bias_ptr, y_ptr, M, c, m,
                         False, DIAGONAL_U, HAS_BIAS, DOT_FP32, BLOCK_M, BLOCK_OUT, BLOCK_IN,
                         PREFETCH_IN)

    if PERSISTENT:
        _zero_next_sums(sums_ptr, epoch, sums_size, pid, num_programs, BLOCK_IN)


@triton.jit
def cur_linear_group_decode_kernel(
        x_ptr, r_ptr, sums_ptr, sync_ptr, c0_ptr, c1_ptr, c2_ptr, bias0_ptr, bias1_ptr,
        bias2_ptr, y0_ptr, y1_ptr, y2_ptr, M, n, r, m0, m1, m2, col1, col2, shrink_tile_k,
        shrink_k_tiles,
        PERSISTENT: tl.constexpr, DO_SHRINK: tl.constexpr, DO_EXPAND: tl.constexpr,
        MEMBERS: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
        BLOCK_OUT: tl.constexpr, BLOCK_IN: tl.constexpr, WORKSPACE_ROWS: tl.constexpr):
    """Sibling projections of one input in one launch: y_i = C_i·(R·x)[cols_i] (+ b_i) for
    MEMBERS (2 or 3) members whose shrink factors are stacked in R (r rows; member i's are
    rows col_i to col_{i+1}, col_0 = 0). The shrink runs once over the stacked R as in
    `cur_linear_decode_kernel`; the expand tiles of all members are spread over the grid,
    member 0's first. Same workspace, epoch and barrier; no link, gather or prefetch."""
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    sums_size = WORKSPACE_ROWS * r
    shrink_tiles = tl.cdiv(r, BLOCK_R) * shrink_k_tiles
    sums = sums_ptr
    epoch = 0
    if PERSISTENT:
        epoch, sums = _epoch_sums(sync_ptr, sums_ptr, sums_size)
    if DO_SHRINK:
        no_head = tl.zeros((BLOCK_R, BLOCK_K), r_ptr.dtype.element_ty)
        for tile in range(pid, shrink_tiles, num_programs):
            _shrink_tile(tile, no_head, x_ptr, r_ptr, r_ptr, sums, M, n, r, r, shrink_tile_k,
                         shrink_k_tiles, False, False, DOT_FP32, BLOCK_M, BLOCK_R, BLOCK_K)
    if PERSISTENT:
        _grid_barrier(sync_ptr, num_programs, epoch * 2 + 1, True)
    if DO_EXPAND:
        no_head = tl.zeros((BLOCK_OUT, 16), c0_ptr.dtype.element_ty)
        tiles0 = tl.cdiv(m0, BLOCK_OUT)
        tiles1 = tl.cdiv(m1, BLOCK_OUT)
        end1 = r
        expand_tiles = tiles0 + tiles1
        if MEMBERS == 3:
            end1 = col2
            expand_tiles += tl.cdiv(m2, BLOCK_OUT)
        for tile in range(pid, expand_tiles, num_programs):
            # The tile's member, chosen by pointer and size: one expand loop in the kernel,
            # not one per member (each would keep its own pipeline buffers and registers).
            # Without biases bias_ptr stands in as c0_ptr, never read: Triton 3.3 cannot
            # carry a None through the branches below.
            c_ptr, y_ptr = c0_ptr, y0_ptr
            bias_ptr = c0_ptr
            if HAS_BIAS:
                bias_ptr = bias0_ptr
            col, width, m, local = col1 * 0, col1, m0, tile
            if tile >= tiles0:
                c_ptr, y_ptr = c1_ptr, y1_ptr
                col, width, m, local = col1, end1 - col1, m1, tile - tiles0
                if HAS_BIAS:
                    bias_ptr = bias1_ptr
            if MEMBERS == 3:
                if tile >= tiles0 + tiles1:
                    c_ptr, y_ptr = c2_ptr, y2_ptr
                    col, width, m, local = col2, r - col2, m2, tile - tiles0 - tiles1
                    if HAS_BIAS:
                        bias_ptr = bias2_ptr
            _expand_tile(local, no_head, c_ptr, sums + col, r, c_ptr, bias_ptr, y_ptr, M, width,
                         m, False, False, HAS_BIAS, DOT_FP32, BLOCK_M, BLOCK_OUT, BLOCK_IN, 16)
    if PERSISTENT:
        _zero_next_sums(sums_ptr, epoch, sums_size, pid, num_programs, BLOCK_IN)
