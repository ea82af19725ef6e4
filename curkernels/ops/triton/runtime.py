"""What the installed Triton can do here: its (major, minor) and whether its interpreter can
compute a dtype.

Kernels and launches differ across the releases that torch ≥ 2.5 pins (Triton 3.1 to 3.8).
The interpreter (TRITON_INTERPRET=1, CPU tensors) has no bf16 arithmetic: it returns garbage
for bf16 inputs, so a bf16 call under it is refused instead.
"""

import torch
import triton

from .. import settings

TRITON_VERSION = tuple(int(part) for part in triton.__version__.split(".")[:2])


def check_interpretable(dtype: torch.dtype) -> None:
    """Raises TypeError, naming the dtype and why, for bf16 under Triton's interpreter."""
    if dtype == torch.bfloat16 and settings.current.triton_interpret:
        raise TypeError("the Triton backend does not run torch.bfloat16 under the interpreter "
                        "(TRITON_INTERPRET=1): the interpreter has no bf16 arithmetic and would "
                        "return garbage; use float32/float16 there, or backend='torch'")
