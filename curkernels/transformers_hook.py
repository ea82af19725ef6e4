"""Loads curkernels' transformers integration once transformers itself is imported.

`import curkernels` does not import transformers (seconds; the kernels, the modules and the
compression methods run without it), yet a compressed checkpoint must load through
transformers' own `from_pretrained` once curkernels is imported. So the integration
(curkernels.checkpoint, which registers the quantizer) loads when transformers does: at once if
transformers is already imported, else right after its own import finishes.
"""

import importlib
import importlib.abc
import importlib.util
import sys

INTEGRATION = "curkernels.checkpoint"


class _AfterTransformers(importlib.abc.MetaPathFinder):
    """Finds `transformers` through the other finders, and imports the integration right after
    transformers' module has run."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "transformers":
            return None
        sys.meta_path.remove(self)  # once; and the other finders must not meet it again
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            exec_module = spec.loader.exec_module

            def exec_then_integrate(module) -> None:
                exec_module(module)
                importlib.import_module(INTEGRATION)
            spec.loader.exec_module = exec_then_integrate
        return spec


def integrate_when_transformers_loads() -> None:
    if "transformers" in sys.modules:
        importlib.import_module(INTEGRATION)
    elif not any(isinstance(finder, _AfterTransformers) for finder in sys.meta_path):
        sys.meta_path.insert(0, _AfterTransformers())
