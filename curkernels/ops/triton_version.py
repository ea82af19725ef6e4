"""The installed Triton's (major, minor): what kernels and launches may use differs across the
releases that torch ≥ 2.5 pins (Triton 3.1 to 3.8)."""

import triton

TRITON_VERSION = tuple(int(part) for part in triton.__version__.split(".")[:2])
