"""`CachedLaunch`: Triton's binding on a specialisation's first call, the compiled kernel's own
launcher afterwards, and Triton's path wherever a reused kernel could be the wrong one.

On the CPU the kernel is a stand-in that records how it was launched, and the real decode kernel
is compiled and launched on a stand-in driver through both paths; on a GPU the decode kernel
runs through both paths against the fp64 reference.
"""

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import triton
from cur_linear_cases import assert_matches_reference, make_case

from curkernels.ops.triton import decode as decode_host
from curkernels.ops.triton import launch as triton_launch
from curkernels.ops.triton.launch import CachedLaunch, pointers_aligned

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CHECK = Path(__file__).with_name("triton_launch_check.py")
STREAM = 7


class FakeCompiled:
    function = "function handle"
    packed_metadata = "packed metadata"

    def __init__(self):
        self.launches = []

    def run(self, *args):
        self.launches.append(args)


class FakeKernel:
    """A `triton.jit` function's interface: params, device_caches, kernel[grid](...)."""
    __name__ = "fake_kernel"

    def __init__(self, names, constexprs):
        self.params = [SimpleNamespace(name=name, is_constexpr=name in constexprs)
                       for name in names]
        self.device_caches = {}
        self.pre_run_hooks = []
        self.bound = []
        self.compiled = []

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.bound.append((grid, args, kwargs))
            self.compiled.append(FakeCompiled())
            return self.compiled[-1]
        return run


@pytest.fixture
def fake_gpu(monkeypatch):
    monkeypatch.setattr(triton_launch, "SUPPORTED", True)
    monkeypatch.setattr(triton_launch, "_current_device", lambda: 0)
    monkeypatch.setattr(triton_launch, "_current_stream", lambda device: STREAM)
    return monkeypatch


def make_launch(**overrides):
    kernel = FakeKernel(["x_ptr", "M", "B", "A"], {"A", "B"})
    constexprs = dict(A=1, B=2, num_warps=4) | overrides
    return kernel, CachedLaunch(kernel, 5, constexprs)


def call(launch, x, M):
    """As a backend calls it: its key is what varies between its calls (dtype, M), or None
    when a pointer is misaligned."""
    launch((x.dtype, M) if pointers_aligned(x) else None, x, M)


def test_later_calls_go_straight_to_the_compiled_launcher(fake_gpu):
    kernel, launch = make_launch()
    x = torch.zeros(8)
    call(launch, x, 3)
    assert kernel.bound == [((5,), (x, 3), dict(A=1, B=2, num_warps=4))]
    compiled = kernel.compiled[0]
    assert compiled.launches == []
    call(launch, x, 3)
    call(launch, x.clone(), 3)  # another tensor, same specialisation
    assert len(kernel.bound) == 1 and launch.specializations == 1
    # Every parameter in signature order, constexprs included, as Triton's run passes them.
    assert compiled.launches[0] == (5, 1, 1, STREAM, "function handle", "packed metadata",
                                    None, None, None, x, 3, 2, 1)
    assert len(compiled.launches) == 2


def test_each_specialisation_is_bound_once(fake_gpu):
    kernel, launch = make_launch()
    x = torch.zeros(8)
    for M in (1, 16, 3, 1, 16, 3):
        call(launch, x, M)
    call(launch, x.half(), 3)
    call(launch, x.half(), 3)
    assert [args[1] for _, args, _ in kernel.bound] == [1, 16, 3, 3]
    assert launch.specializations == 4
    assert [len(compiled.launches) for compiled in kernel.compiled] == [1, 1, 1, 1]


def test_compiled_kernels_are_kept_per_device(fake_gpu):
    kernel, launch = make_launch()
    x = torch.zeros(8)
    call(launch, x, 2)
    fake_gpu.setattr(triton_launch, "_current_device", lambda: 1)
    call(launch, x, 2)
    call(launch, x, 2)
    assert len(kernel.bound) == 2 and launch.specializations == 2
    assert [len(compiled.launches) for compiled in kernel.compiled] == [0, 1]


def test_pointers_aligned():
    storage = torch.zeros(9)
    assert pointers_aligned(storage, None, storage[4:])
    assert not pointers_aligned(storage, storage[1:])  # 4 bytes past a 16-byte boundary


