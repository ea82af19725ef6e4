"""Where each checkpoint tensor of a (possibly merged) vLLM layer lands on this tensor-parallel
rank: which rows or columns of it the rank keeps and where they sit in one flat buffer.

A vLLM layer may merge several checkpoint modules (q/k/v → qkv_proj, gate/up → gate_up_proj),
each with its own kind and rank. Column-parallel layers split outputs: the rank keeps its rows
of every expand factor (C, A) and dense weight, and the whole shrink (R, B) and link (U).
Row-parallel layers split inputs: the rank keeps its columns of every shrink factor and dense
weight, and the whole expand and link. Vectors (a diagonal U) are never split.

A narrow module (`NarrowLinear`: kept rows and/or columns of the dense weight) splits like a
dense one, by the dense positions of what it kept: a column-parallel rank keeps the kept rows
that fall in its output range, a row-parallel rank the kept columns in its input range, so
ranks keep different counts and the pieces are picked by position.
"""

import math
from dataclasses import dataclass

import torch

from ..checkpoint.module_specs import CheckpointError, expected_tensor_shapes

# A and B: the factors of two-factor layers in old checkpoints (kind "LowRankLinear")
EXPAND_TENSORS = ("C", "A")
SHRINK_TENSORS = ("R", "B")
DENSE_TENSOR = "weight"
NARROW_TYPE = "NarrowLinear"


@dataclass(frozen=True)
class Piece:
    """One checkpoint tensor of one shard, as this rank stores it."""

    full_shape: tuple[int, ...] | None  # as stored in the checkpoint; None: known at load time
    local_shape: tuple[int, ...]
    split_dim: int | None  # the dimension this rank keeps a slice of; None: kept whole
    start: int  # first index along split_dim this rank keeps
    offset: int  # where the piece starts in its tensor name's flat buffer
    positions: tuple[int, ...] | None = None  # indices along split_dim kept, where not a range


@dataclass(frozen=True)
class Kept:
    """The rows (or columns) of a narrow weight this rank keeps: their positions among the
    checkpoint weight's rows, and the output (input) features on this rank they stand for."""

    positions: tuple[int, ...]
    local: tuple[int, ...]


@dataclass(frozen=True)
class Shard:
    """One checkpoint module inside a vLLM layer; `spec` None means a dense Linear."""

    name: str
    spec: dict | None
    out_features: int  # on this rank
    pieces: dict[str, Piece]
    rows: Kept | None = None  # a narrow shard's kept rows here; None: every row
    cols: Kept | None = None  # a narrow shard's kept columns here; None: every column

    @property
    def rank(self) -> int:
        return 0 if self.spec is None else self.spec["rank"]


def _split_dim(tensor: str, parallel: str) -> int | None:
    if parallel == "column" and tensor in EXPAND_TENSORS + (DENSE_TENSOR,):
        return 0
    if parallel == "row" and tensor in SHRINK_TENSORS + (DENSE_TENSOR,):
        return 1
    return None


def plan_shards(names: list[str], specs: list[dict | None], local_outputs: list[int],
                output_starts: list[int], local_input: int, input_start: int,
                parallel: str) -> tuple[list[Shard], dict[str, int]]:
    """The shards of one layer and the size of each tensor name's flat buffer.

    `parallel` is 'column' (outputs split: shard i keeps rows output_starts[i] ..
    + local_outputs[i]), 'row' (inputs split: columns input_start .. + local_input) or
    'replicated'. Raises CheckpointError where a spec's shapes cannot fit the layer.
    """
    if parallel not in ("column", "row", "replicated"):
        raise ValueError(f"parallel must be 'column', 'row' or 'replicated', got {parallel!r}")
    sizes: dict[str, int] = {}
    shards = []
    for name, spec, local_out, out_start in zip(names, specs, local_outputs, output_starts,
                                                 strict=True):
        if spec is not None:
            _check_fits(name, spec, local_out, out_start, local_input, input_start, parallel)
        if spec is not None and spec["type"] == NARROW_TYPE:
            shards.append(_plan_narrow(name, spec, local_out, out_start, local_input,
                                       input_start, parallel, sizes))
            continue
        full_shapes = ({DENSE_TENSOR: None} if spec is None else
                       {t: s for t, s in expected_tensor_shapes(spec).items() if t != "bias"})
        pieces = {}
        for tensor, full in full_shapes.items():
            dim = _split_dim(tensor, parallel)
            local = _local_shape(tensor, full, dim, local_out, local_input)
            start = 0 if dim is None else (out_start if dim == 0 else input_start)
            pieces[tensor] = Piece(full, local, dim, start, sizes.get(tensor, 0))
            sizes[tensor] = sizes.get(tensor, 0) + math.prod(local)
        shards.append(Shard(name, spec, local_out, pieces))
    return shards, sizes


