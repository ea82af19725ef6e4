"""curkernels: compress transformers by factoring weights, and run the factors fast.

    import curkernels as ck
    report = ck.compress(model, method="svd", keep=0.5)
    ck.save_compressed(model, "out")
    model = ck.load_compressed("out")
"""

from .checkpoint import CheckpointError, load_compressed, save_compressed
from .compress import METHODS as _METHOD_TABLE
from .compress import CompressionReport, compress, heal
from .nn import CURLinear, LowRankLinear, NarrowLinear
from .ops import cur_linear

__version__ = "0.1.0"
METHODS: tuple[str, ...] = tuple(_METHOD_TABLE)  # every name `compress(method=...)` takes

__all__ = ["METHODS", "CURLinear", "CheckpointError", "CompressionReport", "LowRankLinear",
           "NarrowLinear", "__version__", "compress", "cur_linear", "heal", "load_compressed",
           "save_compressed"]
