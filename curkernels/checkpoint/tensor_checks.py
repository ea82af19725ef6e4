"""Check a checkpoint's tensors against the (meta) model about to load them, before any
weight is read into it: every tensor the model needs present (transformers would fill a
missing one with random values), none it does not have, each of the right shape and kind of
dtype, and all finite.
"""

import os
import re
from dataclasses import dataclass

import torch
from safetensors import safe_open
from torch import nn

from .errors import CheckpointError
from .module_specs import expected_tensor_shapes

FACTOR_DTYPES = ("F32", "F16", "BF16", "F64")  # safetensors' names of the float types torch runs
_FLOAT_DTYPES = FACTOR_DTYPES + ("F8_E4M3", "F8_E5M2")
_LISTED = 5  # names shown when many tensors are missing or unexpected


@dataclass(frozen=True)
class StoredTensor:
    file: str
    shape: tuple[int, ...]
    dtype: str  # safetensors' name, e.g. "BF16"


def _listing(names: list[str]) -> str:
    return ", ".join(repr(n) for n in names[:_LISTED]) + (" …" if len(names) > _LISTED else "")


def read_headers(files) -> dict[str, StoredTensor]:
    """Name, shape and dtype of every tensor, from the safetensors headers (no data read)."""
    stored: dict[str, StoredTensor] = {}
    for file in map(str, files):
        if not file.endswith(".safetensors"):
            raise CheckpointError(f"{os.path.basename(file)}: curkernels checkpoints hold "
                                  f"safetensors only (no pickle)")
        try:
            with safe_open(file, framework="pt") as handle:
                for key in handle.keys():
                    if key in stored:
                        raise CheckpointError(f"tensor {key!r} is stored twice, in "
                                              f"{stored[key].file} and {file}")
                    tensor = handle.get_slice(key)
                    stored[key] = StoredTensor(file, tuple(tensor.get_shape()),
                                               tensor.get_dtype())
        except CheckpointError:
            raise
        except Exception as exc:
            raise CheckpointError(f"{file}: unreadable safetensors file ({exc})") from exc
    return stored


def tied_partners(model: nn.Module) -> dict[str, set[str]]:
    """For each tied name, the names it shares a parameter with: one of them stored is enough.
    transformers 5 lists them (`all_tied_weights_keys`, tied after loading); 4.x ties them
    before the quantizer sees the model (one Parameter under several names)."""
    pairs = list((getattr(model, "all_tied_weights_keys", None) or {}).items())
    first_name: dict[int, str] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        pairs.append((name, first_name.setdefault(id(parameter), name)))
    partners: dict[str, set[str]] = {}
    for a, b in pairs:
        if a != b:
            partners.setdefault(a, set()).add(b)
            partners.setdefault(b, set()).add(a)
    return partners


def _matches_any(name: str, patterns) -> bool:
    return any(re.search(pattern, name) for pattern in patterns or ())


def _check_factors(block: dict, stored: dict[str, StoredTensor]) -> None:
    for name, spec in block["modules"].items():
        dtypes = {}
        for tensor, shape in expected_tensor_shapes(spec).items():
            key = f"{name}.{tensor}"
            if key not in stored:
                raise CheckpointError(f"checkpoint lacks tensor {key!r} (expected shape {shape})")
            if stored[key].shape != shape:
                raise CheckpointError(f"tensor {key!r} has shape {stored[key].shape}, "
                                      f"expected {shape}")
            if stored[key].dtype not in FACTOR_DTYPES:
                raise CheckpointError(f"tensor {key!r} has dtype {stored[key].dtype}, expected "
                                      f"a float type ({', '.join(FACTOR_DTYPES)})")
            dtypes[key] = stored[key].dtype
        if len(set(dtypes.values())) > 1:
            raise CheckpointError(f"the factors of {name!r} must share one dtype, got {dtypes}")


def _check_against_model(model: nn.Module, stored: dict[str, StoredTensor]) -> None:
    expected = model.state_dict()
    buffers = {name for name, _ in model.named_buffers()}  # non-persistent ones may be stored
    ignored = getattr(model, "_keys_to_ignore_on_load_unexpected", None)
    unexpected = sorted(key for key in set(stored) - set(expected) - buffers
                        if not _matches_any(key, ignored))
    if unexpected:
        raise CheckpointError(f"checkpoint holds tensors the compressed model does not have: "
                              f"{_listing(unexpected)}")
    partners, present = tied_partners(model), set(stored)
    optional = getattr(model, "_keys_to_ignore_on_load_missing", None)
    missing = sorted(key for key in set(expected) - present
                     if not partners.get(key, set()) & present and not _matches_any(key, optional))
    if missing:
        raise CheckpointError(f"checkpoint lacks tensor(s) the model needs: {_listing(missing)} "
                              f"(e.g. {missing[0]!r} of shape {tuple(expected[missing[0]].shape)});"
                              f" transformers would fill them with random values")
    for key, tensor in stored.items():
        if key not in expected:
            continue
        want = expected[key]
        if tensor.shape != tuple(want.shape):
            raise CheckpointError(f"tensor {key!r} has shape {tensor.shape}, expected "
                                  f"{tuple(want.shape)}")
        if (tensor.dtype in _FLOAT_DTYPES) != want.is_floating_point():
            raise CheckpointError(f"tensor {key!r} has dtype {tensor.dtype}, expected "
                                  f"{'a float type' if want.is_floating_point() else want.dtype}")


def check_finite(stored: dict[str, StoredTensor]) -> None:
    """Read each float tensor once: a NaN or Inf anywhere makes every output NaN."""
    by_file: dict[str, list[str]] = {}
    for key, tensor in stored.items():
        if tensor.dtype in FACTOR_DTYPES:
            by_file.setdefault(tensor.file, []).append(key)
    for file, keys in by_file.items():
        with safe_open(file, framework="pt") as handle:
            for key in keys:
                if not torch.isfinite(handle.get_tensor(key)).all():
                    raise CheckpointError(f"tensor {key!r} holds NaN or Inf values")


def check_checkpoint_tensors(model: nn.Module, block: dict, files) -> None:
    """All of the above for `files`, the safetensors files `from_pretrained` is loading into
    `model` (factored modules in place, still on the meta device)."""
    stored = read_headers(files)
    _check_factors(block, stored)
    _check_against_model(model, stored)
    check_finite(stored)
