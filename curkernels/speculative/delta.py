"""Delta checkpoints of a draft: only what it adds to its base model, and the base's identity.

A draft folder holds `draft.json` (format, method, the base blocks it keeps, the factored
modules, the base's config keys and weight checksum) and `draft.safetensors` (each CUR
module's C, U, row and column indices; each narrow module's kept row or column indices and,
for a refit, its weight and bias; the head's token ids). Everything else is read from
the target at load time, which must be the base the draft was cut from. Saving follows the
project's rules: atomic (staged beside the folder, then renamed), never over a folder that is
not a draft, never over a draft without overwrite=True.
"""

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..checkpoint.atomic import atomic_directory
from .assembly import CURFactor, DraftSpec, NarrowFactor, assemble_draft, draft_spec
from .identity import identity_mismatch

FORMAT = "curkernels-draft"
VERSION = 2  # 2 added narrow (pair-wise) modules; version 1 files hold CUR modules only
READABLE_VERSIONS = (1, 2)
DRAFT_FILE, WEIGHTS_FILE = "draft.json", "draft.safetensors"
DRAFT_FILES = (DRAFT_FILE, WEIGHTS_FILE)
HEAD_TOKENS = "head.token_ids"
FACTOR_TENSORS = ("C", "U", "row_indices", "col_indices")
NARROW_TENSORS = ("row_indices", "col_indices", "weight", "bias")


class DraftBaseMismatchError(ValueError):
    """The target given to `load_draft` is not the model the draft was cut from."""


