"""The math: `cur_linear` and its backends (torch reference, Triton, CUDA)."""

from .backends import BACKENDS, extension_status, unavailable_reason
from .cur_linear import cur_linear
from .errors import BackendUnavailableError
from .reference import cur_linear_torch

__all__ = ["BACKENDS", "BackendUnavailableError", "cur_linear", "cur_linear_torch",
           "extension_status", "unavailable_reason"]
