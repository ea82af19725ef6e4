"""Choose the backend of one `cur_linear` call."""

import os

import torch

from .backends import BACKENDS, unavailable_reason
from .errors import BackendUnavailableError

ENV_BACKEND = "CURKERNELS_BACKEND"
DECODE_MAX_ROWS = 16


def requested_backend(backend: str) -> str:
    """The argument, unless it is 'auto' and CURKERNELS_BACKEND forces one."""
    if backend == "auto":
        backend = os.environ.get(ENV_BACKEND, "auto") or "auto"
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or 'auto' "
                         f"(argument or {ENV_BACKEND}), got {backend!r}")
    return backend


def choose_backend(backend: str, x: torch.Tensor, num_rows: int) -> str:
    """A named backend runs or raises; 'auto' picks the fastest that runs here."""
    backend = requested_backend(backend)
    if backend != "auto":
        reason = unavailable_reason(backend, x.device)
        if reason is not None:
            raise BackendUnavailableError(f"backend {backend!r} is unavailable: {reason}")
        return backend
    if x.device.type != "cuda":
        return "torch"
    if num_rows <= DECODE_MAX_ROWS and unavailable_reason("cuda", x.device) is None:
        return "cuda"
    if unavailable_reason("triton", x.device) is None:
        return "triton"
    return "torch"
