"""The backends of `cur_linear` and why each one can or cannot run.

Each backend is a function `(x, C, U, R, bias, rows) -> y` with x (..., n) and y (..., m), as
`F.linear` takes and gives them: flattening x and reshaping y around a call would cost
microseconds of host time on every eager call. The Triton backend (CONTIGUOUS_INPUT_BACKENDS)
needs x contiguous, which execute.py makes it; the torch and CUDA backends take any strides. The torch backend always runs; triton needs the triton package and a CUDA tensor
(or the interpreter, TRITON_INTERPRET=1, on CPU tensors); cuda needs the compiled extension
`curkernels._C`.
"""

import functools
import importlib
import os
from collections.abc import Callable

import torch

from .reference import cur_linear_torch

BACKENDS = ("torch", "triton", "cuda")
CONTIGUOUS_INPUT_BACKENDS = ("triton",)


@functools.cache
def _import_error(module: str) -> str | None:
    try:
        importlib.import_module(module)
    except Exception as exc:  # any import failure makes the backend unavailable, with its reason
        return f"{type(exc).__name__}: {exc}"
    return None


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def extension_status() -> tuple[bool, str]:
    """Whether curkernels._C imports, with the reason when it does not."""
    error = _import_error("curkernels._C")
    if error is None:
        return True, "curkernels._C imported"
    if "No module named 'curkernels._C'" in error:
        return False, ("curkernels._C was not built (no nvcc or a CPU build of torch at install "
                       "time, or CURKERNELS_SKIP_CUDA_BUILD=1); reinstall with a CUDA toolkit")
    return False, f"curkernels._C failed to import: {error}"


def unavailable_reason(backend: str, device: torch.device) -> str | None:
    """None when `backend` can run on tensors of `device`, else why not."""
    if backend == "torch":
        return None
    if backend == "triton":
        error = _import_error("triton")
        if error is not None:
            return f"triton is not importable ({error})"
        if device.type == "cuda" or (device.type == "cpu" and triton_interpreting()):
            return None
        return (f"triton runs on CUDA tensors (or CPU tensors with TRITON_INTERPRET=1); "
                f"the input is on {device}")
    if backend == "cuda":
        built, why = extension_status()
        if not built:
            return why
        if device.type != "cuda":
            return f"the CUDA extension needs CUDA tensors; the input is on {device}"
        return None
    raise ValueError(f"backend must be one of {BACKENDS} or 'auto', got {backend!r}")


def backend_function(backend: str) -> Callable:
    if backend == "torch":
        return cur_linear_torch
    if backend == "triton":
        from .triton_backend import cur_linear_triton
        return cur_linear_triton
    if backend == "cuda":
        from .cuda_backend import cur_linear_cuda
        return cur_linear_cuda
    raise ValueError(f"backend must be one of {BACKENDS} or 'auto', got {backend!r}")
