"""The math: `cur_linear` and its backends (the torch chain, Triton, the CUDA extension)."""

from .backend_error import BackendUnavailableError
from .dispatch import BACKENDS, extension_status, unavailable_reason
from .op import cur_linear, shared_group
from .settings import reload as reload_settings
from .torch_chain import cur_linear_torch, shared_chain

__all__ = ["BACKENDS", "BackendUnavailableError", "cur_linear", "cur_linear_torch",
           "extension_status", "reload_settings", "shared_chain", "shared_group",
           "unavailable_reason"]
