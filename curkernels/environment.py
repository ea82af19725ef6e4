"""What this installation can run: versions, the CUDA extension, GPUs, live backends."""

import importlib.metadata
import platform

import torch

from .ops import BACKENDS, extension_status, tables, unavailable_reason
from .ops.settings import ENV_DECODE_TABLE


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _triton_features() -> str:
    """What the installed Triton lets the decode kernel do (ops/triton/launch.py, decode_kernels.py)."""
    try:
        from .ops.triton.decode_kernels import PDL_SUPPORTED
        from .ops.triton.launch import SUPPORTED as CACHED_LAUNCH
    except ImportError as error:
        return f"unavailable ({error})"
    return (f"cached decode launches: {'yes' if CACHED_LAUNCH else 'no (Triton < 3.3)'}; "
            f"PDL variant: {'yes' if PDL_SUPPORTED else 'no (Triton < 3.5)'}")


def environment_report() -> dict:
    built, extension = extension_status()
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] \
        if torch.cuda.is_available() else []
    device = torch.device("cuda") if gpus else torch.device("cpu")
    backends = {name: unavailable_reason(name, device) for name in BACKENDS}
    measured = tables.measured_devices(tables.DECODE)
    return {
        "curkernels": _version("curkernels"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _version("triton"),
        "triton_features": _triton_features(),
        "transformers": _version("transformers"),
        "extension_built": built,
        "extension": extension,
        "gpus": gpus,
        "device": str(device),
        "backends": {name: "live" if why is None else f"unavailable: {why}"
                     for name, why in backends.items()},
        "decode_tables": measured,
        "decode_configs": tables.measured_devices(tables.TILE_CONFIGS),
        "group_tables": tables.measured_devices(tables.GROUP),
        "graph_decode": {gpu: "measured: the fused kernel that beat the cuBLAS chain, in "
                              "graphs and eagerly" if gpu in measured
                         else f"not measured: CUDA graphs keep the cuBLAS chain (run "
                              f"bench/layer_bench.py, then set {ENV_DECODE_TABLE})"
                         for gpu in gpus},
    }
