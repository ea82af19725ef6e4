"""Host side of the Triton prefill kernel (many input rows): config, rank chunks, launches."""

import torch
import triton

from .. import settings
from ..backend_error import BackendUnavailableError
from ..factors import fold_link
from ..tables import DECODE_MAX_ROWS
from .prefill_kernel import cur_linear_prefill_kernel
from .prefill_tuning import PrefillConfig, next_pow2, tuned_config
from .runtime import TRITON_VERSION, check_interpretable


def _check_prefill_compiles(x2d: torch.Tensor) -> None:
    """Triton 3.2's compiler aborts the process (an assertion in LinearLayout::reshapeOuts) on
    the prefill kernel in half precision for sm_90 (compiled without a GPU: sm_80, fp32 and
    Triton 3.1, 3.3 to 3.8 build it); an exception is the least a caller is owed."""
    if (TRITON_VERSION == (3, 2) and x2d.dtype in (torch.float16, torch.bfloat16)
            and x2d.is_cuda and torch.cuda.get_device_capability(x2d.device)[0] >= 9):
        raise BackendUnavailableError(
            f"the Triton prefill kernel does not compile with Triton {triton.__version__} for "
            f"{x2d.dtype} on this GPU (sm_90); use backend='auto' or 'torch' (the cuBLAS chain) "
            f"for more than {DECODE_MAX_ROWS} rows, or Triton ≥ 3.3")


def cur_linear_prefill(x2d, C, U, R, bias, rows, y) -> None:
    """Writes y (M, m) from x2d (M, n) with the prefill kernel, its config tuned per shape class
    (prefill_tuning.py)."""
    check_interpretable(x2d.dtype)
    _check_prefill_compiles(x2d)
    M, n = x2d.shape
    m = C.shape[0]
    scale = None
    if U is not None and U.dim() == 2:
        # The kernel keeps one rank-sized intermediate on chip; a full U is folded into C here
        # (m·c·r flops, small next to a prefill). Frozen modules fold U once at load instead.
        C = fold_link(C, U, torch.float32)
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

    key = (x2d.device.index, x2d.dtype, min(next_pow2(M), 8192), n, m, r, rows is not None,
           scale is not None)
    run(tuned_config(key, x2d.device, x2d.dtype, M, r, settings.current.triton_interpret, run))
