"""The `compression_config` block of config.json: which modules are factored, and how.

Each factored module is described by a JSON spec whose `type` picks its entry in
`MODULE_KINDS`: the fields that kind has and their checks, the relations between them, the
tensors it stores and how to build it empty (on the meta device while loading), so a
checkpoint loads straight into factored modules without materialising the dense model. A new
kind of module is one more entry there.

Every factored layer is a `CURLinear`, written as kind "CURLinear". Checkpoints of curkernels
0.1 before that (tests/checkpoint/fixtures/two_factor_v1) stored two-factor layers as kind
"LowRankLinear", tensors A (m×r) and B (r×n): they load as a CURLinear without U, whose C and
R take the checkpoint's names A and B while the weights load (`stored_names`).
"""

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..nn import CURLinear
from ..nn.narrow_linear import NarrowLinear
from .errors import CheckpointError
from .spec_fields import (
    FieldCheck,
    boolean,
    check_fields,
    check_indices,
    index_list,
    is_int,
    one_of,
    optional,
    positive_int,
    shown,
)

FORMAT_NAME = "curkernels"
FORMAT_VERSION = 1

Shapes = dict[str, tuple[int, ...]]
EmptyTensor = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class ModuleKind:
    """One `type` of factored module as a checkpoint records it."""
    module_class: type[nn.Module]
    fields: dict[str, FieldCheck]  # every field of the spec but `type`
    describe: Callable[[nn.Module], dict] | None  # module → its spec's fields; None: read only
    check_shapes: Callable[[str, dict], None]  # relations between fields (types already hold)
    tensor_shapes: Callable[[dict], Shapes]  # state-dict entries relative to the module
    build: Callable[[dict, EmptyTensor], nn.Module]  # empty module from a checked spec
    stored_names: dict[str, str] = field(default_factory=dict)  # parameter → name on disk


def _check_rank(label: str, spec: dict) -> None:
    m, n, r = spec["out_features"], spec["in_features"], spec["rank"]
    if r > min(m, n):
        raise CheckpointError(f"{label}.rank must be at most min(out_features, in_features) = "
                              f"{min(m, n)}, got {r}")


def _indices(t: torch.Tensor | None) -> list[int] | None:
    return None if t is None else [int(i) for i in t.tolist()]


def _describe_cur(module: CURLinear) -> dict:
    return {"in_features": module.in_features, "out_features": module.out_features,
            "rank": module.rank, "inner": module.C.shape[1], "u": module.u_kind,
            "bias": module.bias is not None, "gather": module.gather,
            "base_rows": module.R.shape[0] if module.gather else None,
            "row_indices": _indices(module.row_indices),
            "col_indices": _indices(module.col_indices)}


def _check_cur_shapes(label: str, spec: dict) -> None:
    _check_rank(label, spec)
    m, n, r, inner = spec["out_features"], spec["in_features"], spec["rank"], spec["inner"]
    if spec["u"] == "full" and inner > n:
        raise CheckpointError(f"{label}.inner must be at most in_features = {n} (C holds columns "
                              f"of the weight), got {inner}")
    if spec["u"] != "full" and inner != r:
        raise CheckpointError(f"{label}.inner must equal the rank {r} with u = {spec['u']!r}, "
                              f"got {inner}")
    rows = spec["row_indices"]
    if spec["gather"]:
        if spec["base_rows"] is None or rows is None:
            raise CheckpointError(f"{label} has gather = true, which needs base_rows and "
                                  f"row_indices (R's rows are read from a base weight)")
        check_indices(f"{label}.row_indices", rows, r, spec["base_rows"],
                      "the rows of the base weight R")
    else:
        if spec["base_rows"] is not None:
            raise CheckpointError(f"{label}.base_rows must be null without gather, got "
                                  f"{shown(spec['base_rows'])}")
        if rows is not None:
            check_indices(f"{label}.row_indices", rows, r, m, "the rows of the dense weight")
    if spec["col_indices"] is not None:
        check_indices(f"{label}.col_indices", spec["col_indices"], inner, n,
                      "the columns of the dense weight")


