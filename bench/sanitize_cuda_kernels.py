"""Driver for compute-sanitizer: runs one backend's kernels over the shapes that stress their
bounds (unaligned rows, ranks off the tile sizes, gather with edge indices, every row block of
the decode kernels and past them, every link form and dtype) and checks each result against
fp64 computed on the CPU.

    compute-sanitizer --tool memcheck --error-exitcode 1 python bench/sanitize_cuda_kernels.py cuda
    (or `triton`: the persistent decode kernel with its grid barrier, and the prefill kernel)
"""

import argparse
import itertools
import sys

import torch

from curkernels.ops.dispatch import backend_function

CASES = [  # (M, n, m, r)
    (1, 4096, 1024, 256),
    (5, 300, 130, 7),
    (16, 4104, 1000, 100),
    (17, 4097, 515, 33),   # odd n: the scalar (unvectorised) path; Triton's 32-row block
    (3, 64, 1, 1),
    (40, 300, 130, 70),    # Triton's 64-row block
    (65, 1000, 515, 33),   # Triton's prefill kernel
]
TOLERANCE = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def run_case(kernel, M, n, m, r, dtype, link, gather) -> float:
    c = r + 3 if link == "full" else r
    x = torch.randn(M, n, device="cuda").to(dtype)
    C = (torch.randn(m, c, device="cuda") / c ** 0.5).to(dtype)
    U = {"none": None, "diagonal": torch.randn(r, device="cuda").to(dtype),
         "full": (torch.randn(c, r, device="cuda") / r ** 0.5).to(dtype)}[link]
    base_rows = r + 2 if gather else r
    R = (torch.randn(base_rows, n, device="cuda") / n ** 0.5).to(dtype)
    rows = None
    if gather:  # the first and last base rows are always picked: edge indices
        rows = torch.cat([torch.tensor([0, base_rows - 1]), torch.randperm(base_rows - 2)[: r - 2] + 1])
        rows = rows[:r].to("cuda")
    bias = torch.randn(m, device="cuda").to(dtype)
    y = kernel(x, C, U, R, bias, rows).cpu().double()
    # The reference runs on the CPU: only the kernel under test is instrumented on the GPU.
    x, C, R, bias = (t.cpu().double() for t in (x, C, R, bias))
    factor = R[rows.cpu()] if rows is not None else R
    t = x @ factor.t()
    if U is not None:
        U = U.cpu().double()
        t = t * U if U.dim() == 1 else t @ U.t()
    expected = t @ C.t() + bias
    return ((y - expected).norm() / expected.norm()).item()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("backend", choices=("cuda", "triton"))
    kernel = backend_function(parser.parse_args(argv).backend)
    failures = 0
    for (M, n, m, r), dtype, link in itertools.product(
            CASES, (torch.float32, torch.float16, torch.bfloat16), ("none", "diagonal", "full")):
        gather = r >= 2 and M % 2 == 1
        error = run_case(kernel, M, n, m, r, dtype, link, gather)
        ok = error < TOLERANCE[dtype]
        failures += not ok
        if not ok:
            print(f"FAIL M={M} n={n} m={m} r={r} {dtype} U={link} gather={gather}: {error:.2e}")
    torch.cuda.synchronize()
    count = len(CASES) * 3 * 3
    print(f"sanitize_cuda_kernels: {count - failures}/{count} cases within tolerance")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
