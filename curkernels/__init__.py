"""curkernels: compress transformers by factoring weights, and run the factors fast.

    import curkernels as ck
    report = ck.compress(model, method="svd", keep=0.5)
    report = ck.compress(model, ck.SVDLLMConfig(keep=0.5, weighting="fisher"), calib=texts,
                         tokenizer=tokenizer)
    ck.save_compressed(model, "out")
    model = ck.load_compressed("out")
"""

from .checkpoint import CheckpointError, load_compressed, save_compressed
from .compress import (
    ASVDConfig,
    CompressionReport,
    CURingConfig,
    LPAFConfig,
    MethodConfig,
    ROMConfig,
    SVDConfig,
    SVDLLMConfig,
    compress,
    heal,
)
from .nn import CURLinear, LowRankLinear
from .ops import cur_linear

__version__ = "0.1.0"

__all__ = ["ASVDConfig", "CURLinear", "CURingConfig", "CheckpointError", "CompressionReport",
           "LPAFConfig", "LowRankLinear", "MethodConfig", "ROMConfig", "SVDConfig",
           "SVDLLMConfig", "__version__", "compress", "cur_linear", "heal", "load_compressed",
           "save_compressed"]
