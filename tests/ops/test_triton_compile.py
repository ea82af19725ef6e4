"""The Triton kernels compile for a real GPU target (sm_90) with the backend's launch arguments:
the interpreter, which runs the other CPU tests, accepts code that the compiler rejects.
The full matrix (all dtypes, sm_80 and sm_90, every prefill tuning candidate, every decode-sweep
candidate in every row block) is
`python tests/ops/triton_aot_compile.py`."""

import ast
import os
import subprocess
import sys
from pathlib import Path

from curkernels.ops.triton import decode_kernels as triton_decode
from curkernels.ops.triton import prefill_kernel as triton_prefill

SCRIPT = Path(__file__).with_name("triton_aot_compile.py")


def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, str(SCRIPT), "--quick"], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    compiled = [line for line in result.stdout.splitlines() if line.startswith("ok")]
    assert any("decode" in line and "persistent" in line for line in compiled)
    # the persistent form that prefetches C into L2 (inline PTX, which the interpreter skips)
    assert any("persistent" in line and " l2:" in line for line in compiled)
    assert any("prefill" in line for line in compiled)
    # batched decode: the 64-row block's default tiles (checked not to spill on sm_90)
    assert any("persistent rows=64 default" in line for line in compiled)
    # the tile configs bench/decode_sweep.py times on a GPU at 17–32 rows
    assert any("persistent rows=32 sweep=2/sm U=none" in line for line in compiled)
    # the sibling-group kernel, whose persistent forms are checked not to spill either
    assert any(line.startswith("ok   sm_90 group bf16 persistent") for line in compiled)


def test_kernels_chain_no_more_than_two_boolean_operands():
    """Triton 3.1 (torch 2.5's) rejects `A and B and C` in a kernel: every decode kernel once
    failed to compile there. This CI runs a newer Triton, so the source is checked instead."""
    chains = []
    for module in (triton_decode, triton_prefill):
        tree = ast.parse(Path(module.__file__).read_text())
        for function in ast.walk(tree):
            if isinstance(function, ast.FunctionDef) and any(
                    "jit" in ast.unparse(decorator) for decorator in function.decorator_list):
                chains += [f"{module.__name__}.{function.name}: {ast.unparse(node)}"
                           for node in ast.walk(function)
                           if isinstance(node, ast.BoolOp) and len(node.values) > 2]
    assert not chains