def test_a_misaligned_pointer_always_takes_tritons_path(fake_gpu):
    kernel, launch = make_launch()
    misaligned = torch.zeros(9)[1:]
    for _ in range(3):
        call(launch, misaligned, 2)
    assert len(kernel.bound) == 3 and launch.specializations == 0
    assert all(not compiled.launches for compiled in kernel.compiled)


def test_the_default_hooks_do_nothing():
    assert not triton_launch._hooks_installed()


def test_hooks_take_tritons_path(fake_gpu):
    real_hooks = triton_launch._launch_hooks
    kernel, launch = make_launch()
    x = torch.zeros(8)
    call(launch, x, 2)
    fake_gpu.setattr(triton_launch, "_launch_hooks", lambda: (print, None))
    call(launch, x, 2)
    fake_gpu.setattr(triton_launch, "_launch_hooks", real_hooks)
    if hasattr(triton, "knobs"):  # a profiler adding itself to the hook chain
        chain = triton.knobs.runtime.launch_exit_hook
        chain.add(print)
        try:
            call(launch, x, 2)
        finally:
            chain.remove(print)
    kernel.pre_run_hooks.append(print)
    call(launch, x, 2)
    assert len(kernel.bound) == 3 + hasattr(triton, "knobs")
    assert all(not compiled.launches for compiled in kernel.compiled)


@pytest.mark.parametrize("supported,interpreted", [(False, False), (True, True)])
def test_tritons_path_where_the_convention_is_not_known(fake_gpu, supported, interpreted):
    fake_gpu.setattr(triton_launch, "SUPPORTED", supported)
    kernel, launch = make_launch()
    if interpreted:
        del kernel.device_caches
        launch = CachedLaunch(kernel, 5, dict(A=1, B=2))
    x = torch.zeros(8)
    for _ in range(3):
        call(launch, x, 2)
    assert not launch.fast and len(kernel.bound) == 3


def test_constexprs_must_all_be_given(fake_gpu):
    with pytest.raises(ValueError, match=r"missing \['A'\]"):
        CachedLaunch(FakeKernel(["x_ptr", "M", "B", "A"], {"A", "B"}), 5, dict(B=2))
    with pytest.raises(ValueError, match="after the runtime ones"):
        CachedLaunch(FakeKernel(["x_ptr", "A", "M"], {"A"}), 5, dict(A=1))


def test_the_installed_triton_launches_as_cached_launch_does():
    """The decode kernel compiled for sm_90 and launched on a stand-in driver, once through
    Triton's own run and once directly: its launcher must get the same arguments from both
    (tests/ops/triton_launch_check.py). A Triton release that changes its convention fails
    here, before a GPU ever runs the wrong arguments."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, str(CHECK)], env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    checked = [line for line in result.stdout.splitlines() if line.startswith("ok")]
    # four decode launches (one batched), a sibling-group launch, a prefill
    assert len(checked) == 6, result.stdout


@gpu
def test_decode_through_both_paths_matches_the_reference(poisoned):
    """First calls bind through Triton, repeats use the cached kernel, a misaligned input takes
    Triton's path again; every output against the fp64 reference."""
    N, M_OUT = 300, 130
    for seed, M in enumerate((1, 5, 16, 1, 5, 16, 5)):
        case = make_case(M, N, M_OUT, 64, torch.bfloat16, link="diagonal", bias=True,
                         device="cuda", seed=seed)
        y = poisoned(M, M_OUT, torch.bfloat16, "cuda")
        decode_host.cur_linear_decode(case["x"], case["C"], case["U"], case["R"],
                                         case["bias"], case["rows"], y)
        assert_matches_reference(y, case)
    storage = torch.empty(5 * N + 1, dtype=torch.bfloat16, device="cuda")
    x = storage[1:].view(5, N)
    x.copy_(case["x"])
    y = poisoned(5, M_OUT, torch.bfloat16, "cuda")
    decode_host.cur_linear_decode(x, case["C"], case["U"], case["R"], case["bias"],
                                     case["rows"], y)
    assert_matches_reference(y, case)
    plans = [plan for plan in decode_host._decode_plans.values()
             if any(launch.specializations for launch in plan.launches)]
    assert plans, "no decode launch reused a compiled kernel"