def _cur_shapes(spec: dict) -> Shapes:
    m, n, r, inner = spec["out_features"], spec["in_features"], spec["rank"], spec["inner"]
    shapes = {"C": (m, inner), "R": (spec["base_rows"], n) if spec["gather"] else (r, n)}
    if spec["u"] != "none":
        shapes["U"] = (inner, r) if spec["u"] == "full" else (r,)
    if spec["bias"]:
        shapes["bias"] = (m,)
    return shapes


def _build_cur(spec: dict, empty: EmptyTensor) -> CURLinear:
    tensors = {name: empty(*shape) for name, shape in _cur_shapes(spec).items()}
    return CURLinear(tensors["C"], tensors.get("U"), tensors["R"], tensors.get("bias"),
                     row_indices=spec["row_indices"], col_indices=spec["col_indices"],
                     gather=spec["gather"])


def _describe_narrow(module: NarrowLinear) -> dict:
    """`in_features`/`out_features` are the dense layer's shape (what the model config
    builds); the kept rows/columns and whether the output/input keeps the dense width give
    the narrow weight's shape and the layer's own widths."""
    if module.gather_rows:
        raise TypeError("a NarrowLinear with gather_rows=True reads a weight it shares with "
                        "another model (a speculative draft's): save the draft with "
                        "curkernels.save_draft, which stores what it adds to its target")
    return {"in_features": module.dense_in_features, "out_features": module.dense_out_features,
            "bias": module.bias is not None, "row_indices": _indices(module.row_indices),
            "col_indices": _indices(module.col_indices), "scatter_rows": module.scatter_rows,
            "gather_cols": module.gather_cols}


def _check_narrow_shapes(label: str, spec: dict) -> None:
    rows, cols = spec["row_indices"], spec["col_indices"]
    if spec["scatter_rows"] and rows is None:
        raise CheckpointError(f"{label} has scatter_rows = true, which needs row_indices")
    if spec["gather_cols"] and cols is None:
        raise CheckpointError(f"{label} has gather_cols = true, which needs col_indices")
    if rows is not None:
        check_indices(f"{label}.row_indices", rows, len(rows), spec["out_features"],
                      "the rows of the dense weight")
    if cols is not None:
        check_indices(f"{label}.col_indices", cols, len(cols), spec["in_features"],
                      "the columns of the dense weight")


def _narrow_shapes(spec: dict) -> Shapes:
    rows, cols = spec["row_indices"], spec["col_indices"]
    kept_rows = spec["out_features"] if rows is None else len(rows)
    kept_cols = spec["in_features"] if cols is None else len(cols)
    return {"weight": (kept_rows, kept_cols), **({"bias": (kept_rows,)} if spec["bias"] else {})}


def _build_narrow(spec: dict, empty: EmptyTensor) -> NarrowLinear:
    tensors = {name: empty(*shape) for name, shape in _narrow_shapes(spec).items()}
    return NarrowLinear(tensors["weight"], tensors.get("bias"),
                        out_features=spec["out_features"], in_features=spec["in_features"],
                        rows=spec["row_indices"], cols=spec["col_indices"],
                        scatter_rows=spec["scatter_rows"], gather_cols=spec["gather_cols"])


def _as_cur_spec(two_factor_spec: dict) -> dict:
    """An old "LowRankLinear" spec as the CURLinear spec of the same layer."""
    return {**two_factor_spec, "type": "CURLinear", "inner": two_factor_spec["rank"], "u": "none",
            "gather": False, "base_rows": None, "row_indices": None, "col_indices": None}


_TWO_FACTOR_NAMES = {"C": "A", "R": "B"}


def _two_factor_shapes(spec: dict) -> Shapes:
    return {_TWO_FACTOR_NAMES.get(name, name): shape
            for name, shape in _cur_shapes(_as_cur_spec(spec)).items()}


_SHAPE_FIELDS = {"in_features": positive_int, "out_features": positive_int,
                 "rank": positive_int, "bias": boolean}

