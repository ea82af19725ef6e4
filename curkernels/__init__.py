"""curkernels: compress transformers by factoring weights, and run the factors fast.

    import curkernels as ck
    report = ck.compress(model, method="svd", keep=0.5)
    report = ck.compress(model, ck.SVDLLMConfig(keep=0.5, weighting="fisher"), calib=texts,
                         tokenizer=tokenizer)
    ck.save_compressed(model, "out")
    model = ck.load_compressed("out")
    model, tokenizer = ck.load_model("out")  # or a dense folder, a GGUF, "smollm2"
    ck.compress_streaming("model-folder", "out", "svdllm", keep=0.5, calib=texts,
                          tokenizer=tokenizer)  # block by block: models larger than memory
"""

import importlib

from .compress import METHODS as _METHOD_TABLE
from .compress import CompressionReport, compress, heal
from .compress.configs import *  # noqa: F403 (the config classes: configs.__all__)
from .compress.configs import __all__ as _CONFIG_CLASSES
from .nn import CURLinear, NarrowLinear
from .ops import cur_linear
from .transformers_hook import integrate_when_transformers_loads

__version__ = "0.1.0"
METHODS: tuple[str, ...] = tuple(_METHOD_TABLE)  # every name `compress(method=...)` takes

# Checkpoints and drafts need transformers, which takes seconds to import: they load at first
# use, so that `import curkernels.ops` (the kernels alone) stays light.
_LAZY_NAMES = {"CheckpointError": ".checkpoint", "load_compressed": ".checkpoint",
               "save_compressed": ".checkpoint", "load_model": ".checkpoint",
               "compress_streaming": ".compress.streaming", "make_draft": ".speculative",
               "heal_draft": ".speculative", "save_draft": ".speculative",
               "load_draft": ".speculative"}

__all__ = [*_CONFIG_CLASSES, *_LAZY_NAMES, "CURLinear", "CompressionReport", "METHODS",
           "NarrowLinear", "__version__", "compress", "cur_linear", "heal"]


def __getattr__(name: str):
    if name not in _LAZY_NAMES:
        raise AttributeError(f"module 'curkernels' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY_NAMES[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY_NAMES})


integrate_when_transformers_loads()
