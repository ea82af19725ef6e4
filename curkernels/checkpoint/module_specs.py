"""The `compression_config` block of config.json: which modules are factored, and how.

Each factored module is described by a JSON spec (type, shapes, rank, U form, bias, CUR
indices); `build_module` makes an empty module from a spec (on the meta device while loading),
so a checkpoint loads straight into factored modules without materialising the dense model.
"""

import torch
from torch import nn

from ..nn import CURLinear, LowRankLinear
from ..nn.narrow_linear import NarrowLinear

FORMAT_NAME = "curkernels"
FORMAT_VERSION = 1
MODULE_TYPES = ("CURLinear", "LowRankLinear", "NarrowLinear")


class CheckpointError(ValueError):
    """A compressed checkpoint is corrupt, mismatched or of an unknown format."""


def _indices(t: torch.Tensor | None) -> list[int] | None:
    return None if t is None else [int(i) for i in t.tolist()]


def module_spec(module: nn.Module) -> dict:
    if isinstance(module, CURLinear):
        return {"type": "CURLinear", "in_features": module.in_features,
                "out_features": module.out_features, "rank": module.rank,
                "inner": module.C.shape[1], "u": module.u_kind, "bias": module.bias is not None,
                "gather": module.gather, "base_rows": module.R.shape[0] if module.gather else None,
                "row_indices": _indices(module.row_indices),
                "col_indices": _indices(module.col_indices)}
    if isinstance(module, LowRankLinear):
        return {"type": "LowRankLinear", "in_features": module.in_features,
                "out_features": module.out_features, "rank": module.rank,
                "bias": module.bias is not None}
    if isinstance(module, NarrowLinear):
        return narrow_linear_spec(module)
    raise TypeError(f"not a factored module: {type(module).__name__}")


def narrow_linear_spec(module: NarrowLinear) -> dict:
    """`in_features`/`out_features` are the dense layer's shape (what the model config
    builds); the kept rows/columns and whether the output/input keeps the dense width give
    the narrow weight's shape and the layer's own widths."""
    return {"type": "NarrowLinear", "in_features": module.dense_in_features,
            "out_features": module.dense_out_features, "bias": module.bias is not None,
            "row_indices": _indices(module.row_indices),
            "col_indices": _indices(module.col_indices),
            "scatter_rows": module.scatter_rows, "gather_cols": module.gather_cols}


def _narrow_weight_shape(spec: dict) -> tuple[int, int]:
    rows, cols = spec["row_indices"], spec["col_indices"]
    return (spec["out_features"] if rows is None else len(rows),
            spec["in_features"] if cols is None else len(cols))


def compression_config(model: nn.Module, method: str | None) -> dict:
    modules = {name: module_spec(m) for name, m in model.named_modules()
               if isinstance(m, (CURLinear, LowRankLinear, NarrowLinear))}
    if not modules:
        raise ValueError("the model holds no CURLinear/LowRankLinear: compress it first "
                         "(curkernels.compress)")
    return {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "method": method,
            "modules": modules}


def check_compression_config(block) -> dict:
    """The validated block; raises CheckpointError naming what is wrong."""
    if not isinstance(block, dict):
        raise CheckpointError("config.json has no 'compression_config' block: not a "
                              "curkernels checkpoint")
    if block.get("format") != FORMAT_NAME:
        raise CheckpointError(f"compression_config.format must be {FORMAT_NAME!r}, "
                              f"got {block.get('format')!r}")
    version = block.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"unknown compression_config.format_version {version!r}: this "
                              f"curkernels reads version {FORMAT_VERSION}; upgrade curkernels")
    modules = block.get("modules")
    if not isinstance(modules, dict) or not modules:
        raise CheckpointError("compression_config.modules must map module names to specs")
    for name, spec in modules.items():
        if not isinstance(spec, dict) or spec.get("type") not in MODULE_TYPES:
            raise CheckpointError(f"compression_config.modules[{name!r}] has unknown type "
                                  f"{spec.get('type') if isinstance(spec, dict) else spec!r}")
    return block


def build_module(spec: dict, dtype: torch.dtype, device: torch.device | str = "meta"
                 ) -> nn.Module:
    """An empty factored module of the spec's shapes (uninitialised storage)."""
    def empty(*shape):
        return torch.empty(shape, dtype=dtype, device=device)

    if spec["type"] == "NarrowLinear":
        kept_rows, kept_cols = _narrow_weight_shape(spec)
        return NarrowLinear(empty(kept_rows, kept_cols), empty(kept_rows) if spec["bias"] else None,
                            out_features=spec["out_features"], in_features=spec["in_features"],
                            rows=spec["row_indices"], cols=spec["col_indices"],
                            scatter_rows=spec["scatter_rows"], gather_cols=spec["gather_cols"])
    m, n, r = spec["out_features"], spec["in_features"], spec["rank"]

    bias = empty(m) if spec["bias"] else None
    if spec["type"] == "LowRankLinear":
        return LowRankLinear(empty(m, r), empty(r, n), bias)
    inner = spec["inner"]
    U = {"full": lambda: empty(inner, r), "diag": lambda: empty(r), "none": lambda: None}[spec["u"]]()
    R = empty(spec["base_rows"], n) if spec["gather"] else empty(r, n)
    return CURLinear(empty(m, inner), U, R, bias, row_indices=spec["row_indices"],
                     col_indices=spec["col_indices"], gather=spec["gather"])


def expected_tensor_shapes(spec: dict) -> dict[str, tuple[int, ...]]:
    """State-dict entries (relative to the module) and their shapes."""
    if spec["type"] == "NarrowLinear":
        kept_rows, kept_cols = _narrow_weight_shape(spec)
        return {"weight": (kept_rows, kept_cols), **({"bias": (kept_rows,)} if spec["bias"]
                                                       else {})}
    m, n, r = spec["out_features"], spec["in_features"], spec["rank"]
    shapes: dict[str, tuple[int, ...]]
    if spec["type"] == "LowRankLinear":
        shapes = {"A": (m, r), "B": (r, n)}
    else:
        inner = spec["inner"]
        shapes = {"C": (m, inner),
                  "R": (spec["base_rows"], n) if spec["gather"] else (r, n)}
        if spec["u"] != "none":
            shapes["U"] = (inner, r) if spec["u"] == "full" else (r,)
    if spec["bias"]:
        shapes["bias"] = (m,)
    return shapes
