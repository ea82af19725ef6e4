"""Runs the decode and group kernels' launches through the installed Triton's own `run` and through
`CachedLaunch`'s direct path, on a stand-in CUDA driver, and checks that the compiled kernel's
launcher receives the same arguments from both (before Triton 3.3, where CachedLaunch always
takes Triton's path, that the kernel compiles and launches through it). Nothing runs on a GPU: the stand-in driver
reports an sm_90 device, Triton compiles for it (its own ptxas), and the launcher only records
its call. Run as a script: TRITON_INTERPRET must be unset when the kernels are defined.
The prefill kernel is compiled and launched through Triton's run too. Prints one line per
checked launch; exits non-zero on any difference."""

import os
import sys

import torch
from triton.backends.compiler import GPUTarget
from triton.runtime import driver

from curkernels.ops import settings
from curkernels.ops.triton import decode, prefill
from curkernels.ops.triton import launch as triton_launch
from curkernels.ops.triton.runtime import TRITON_VERSION

DEVICE, STREAM = 0, 0x5EED


class RecordingLauncher:
    """Stands in for the compiled kernel's launcher: records each call."""
    calls: list[tuple] = []

    def __init__(self, src, metadata):
        pass

    def __call__(self, *args):
        RecordingLauncher.calls.append(args)


class StandInUtils:
    def get_device_properties(self, device):
        return {"max_shared_mem": 227 * 1024, "multiprocessor_count": 132}

    def load_binary(self, name, kernel, shared, device):
        handles = ("module", f"function:{name}", 128, 0)  # module, function, registers, spills
        return handles + (1024,) if TRITON_VERSION >= (3, 4) else handles  # max threads

    def unload_module(self, module):
        pass


class StandInDriver:
    """What `JITFunction.run` and `CompiledKernel` ask of the active driver."""
    launcher_cls = RecordingLauncher
    utils = StandInUtils()

    def get_current_device(self):
        return DEVICE

    def get_current_stream(self, device):
        return STREAM

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)


def comparable(call: tuple) -> tuple:
    """A launcher call without the launch metadata and hooks, which Triton builds (empty hook
    chains, metadata for them) and CachedLaunch leaves out (None) when no hook is installed."""
    return call[:6] + call[9:]


def describe_difference(through_triton: tuple, direct: tuple) -> str:
    if len(through_triton) != len(direct):
        return f"{len(through_triton)} arguments through Triton, {len(direct)} direct"

    def short(value):
        return f"tensor{tuple(value.shape)}" if isinstance(value, torch.Tensor) else repr(value)
    return "; ".join(f"argument {i}: {short(a)} through Triton, {short(b)} direct"
                     for i, (a, b) in enumerate(zip(through_triton, direct, strict=True))
                     if a is not b and (isinstance(a, torch.Tensor) or a != b))


def check_launch(label: str, launch, specialization: tuple, args: tuple) -> bool:
    """Two calls of a CachedLaunch: Triton's run (compiles), then the cached kernel's launcher,
    which must get the same arguments; prints the outcome."""
    RecordingLauncher.calls.clear()
    known = launch.specializations  # plans are shared across a row block
    for _ in range(2):
        launch(specialization, *args)
    if not launch.fast:  # before Triton 3.3: both calls compile and launch through run
        alike = len(RecordingLauncher.calls) == 2 and launch.specializations == 0
        print(f"{'ok  ' if alike else 'FAIL'} {label}: Triton "
              f"{triton_launch.triton.__version__}'s own run, twice")
        return alike
    through_triton, direct = RecordingLauncher.calls
    if launch.specializations == known + 1 and comparable(through_triton) == comparable(direct) \
            and direct[6:9] == (None, None, None):
        print(f"ok   {label}: {len(direct)} launcher arguments alike")
        return True
    print(f"FAIL {label}: {launch.specializations - known} kernels kept; "
          f"{describe_difference(comparable(through_triton), comparable(direct))}")
    return False


def main() -> int:
    assert os.environ.get("TRITON_INTERPRET") != "1", "unset TRITON_INTERPRET to compile"
    driver.set_active(StandInDriver())
    triton_launch._current_device = lambda: DEVICE
    triton_launch._current_stream = lambda device: STREAM
    decode._multiprocessors = lambda device_index: 132
    n, r, m, dtype = 256, 64, 128, torch.bfloat16
    failures = 0
    for u_kind, M in (("none", 1), ("none", 3), ("diagonal", 16), ("none", 40)):
        block_rows = decode.decode_block_rows(M)
        plan = decode._decode_plan(torch.device("cuda", DEVICE), dtype, n, r, r, m,
                                           block_rows, u_kind, True, False, True,
                                           decode.DEFAULT_DECODE_CONFIG)
        (launch,) = plan.launches
        x, R = torch.zeros(M, n, dtype=dtype), torch.zeros(r, n, dtype=dtype)
        C, y = torch.zeros(m, r, dtype=dtype), torch.zeros(M, m, dtype=dtype)
        U = torch.ones(r, dtype=dtype) if u_kind == "diagonal" else None
        bias = torch.zeros(m, dtype=dtype)
        sums, link = torch.zeros(2 * block_rows * r), torch.zeros(block_rows * r)
        sync = torch.zeros(4, dtype=torch.int32)
        args = (x, R, None, U, C, bias, y, sums, link, sync, M, n, r, r, m, r,
                plan.shrink_tile_k, plan.shrink_k_tiles)
        failures += not check_launch(f"U={u_kind} M={M}", launch, (M, r), args)
    # The sibling-group kernel (q/k/v-like: three members with biases), the same way.
    ranks, ms, M = (32, 16, 16), (128, 64, 64), 2
    plan = decode._group_plan(torch.device("cuda", DEVICE), dtype, n, ranks, ms, 16, True,
                                    True)
    (launch,) = plan.launches
    expands = [torch.zeros(rows, rank, dtype=dtype) for rows, rank in zip(ms, ranks, strict=True)]
    biases = [torch.zeros(rows, dtype=dtype) for rows in ms]
    outputs = [torch.zeros(M, rows, dtype=dtype) for rows in ms]
    args = (torch.zeros(M, n, dtype=dtype), torch.zeros(sum(ranks), n, dtype=dtype),
            torch.zeros(2 * 16 * sum(ranks)), torch.zeros(4, dtype=torch.int32), *expands,
            *biases, *outputs, M, n, sum(ranks), *ms, ranks[0], ranks[0] + ranks[1],
            plan.shrink_tile_k, plan.shrink_k_tiles)
    failures += not check_launch(f"group M={M}", launch, (M,), args)
    # The prefill kernel through Triton's own run (its launches are not cached): it compiles
    # and launches on this Triton.
    RecordingLauncher.calls.clear()
    os.environ["CURKERNELS_TRITON_AUTOTUNE"] = "0"
    settings.reload()
    M = 40
    prefill.cur_linear_prefill(torch.zeros(M, n, dtype=dtype), torch.zeros(m, r, dtype=dtype),
                               None, torch.zeros(r, n, dtype=dtype), None, None,
                               torch.zeros(M, m, dtype=dtype))
    launched = len(RecordingLauncher.calls) >= 1
    print(f"{'ok  ' if launched else 'FAIL'} prefill M={M}: {len(RecordingLauncher.calls)} "
          f"launches through Triton's run")
    failures += not launched
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