def _kept_here(indices: list[int] | None, start: int, size: int) -> Kept | None:
    """The dense `indices` in [start, start + size), or None where `indices` is None."""
    if indices is None:
        return None
    positions = tuple(p for p, index in enumerate(indices) if start <= index < start + size)
    return Kept(positions, tuple(indices[p] - start for p in positions))


def _plan_narrow(name: str, spec: dict, local_out: int, out_start: int, local_input: int,
                 input_start: int, parallel: str, sizes: dict[str, int]) -> Shard:
    """A narrow shard: its weight holds the kept rows × kept columns of the dense one."""
    rows = _kept_here(spec["row_indices"], out_start if parallel == "column" else 0, local_out)
    cols = _kept_here(spec["col_indices"], input_start if parallel == "row" else 0, local_input)
    full = expected_tensor_shapes(spec)[DENSE_TENSOR]
    dim = _split_dim(DENSE_TENSOR, parallel)
    kept = None if dim is None else (rows, cols)[dim]
    local = (local_out if rows is None else len(rows.positions),
             local_input if cols is None else len(cols.positions))
    start = 0 if dim is None or kept is not None else (out_start, input_start)[dim]
    piece = Piece(full, local, dim, start, sizes.get(DENSE_TENSOR, 0),
                  None if kept is None else kept.positions)
    sizes[DENSE_TENSOR] = sizes.get(DENSE_TENSOR, 0) + math.prod(local)
    return Shard(name, spec, local_out, {DENSE_TENSOR: piece}, rows, cols)


def _local_shape(tensor: str, full: tuple[int, ...] | None, dim: int | None, local_out: int,
                 local_input: int) -> tuple[int, ...]:
    if full is None:  # a dense shard: its rows are this rank's outputs, columns its inputs
        return (local_out, local_input)
    if dim is None:
        return full
    local = list(full)
    local[dim] = local_out if dim == 0 else local_input
    return tuple(local)


def _check_fits(name: str, spec: dict, local_out: int, out_start: int, local_input: int,
                input_start: int, parallel: str) -> None:
    out_full = spec["out_features"]
    in_full = spec["in_features"]
    out_end = out_start + local_out if parallel == "column" else local_out
    in_end = input_start + local_input if parallel == "row" else local_input
    if out_end > out_full or (parallel != "column" and local_out != out_full):
        raise CheckpointError(f"compression_config.modules[{name!r}] has out_features="
                              f"{out_full}, but the model's layer needs {local_out} outputs "
                              f"from row {out_start if parallel == 'column' else 0}")
    if in_end > in_full or (parallel != "row" and local_input != in_full):
        raise CheckpointError(f"compression_config.modules[{name!r}] has in_features="
                              f"{in_full}, but the model's layer reads {local_input} inputs "
                              f"from column {input_start if parallel == 'row' else 0}")


def take_local(piece: Piece, tensor: str, shard_name: str, loaded):
    """This rank's part of a checkpoint tensor; CheckpointError names it on a shape mismatch."""
    shape = tuple(loaded.shape)
    if piece.full_shape is not None:
        if shape != piece.full_shape:
            raise CheckpointError(f"tensor {shard_name}.{tensor} has shape {shape}, expected "
                                  f"{piece.full_shape} (from compression_config)")
    elif len(shape) != 2 or not all(
            size >= piece.start + want if dim == piece.split_dim else size == want
            for dim, (size, want) in enumerate(zip(shape, piece.local_shape, strict=True))):
        raise CheckpointError(f"tensor {shard_name}.{tensor} has shape {shape}: too small for "
                              f"this layer's {piece.local_shape} from index {piece.start}")
    if piece.split_dim is None:
        return loaded
    if piece.positions is not None:
        positions = torch.tensor(piece.positions, dtype=torch.int64, device=loaded.device)
        return loaded.index_select(piece.split_dim, positions)
    return loaded.narrow(piece.split_dim, piece.start, piece.local_shape[piece.split_dim])
