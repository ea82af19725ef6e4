"""Build curkernels and, where a CUDA toolchain exists, its extension `curkernels._C`.

Knobs (environment variables):
  CURKERNELS_FORCE_CUDA=1       build `_C` even when torch reports no CUDA toolkit
  CURKERNELS_SKIP_CUDA_BUILD=1  never build `_C` (Python + Triton only)
  TORCH_CUDA_ARCH_LIST          target architectures, default "8.0;9.0"
  MAX_JOBS                      parallel ninja jobs
  CUDA_HOME                     toolkit root; found from nvcc when unset
"""

import glob
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent.resolve()
CSRC = ROOT / "csrc"


def _notice(message: str) -> None:
    print(f"curkernels setup: {message}", file=sys.stderr)


def _toolkit_root() -> Path | None:
    """The CUDA toolkit root: the folder whose include/ holds cuda_runtime.h.

    `which nvcc` can be a wrapper script outside the toolkit (/usr/local/bin/nvcc here), so
    the toolkit is read from nvcc's own dry-run report rather than from the path of the link.
    """
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(os.path.realpath(nvcc)).parent.parent))
        try:
            report = subprocess.run(
                [nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                capture_output=True, text=True, timeout=60,
            ).stderr
            for line in report.splitlines():
                if line.startswith("#$ TOP="):
                    candidates.append(str(Path(line.split("=", 1)[1].strip()).resolve()))
        except (OSError, subprocess.SubprocessError):
            pass
    candidates += sorted(glob.glob("/usr/local/cuda*"), reverse=True)
    for candidate in candidates:
        if candidate and (Path(candidate) / "include" / "cuda_runtime.h").exists() \
                and (Path(candidate) / "bin" / "nvcc").exists():
            return Path(candidate).resolve()
    return None


def _pip_cuda_dirs() -> list[Path]:
    """`nvidia/cu*` folders of the pip CUDA wheels that torch installs.

    An nvcc-only toolkit lacks cuSPARSE/cuBLAS headers (which torch's headers include) and
    libcudart.so; the wheels carry both.
    """
    site = Path(sysconfig.get_paths()["purelib"])
    return sorted(p for p in (site / "nvidia").glob("cu*") if (p / "include").is_dir())


def _cudart_link_dir(build_dir: Path, pip_dirs: list[Path]) -> Path | None:
    """A folder holding `libcudart.so` for `-lcudart`; the wheels ship only `libcudart.so.N`."""
    for d in pip_dirs:
        for lib in sorted((d / "lib").glob("libcudart.so.*")):
            build_dir.mkdir(parents=True, exist_ok=True)
            link = build_dir / "libcudart.so"
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(lib)
            return build_dir
    return None


def _extension_modules():
    if os.environ.get("CURKERNELS_SKIP_CUDA_BUILD") == "1":
        _notice("CURKERNELS_SKIP_CUDA_BUILD=1: skipping the CUDA extension curkernels._C")
        return [], {}
    force = os.environ.get("CURKERNELS_FORCE_CUDA") == "1"
    toolkit = _toolkit_root()
    if toolkit is None:
        _notice("no CUDA toolkit (nvcc) found: skipping curkernels._C; Triton/torch backends only")
        return [], {}
    os.environ["CUDA_HOME"] = str(toolkit)  # read by torch.utils.cpp_extension at import
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CUDAExtension
    except ImportError:
        _notice("torch is not installed in the build environment: skipping curkernels._C "
                "(install torch first and use --no-build-isolation)")
        return [], {}
    if torch.version.cuda is None and not force:
        _notice(f"torch {torch.__version__} is a CPU build: skipping curkernels._C "
                "(CURKERNELS_FORCE_CUDA=1 to try anyway)")
        return [], {}
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")

    pip_dirs = _pip_cuda_dirs()
    include_dirs = [str(d / "include") for d in pip_dirs]
    library_dirs = [str(d / "lib") for d in pip_dirs]
    link_dir = _cudart_link_dir(ROOT / "build" / "cudart", pip_dirs)
    if link_dir is not None:
        library_dirs.insert(0, str(link_dir))
    sources = sorted(str(p.relative_to(ROOT)) for p in CSRC.glob("*.c*"))
    if not sources:
        raise SystemExit(f"curkernels setup: {CSRC} holds no CUDA sources; this source tree is "
                         "incomplete (CURKERNELS_SKIP_CUDA_BUILD=1 installs without curkernels._C)")
    _notice(f"building curkernels._C with {toolkit} for TORCH_CUDA_ARCH_LIST="
            f"{os.environ['TORCH_CUDA_ARCH_LIST']} from {len(sources)} sources")
    extension = CUDAExtension(
        name="curkernels._C",
        sources=sources,
        include_dirs=include_dirs,
        library_dirs=library_dirs,
        extra_compile_args={
            "cxx": ["-O3", "-std=c++20"],
            "nvcc": ["-O3", "-std=c++20", "--use_fast_math", "-lineinfo",
                     "--expt-relaxed-constexpr"],
        },
        py_limited_api=False,
    )
    return [extension], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extension_modules()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
