"""curkernels: compress transformers by factoring weights, and run the factors fast.

    import curkernels as ck
    report = ck.compress(model, method="svd", keep=0.5)
    ck.save_compressed(model, "out")
    model = ck.load_compressed("out")
"""

from .checkpoint import CheckpointError, load_compressed, save_compressed
from .compress import CompressionReport, compress, heal
from .nn import CURLinear, LowRankLinear
from .ops import cur_linear
from .speculative import heal_draft, load_draft, make_draft, save_draft

__version__ = "0.1.0"

__all__ = ["CURLinear", "CheckpointError", "CompressionReport", "LowRankLinear", "__version__",
           "compress", "cur_linear", "heal", "heal_draft", "load_compressed", "load_draft",
           "make_draft", "save_compressed", "save_draft"]