def is_draft_folder(folder: Path) -> bool:
    try:
        meta = json.loads((folder / DRAFT_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(meta, dict) and meta.get("format") == FORMAT


def check_draft_folder(out: str | os.PathLike, overwrite: bool) -> Path:
    """The real folder a draft save may replace; ValueError naming `out` when it may not."""
    real = Path(out).expanduser().resolve()
    if not real.exists():
        return real
    if not real.is_dir():
        raise ValueError(f"out {str(out)!r} exists and is not a folder")
    entries = sorted(p.name for p in real.iterdir())
    if not entries:
        return real
    if not is_draft_folder(real):
        raise ValueError(f"out {str(out)!r} exists and is not a curkernels draft (it holds "
                         f"{', '.join(entries[:8])}): saving replaces the whole folder, so "
                         f"choose a new or empty folder")
    foreign = [name for name in entries if name not in DRAFT_FILES]
    if foreign:
        raise ValueError(f"out {str(out)!r} holds a draft and also {', '.join(foreign[:8])}, "
                         f"which a draft save does not write: move them out or choose another "
                         f"folder (even with overwrite)")
    if not overwrite:
        raise ValueError(f"out {str(out)!r} already holds a draft: pass overwrite=True to "
                         f"replace it")
    return real


def _narrow_tensors(factor: NarrowFactor) -> dict[str, torch.Tensor]:
    values = (factor.rows, factor.cols, factor.weight, factor.bias)
    return {key: t for key, t in zip(NARROW_TENSORS, values, strict=True) if t is not None}


@torch.no_grad()
def save_draft(draft: nn.Module, out_dir: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write the draft's delta (its factors, indices, head tokens, base identity) to
    `out_dir`; returns the folder."""
    spec = draft_spec(draft)
    target = check_draft_folder(out_dir, overwrite)
    tensors, cur, narrow = {}, [], {}
    for name, factor in spec.factors.items():
        if isinstance(factor, CURFactor):
            cur.append(name)
            own = dict(zip(FACTOR_TENSORS, (factor.C, factor.U, factor.rows, factor.cols),
                           strict=True))
        else:
            own = _narrow_tensors(factor)
            narrow[name] = {"scatter_rows": factor.scatter_rows,
                            "gather_cols": factor.gather_cols, "tensors": sorted(own)}
        for key, tensor in own.items():  # copies: a pair-wise MLP's three modules share indices
            tensors[f"{name}.{key}"] = tensor.detach().cpu().clone(
                memory_format=torch.contiguous_format)
    if spec.head_token_ids is not None:
        tensors[HEAD_TOKENS] = spec.head_token_ids.cpu().contiguous()
    meta = {"format": FORMAT, "version": VERSION, "method": spec.method,
            "base_layers": spec.base_layers, "modules": sorted(cur),
            "narrow_modules": dict(sorted(narrow.items())),
            "head_tokens": None if spec.head_token_ids is None else spec.head_token_ids.numel(),
            "base": spec.base}
    with atomic_directory(target, writes=lambda relative: relative in DRAFT_FILES) as staging:
        save_file(tensors, str(staging / WEIGHTS_FILE), metadata={"format": "pt"})
        (staging / DRAFT_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return target


def _read_meta(folder: Path) -> dict:
    if not is_draft_folder(folder):
        raise ValueError(f"{folder} is not a curkernels draft: it needs {DRAFT_FILE} with "
                         f"format {FORMAT!r}")
    meta = json.loads((folder / DRAFT_FILE).read_text())
    if meta.get("version") not in READABLE_VERSIONS:
        raise ValueError(f"{folder / DRAFT_FILE} has draft format version "
                         f"{meta.get('version')!r}; this curkernels reads versions "
                         f"{list(READABLE_VERSIONS)}")
    narrow = meta.setdefault("narrow_modules", {})
    for name, entry in narrow.items():
        if not (isinstance(entry, dict) and set(entry.get("tensors", ())) <= set(NARROW_TENSORS)
                and isinstance(entry.get("scatter_rows"), bool)
                and isinstance(entry.get("gather_cols"), bool)):
            raise ValueError(f"{folder / DRAFT_FILE}: narrow module {name!r} must give "
                             f"scatter_rows and gather_cols (true/false) and tensors among "
                             f"{list(NARROW_TENSORS)}, got {entry!r}")
    return meta


def _narrow_factor(tensors: dict[str, torch.Tensor], name: str, entry: dict) -> NarrowFactor:
    own = {key: tensors.get(f"{name}.{key}") for key in NARROW_TENSORS}
    return NarrowFactor(own["row_indices"], own["col_indices"], entry["scatter_rows"],
                        entry["gather_cols"], own["weight"], own["bias"])


def load_draft(out_dir: str | os.PathLike, *, target: nn.Module) -> nn.Module:
    """The draft saved in `out_dir`, attached to `target` (its tensors read in place).
    Raises DraftBaseMismatchError when `target` is not the draft's base model."""
    folder = Path(out_dir)
    meta = _read_meta(folder)
    why = identity_mismatch(meta["base"], target)
    if why is not None:
        raise DraftBaseMismatchError(f"the draft in {folder} was cut from another base model "
                                     f"than target: {why}")
    tensors = load_file(str(folder / WEIGHTS_FILE))
    narrow = meta["narrow_modules"]
    expected = {f"{name}.{key}" for name in meta["modules"] for key in FACTOR_TENSORS}
    expected |= {f"{name}.{key}" for name, entry in narrow.items() for key in entry["tensors"]}
    if meta["head_tokens"] is not None:
        expected.add(HEAD_TOKENS)
    missing, extra = expected - tensors.keys(), tensors.keys() - expected
    if missing or extra:
        raise ValueError(f"{folder / WEIGHTS_FILE} does not match {DRAFT_FILE}: missing "
                         f"{sorted(missing)[:5]}, unexpected {sorted(extra)[:5]}")
    factors = {name: CURFactor(*(tensors[f"{name}.{key}"] for key in FACTOR_TENSORS))
               for name in meta["modules"]}
    try:
        factors |= {name: _narrow_factor(tensors, name, entry) for name, entry in narrow.items()}
    except ValueError as error:
        raise ValueError(f"{folder / WEIGHTS_FILE}: {error}") from error
    spec = DraftSpec(meta["method"], meta["base_layers"], factors, tensors.get(HEAD_TOKENS),
                     meta["base"])
    return assemble_draft(target, spec)
