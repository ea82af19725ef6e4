"""Triton prefill kernel (many input rows): a chained GEMM per block of rows.

Program (row block, column split) computes t = x_blk·R[chunk]ᵀ (BLOCK_M × R_CHUNK, fp32 on
chip), scales it by a diagonal U, then walks its share of the output columns computing
y_blk = t·C[cols, chunk]ᵀ + b on the tensor cores. The intermediate never reaches memory.
Splitting the columns over SPLIT_N programs fills the GPU when M is small, at the price of
recomputing t once per split. Ranks above R_CHUNK run one launch per rank chunk, summing
partial outputs in an fp32 buffer (the last launch adds the bias and writes y).
"""

import triton
import triton.language as tl


@triton.jit
def cur_linear_prefill_kernel(
        x_ptr, r_ptr, rows_ptr, scale_ptr, c_ptr, bias_ptr, y_ptr, partial_ptr,
        M, n, r, m, base_rows, r_begin,
        GATHER: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr,
        ACCUMULATE: tl.constexpr, FINAL: tl.constexpr, DOT_FP32: tl.constexpr,
        BLOCK_M: tl.constexpr, R_CHUNK: tl.constexpr, BLOCK_K: tl.constexpr,
        BLOCK_N: tl.constexpr, SPLIT_N: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_split = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    offs_r = r_begin + tl.arange(0, R_CHUNK)
    r_mask = offs_r < r
    if GATHER:  # rows of the base weight, clamped so that no index reads outside it
        rows = tl.load(rows_ptr + offs_r, mask=r_mask, other=0)
        rows = tl.minimum(tl.maximum(rows, 0), base_rows - 1).to(tl.int64)
    else:
        rows = offs_r.to(tl.int64)
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * n

    t = tl.zeros((BLOCK_M, R_CHUNK), tl.float32)
    for k0 in range(0, n, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < n
        x = tl.load(x_rows + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(r_ptr + rows[:, None] * n + offs_k[None, :],
                    mask=r_mask[:, None] & k_mask[None, :], other=0.0)
        if DOT_FP32:
            t = tl.dot(x, tl.trans(w), t, input_precision="ieee")
        else:
            t = tl.dot(x, tl.trans(w), t)
    if HAS_SCALE:
        t = t * tl.load(scale_ptr + offs_r, mask=r_mask, other=0.0).to(tl.float32)[None, :]
    # Tensor-core operand for the expand: the input dtype, as the cuBLAS chain rounds it.
    t_operand = t.to(c_ptr.dtype.element_ty)

    for n0 in range(pid_split * BLOCK_N, m, SPLIT_N * BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < m
        c_tile = tl.load(c_ptr + offs_n.to(tl.int64)[:, None] * r + offs_r[None, :],
                         mask=n_mask[:, None] & r_mask[None, :], other=0.0)
        if DOT_FP32:
            y = tl.dot(t_operand, tl.trans(c_tile), input_precision="ieee")
        else:
            y = tl.dot(t_operand, tl.trans(c_tile))
        out_offsets = offs_m.to(tl.int64)[:, None] * m + offs_n[None, :]
        out_mask = m_mask[:, None] & n_mask[None, :]
        if ACCUMULATE:
            y += tl.load(partial_ptr + out_offsets, mask=out_mask, other=0.0)
        if FINAL:
            if HAS_BIAS:
                y += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
            tl.store(y_ptr + out_offsets, y.to(y_ptr.dtype.element_ty), mask=out_mask)
        else:
            tl.store(partial_ptr + out_offsets, y, mask=out_mask)