MODULE_KINDS: dict[str, ModuleKind] = {
    "LowRankLinear": ModuleKind(
        CURLinear, _SHAPE_FIELDS, None, _check_rank, _two_factor_shapes,
        lambda spec, empty: _build_cur(_as_cur_spec(spec), empty), _TWO_FACTOR_NAMES),
    "CURLinear": ModuleKind(
        CURLinear,
        {**_SHAPE_FIELDS, "inner": positive_int, "u": one_of("full", "diag", "none"),
         "gather": boolean, "base_rows": optional(positive_int),
         "row_indices": optional(index_list), "col_indices": optional(index_list)},
        _describe_cur, _check_cur_shapes, _cur_shapes, _build_cur),
    "NarrowLinear": ModuleKind(
        NarrowLinear,
        {"in_features": positive_int, "out_features": positive_int, "bias": boolean,
         "row_indices": optional(index_list), "col_indices": optional(index_list),
         "scatter_rows": boolean, "gather_cols": boolean},
        _describe_narrow, _check_narrow_shapes, _narrow_shapes, _build_narrow),
}
FACTORED_CLASSES = tuple({kind.module_class: None for kind in MODULE_KINDS.values()})


def module_spec(module: nn.Module) -> dict:
    for name, kind in MODULE_KINDS.items():
        if kind.describe is not None and isinstance(module, kind.module_class):
            return {"type": name, **kind.describe(module)}
    raise TypeError(f"not a factored module: {type(module).__name__}")


def _spec_label(name: str) -> str:
    return f"compression_config.modules[{name!r}]"


def check_module_spec(name: str, spec) -> None:
    """Every field of one module's spec, and their relations."""
    label = _spec_label(name)
    if not isinstance(spec, dict):
        raise CheckpointError(f"{label} must be a JSON object, got {shown(spec)}")
    kind = MODULE_KINDS.get(spec.get("type")) if isinstance(spec.get("type"), str) else None
    if kind is None:
        raise CheckpointError(f"{label}.type must be one of {sorted(MODULE_KINDS)}, got "
                              f"{shown(spec.get('type'))}")
    check_fields(label, spec, kind.fields)
    kind.check_shapes(label, spec)


def compression_config(model: nn.Module, method: str | None) -> dict:
    return compression_config_of({name: module_spec(m) for name, m in model.named_modules()
                                  if isinstance(m, FACTORED_CLASSES)}, method)


def compression_config_of(modules: dict[str, dict], method: str | None) -> dict:
    """The block of config.json for these module specs (each checked)."""
    if not modules:
        raise ValueError("the model holds no factored module (CURLinear, NarrowLinear): "
                         "compress it first (curkernels.compress)")
    for name, spec in modules.items():
        check_module_spec(name, spec)  # never write what loading would refuse
    return {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "method": method,
            "modules": modules}


def check_compression_config(block) -> dict:
    """The validated block; raises CheckpointError naming what is wrong.

    The fields loading reads are checked; the rest (keep, layers, options, ...) record how
    the checkpoint was made and are not read back.
    """
    if not isinstance(block, dict):
        raise CheckpointError("config.json has no 'compression_config' block: not a "
                              "curkernels checkpoint")
    if block.get("format") != FORMAT_NAME:
        raise CheckpointError(f"compression_config.format must be {FORMAT_NAME!r}, "
                              f"got {shown(block.get('format'))}")
    version = block.get("format_version")
    if not is_int(version) or version != FORMAT_VERSION:
        raise CheckpointError(f"unknown compression_config.format_version {shown(version)}: "
                              f"this curkernels reads version {FORMAT_VERSION}; upgrade "
                              f"curkernels")
    method = block.get("method")
    if method is not None and not isinstance(method, str):
        raise CheckpointError(f"compression_config.method must be a string or null, got "
                              f"{shown(method)}")
    modules = block.get("modules")
    if not isinstance(modules, dict) or not modules:
        raise CheckpointError("compression_config.modules must map module names to specs")
    for name, spec in modules.items():
        if not name:
            raise CheckpointError("compression_config.modules has an empty module name")
        check_module_spec(name, spec)
    return block


def build_module(spec: dict, dtype: torch.dtype, device: torch.device | str = "meta"
                 ) -> nn.Module:
    """An empty factored module of a checked spec's shapes (uninitialised storage)."""
    def empty(*shape):
        return torch.empty(shape, dtype=dtype, device=device)
    return MODULE_KINDS[spec["type"]].build(spec, empty)


def expected_tensor_shapes(spec: dict) -> Shapes:
    """State-dict entries (relative to the module) and their shapes."""
    return MODULE_KINDS[spec["type"]].tensor_shapes(spec)


def stored_names(spec: dict) -> dict[str, str]:
    """The module's parameters that a checkpoint of this spec stores under another name."""
    return MODULE_KINDS[spec["type"]].stored_names
