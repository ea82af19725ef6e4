"""Launch a Triton kernel again without Triton's per-call argument binding.

`kernel[grid](*args, **constexprs)` binds every argument, specialises it and builds a cache key
on each call: 14–27 µs of Python for the decode kernel's 37 parameters on the 2-core CI machine
(Triton 3.8's binder and cache key timed alone), more than the GPU time of a decode call, so
eagerly it decides the call's cost. `CachedLaunch` fixes the constexprs and the grid, goes
through Triton once per specialisation and keeps the compiled kernel; later calls hand the
arguments straight to the compiled kernel's launcher, which is what Triton's own `run` does
last.

A compiled kernel is reused only for calls that Triton would have compiled the same way. Triton
specialises integers on their value (1, multiples of 16) and tensors on their dtype and 16-byte
alignment. Computing that key from every argument costs about as much as Triton's binding, so
the caller, which knows which of its arguments vary, passes it: the decode backend keys on the
row count and the base weight's rows (every other integer and dtype is fixed by its launch
plan) and takes Triton's path when a pointer is not 16-byte aligned. Triton's own path is also
taken where its launcher convention is not this one (before 3.3: constexprs were not passed),
while a profiler hooks launches, while a pre-run hook is registered, and under the
interpreter. The compile options (TRITON_DEBUG and the like) stay as they were at a
specialisation's first call.
"""

import torch
import triton

from .runtime import TRITON_VERSION

# From Triton 3.3 on, `JITFunction.run` ends with
#   kernel.run(grid_0, grid_1, grid_2, stream, kernel.function, kernel.packed_metadata,
#              launch_metadata, enter_hook, exit_hook, *bound_args.values())
# with every parameter, constexprs included, in signature order (checked in 3.3 to 3.8).
SUPPORTED = TRITON_VERSION >= (3, 3)


def _current_device() -> int:
    return torch.cuda.current_device()


def _current_stream(device: int) -> int:
    # The raw-stream query Triton's own launcher uses: torch.cuda.current_stream() costs µs.
    return torch._C._cuda_getCurrentRawStream(device)


def _launch_hooks() -> tuple:
    """The launch enter and exit hooks (from Triton 3.4 on, chains that are empty by default)."""
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook
    from triton.compiler import CompiledKernel  # Triton 3.3 kept them on the class
    return CompiledKernel.launch_enter_hook, CompiledKernel.launch_exit_hook


def _hooks_installed() -> bool:
    """Whether a profiler hooks kernel launches: an empty hook chain does nothing, so the
    launcher may skip it; anything else must see every launch."""
    return any(hook is not None and getattr(hook, "calls", True) for hook in _launch_hooks())


class CachedLaunch:
    """`kernel[(grid,)](*args, **constexprs)` with the grid and constexprs fixed.

    Args:
        kernel: a `triton.jit` function.
        grid: the number of programs (a 1-D grid).
        constexprs: every constexpr parameter of `kernel` by name, plus launch options
            (num_warps, launch_pdl, ...), which are passed to Triton as they are.
    """

    def __init__(self, kernel, grid: int, constexprs: dict):
        self.kernel = kernel
        self.grid = grid
        self.constexprs = constexprs
        # Whether later calls may bypass Triton's binding.
        self.fast = SUPPORTED and not triton_interpreted(kernel)
        self._compiled: dict[tuple, object] = {}
        if self.fast:
            params = kernel.params
            runtime = sum(1 for p in params if not p.is_constexpr)
            if any(p.is_constexpr for p in params[:runtime]):
                raise ValueError(f"{kernel.__name__}: CachedLaunch needs the constexpr "
                                 f"parameters after the runtime ones")
            constexpr_names = [p.name for p in params[runtime:]]
            missing = [name for name in constexpr_names if name not in constexprs]
            if missing:
                raise ValueError(f"{kernel.__name__}: constexprs must give every constexpr "
                                 f"parameter; missing {missing}")
            self._constexpr_values = tuple(constexprs[name] for name in constexpr_names)

    def __call__(self, specialization: tuple | None, *args) -> None:
        """Launches on the current stream of the current device. `args` are the runtime
        parameters, in order; `specialization` is the caller's key for everything Triton
        specialises them on that can change between its calls (see `pointers_aligned`), or
        None to take Triton's path."""
        if not self.fast or specialization is None:
            self.kernel[(self.grid,)](*args, **self.constexprs)
            return
        device = _current_device()
        key = (device, specialization)
        compiled = self._compiled.get(key)
        if compiled is None or getattr(self.kernel, "pre_run_hooks", None) or _hooks_installed():
            compiled = self.kernel[(self.grid,)](*args, **self.constexprs)
            if compiled is not None:
                self._compiled[key] = compiled
            return
        compiled.run(self.grid, 1, 1, _current_stream(device), compiled.function,
                     compiled.packed_metadata, None, None, None, *args, *self._constexpr_values)

    @property
    def specializations(self) -> int:
        """How many compiled kernels the fast path holds (tests read it)."""
        return len(self._compiled)


def triton_interpreted(kernel) -> bool:
    """Under TRITON_INTERPRET=1 `triton.jit` makes an interpreted function: no compiled kernel."""
    return not hasattr(kernel, "device_caches")


def pointers_aligned(*tensors: torch.Tensor | None) -> bool:
    """Whether every tensor given starts on a 16-byte boundary (Triton compiles aligned and
    unaligned pointers apart)."""
    address = 0
    for tensor in tensors:
        if tensor is not None:
            address |= tensor.data_ptr()
    return not address & 15
