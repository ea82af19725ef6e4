"""Compiles the Triton kernels for real GPU targets (sm_80, sm_90) without a GPU, with exactly
the constexpr arguments the backend launches them with. The interpreter accepts code that the
compiler rejects (module globals read inside a kernel, unsupported ops, shape mismatches);
this catches those on a CPU-only machine. Run as a script: TRITON_INTERPRET must be unset when
the kernels are defined. Prints one line per compiled kernel; exits non-zero on any failure."""

import inspect
import itertools
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile

from curkernels.ops.triton import decode as decode_host
from curkernels.ops.triton.decode_kernels import (
    PDL_SUPPORTED,
    cur_linear_decode_kernel,
    cur_linear_group_decode_kernel,
)
from curkernels.ops.triton.prefill_kernel import cur_linear_prefill_kernel
from curkernels.ops.triton.prefill_tuning import (
    candidate_configs,
    default_config,
    largest_row_block,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, run as a script
from bench_scripts import load_bench_script  # noqa: E402

SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def signature(kernel, pointers: dict, constants: dict) -> dict:
    """Pointer arguments typed from `pointers`, integers as i32, the rest constexpr."""
    sig = {}
    for name in kernel.arg_names:
        if name in constants:
            sig[name] = "constexpr"
        elif name in pointers:
            sig[name] = pointers[name]
        else:
            sig[name] = "i32"
    return sig


def ast_source(kernel, pointers: dict, constants: dict) -> ASTSource:
    """The kernel specialised to `constants`, in the form this Triton takes: from 3.3 on a
    signature typing every argument ('constexpr' for constants) plus `constexprs`; before (the
    Triton 3.1 that torch 2.5 pins) a signature of the other arguments plus `constants`, a
    None argument typed *i8 in both, as Triton's own launcher builds them."""
    sig = signature(kernel, pointers, constants)
    if "constexprs" in inspect.signature(ASTSource.__init__).parameters:
        return ASTSource(fn=kernel, signature=sig, constexprs=constants)
    sig = {name: "*i8" if constants.get(name, 0) is None else kind for name, kind in sig.items()
           if kind != "constexpr" or constants.get(name, 0) is None}
    return ASTSource(fn=kernel, signature=sig, constants=constants)


LAUNCH_OPTIONS = ("num_warps", "launch_pdl")  # launch arguments that are compile options


def compile_for(kernel, pointers, constants, num_warps, num_stages, arch, launch_pdl=False):
    options = {"num_warps": num_warps, "num_stages": num_stages, "launch_pdl": launch_pdl}
    src = ast_source(kernel, pointers, constants)
    compiled = compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    shared = compiled.metadata.shared
    assert shared <= SHARED_LIMIT[arch], f"{shared} bytes of shared memory on sm_{arch}"
    return compiled


def _cuobjdump() -> str | None:
    """The cuobjdump Triton ships (its knobs name it from 3.4 on), or None."""
    tool = getattr(getattr(getattr(triton, "knobs", None), "nvidia", None), "cuobjdump", None)
    path = getattr(tool, "path", None) or str(
        Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")
    return path if os.access(path, os.X_OK) else None


def registers_and_stack(compiled, cuobjdump: str) -> tuple[int, int]:
    """Registers a thread and stack bytes a thread (spills) of a compiled kernel, from ptxas's
    resource usage as cuobjdump reports it."""
    with tempfile.TemporaryDirectory() as folder:
        cubin = Path(folder) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        report = subprocess.run([cuobjdump, "--dump-resource-usage", str(cubin)],
                                capture_output=True, text=True, check=True).stdout
    usage = dict(field.split(":", 1) for line in report.splitlines() if "REG:" in line
                 for field in line.split() if ":" in field)
    return int(usage["REG"]), int(usage["STACK"])


def _split_pointers(required: dict, optional) -> tuple[dict, dict]:
    """Pointer types of the pointer arguments given, and None (a constexpr) for those absent:
    `optional` holds (name, present, type)."""
    pointers, nones = dict(required), {}
    for name, present, kind in optional:
        if present:
            pointers[name] = kind
        else:
            nones[name] = None
    return pointers, nones


def _plan_kernels(plan, pointers: dict, nones: dict, name: str):
    """One entry a launch of a plan, named `name` and, where they are on, " pdl" and " l2"."""
    for cached in plan.launches:
        launch = cached.constexprs
        constants = {k: v for k, v in launch.items() if k not in LAUNCH_OPTIONS} | nones
        yield (f"{name}{' pdl' if launch.get('launch_pdl') else ''}"
               f"{' l2' if launch.get('L2_LINES') else ''}", pointers, constants,
               launch["num_warps"], 3, launch.get("launch_pdl", False))


def decode_kernels(dtype, config=None, rows=16):
    """The launches of a decode call with `rows` input rows a tile, in `config` (default: the
    row block's default config, named "default")."""
    default = config is None
    config = config or decode_host.DEFAULT_DECODE_CONFIGS[rows]
    decode_host._multiprocessors = lambda device_index: 132
    torch.cuda.get_device_capability = lambda device=None: (9, 0)  # the plan refuses PDL before
    # an H100's SM, for configs of two programs an SM
    torch.cuda.get_device_properties = lambda device=None: SimpleNamespace(
        regs_per_multiprocessor=65536, max_threads_per_multi_processor=2048,
        shared_memory_per_multiprocessor=228 * 1024)
    ptr = "*" + TRITON_TYPES[dtype]
    for persistent in (True, False):
        for u_kind in ("none", "diagonal", "full"):
            with_extras = u_kind == "full"  # gather rows and bias with the full U
            plan = decode_host._decode_plan(torch.device("cuda", 0), dtype, 4096, 256,
                                               264 if u_kind == "full" else 256, 4096, rows,
                                               u_kind, with_extras, with_extras, persistent,
                                               config)
            pointers, nones = _split_pointers(
                {"x_ptr": ptr, "r_ptr": ptr, "c_ptr": ptr, "y_ptr": ptr, "sums_ptr": "*fp32",
                 "link_ptr": "*fp32", "sync_ptr": "*i32"},
                (("rows_ptr", with_extras, "*i64"), ("u_ptr", u_kind != "none", ptr),
                 ("bias_ptr", with_extras, ptr)))
            yield from _plan_kernels(
                plan, pointers, nones,
                f"decode {TRITON_TYPES[dtype]} {'persistent' if persistent else 'phase'} "
                f"rows={rows}{' default' if default else ''} U={u_kind}")


def sweep_kernels(row_blocks):
    """The persistent bf16 kernels bench/decode_sweep.py times on a GPU: each candidate config
    in each of `row_blocks`, so that a candidate that cannot compile is known before a device
    run (a candidate's spills are reported, not failed: the sweep times them)."""
    sweep = load_bench_script("decode_sweep")
    for name, rows in itertools.product(sweep.CANDIDATES, row_blocks):
        for kernel in decode_kernels(torch.bfloat16, sweep.config_for(name, rows), rows):
            if "persistent" in kernel[0] and "U=none" in kernel[0]:
                yield (kernel[0].replace(" U=", f" sweep={name} U="), *kernel[1:])


def group_kernels(dtype):
    """The sibling-group decode kernel: q/k/v (three members, with biases as in Qwen2) and
    gate/up (two, none), at the 16- and 64-row blocks, in both forms."""
    ptr = "*" + TRITON_TYPES[dtype]
    for members, has_bias in ((3, True), (2, False)):
        ranks, ms = (264, 96, 96)[:members], (4096, 1024, 1024)[:members]
        for rows, persistent in itertools.product((16, 64), (True, False)):
            plan = decode_host._group_plan(torch.device("cuda", 0), dtype, 4096, ranks, ms,
                                            rows, has_bias, persistent)
            pointers, nones = _split_pointers(
                {"x_ptr": ptr, "r_ptr": ptr, "sums_ptr": "*fp32", "sync_ptr": "*i32"},
                [(f"{name}{index}_ptr", index < members and (name != "bias" or has_bias), ptr)
                 for index in range(decode_host.MAX_GROUP_MEMBERS) for name in ("c", "y", "bias")])
            yield from _plan_kernels(
                plan, pointers, nones,
                f"group {TRITON_TYPES[dtype]} {'persistent' if persistent else 'phase'} "
                f"rows={rows} members={members}{' bias' if has_bias else ''}")


def prefill_kernels(dtype):
    ptr = "*" + TRITON_TYPES[dtype]
    pointers = {"x_ptr": ptr, "r_ptr": ptr, "rows_ptr": "*i64", "scale_ptr": ptr, "c_ptr": ptr,
                "bias_ptr": ptr, "y_ptr": ptr, "partial_ptr": "*fp32"}
    # what the backend may run on sm_80 or sm_90 (main() skips each arch's exclusions)
    configs = {config for capability in ((8, 0), (9, 0))
               for config in (default_config(4096, 1024, False, dtype, capability),
                              *candidate_configs(4096, 1024, dtype, capability))}
    for config in sorted(configs, key=str):
        constants = dict(GATHER=True, HAS_SCALE=True, HAS_BIAS=True, ACCUMULATE=True, FINAL=True,
                         DOT_FP32=dtype == torch.float32, BLOCK_M=config.block_m,
                         R_CHUNK=config.r_chunk, BLOCK_K=config.block_k, BLOCK_N=config.block_n,
                         SPLIT_N=config.split_n)
        yield (f"prefill {TRITON_TYPES[dtype]} {config}", pointers, constants, config.num_warps,
               config.num_stages, False)


def main() -> int:
    assert os.environ.get("TRITON_INTERPRET") != "1", "unset TRITON_INTERPRET to compile"
    quick = "--quick" in sys.argv  # one dtype, sm_90 and the prefill default only
    failures = 0
    cuobjdump = _cuobjdump()
    if cuobjdump is None:
        print("note: no cuobjdump beside Triton: registers and spills not checked")
    for dtype in (torch.bfloat16,) if quick else (torch.bfloat16, torch.float16, torch.float32):
        kernels = (list(decode_kernels(dtype)) + list(group_kernels(dtype))
                   + list(prefill_kernels(dtype)))
        if PDL_SUPPORTED:  # the launch plan refuses PDL before Triton 3.5
            kernels += list(decode_kernels(dtype, decode_host.DecodeConfig(pdl=True)))
        kernels += [kernel for kernel in decode_kernels(
            dtype, decode_host.DecodeConfig(l2_prefetch_bytes=65536, num_warps=8))
            if "persistent" in kernel[0]]
        for rows in decode_host.DECODE_ROW_BLOCKS[1:]:  # batched decode, both forms
            kernels += list(decode_kernels(dtype, rows=rows))
        if dtype == torch.bfloat16:  # the sweep's dtype; --quick: its new batched block only
            kernels += list(sweep_kernels(decode_host.DECODE_ROW_BLOCKS[1:2] if quick
                                          else decode_host.DECODE_ROW_BLOCKS))
        if quick:
            kernels = [k for k in kernels if not k[0].startswith("prefill")
                       or str(default_config(4096, 1024, False, dtype)) in k[0]]
        for name, pointers, constants, num_warps, num_stages, launch_pdl in kernels:
            decode = name.startswith(("decode", "group"))
            kernel = {"decode": cur_linear_decode_kernel, "group": cur_linear_group_decode_kernel,
                      "prefill": cur_linear_prefill_kernel}[name.split()[0]]
            # griddepcontrol (PDL) is sm_90 only; the backend refuses it before Hopper
            archs = (90,) if quick or launch_pdl else (80, 90)
            for arch in archs:
                if (name.startswith("prefill") and constants["BLOCK_M"]
                        > largest_row_block((arch // 10, arch % 10))):
                    print(f"skip sm_{arch} {name}: the backend never runs it there")
                    continue
                try:
                    compiled = compile_for(kernel, pointers, constants, num_warps, num_stages,
                                           arch, launch_pdl)
                    usage = ""
                    if cuobjdump is not None and decode:
                        registers, stack = registers_and_stack(compiled, cuobjdump)
                        usage = f", {registers} registers, {stack} B stack"
                        # The kernels a half-precision decode runs by default on Hopper must
                        # not spill (sm_80's 16- and 32-row defaults do: bench/NOTES.md).
                        assert not (stack and arch == 90 and "persistent" in name
                                    and (" default" in name or name.startswith("group"))
                                    and dtype != torch.float32), \
                            f"spills{usage}"
                    print(f"ok   sm_{arch} {name}: {compiled.metadata.shared} B shared{usage}")
                except Exception as exc:  # report every failing kernel, then fail
                    failures += 1
                    print(f"FAIL sm_{arch} {name}: {type(exc).__name__}: {exc}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
