"""The vLLM linear method for curkernels checkpoints: load a layer's shards, compute with them.

Each checkpoint tensor name (C, U, R, weight; A, B in checkpoints whose two-factor layers are
of the old kind "LowRankLinear") of a layer gets one flat parameter that holds every shard's
piece of it (`vllm_shards`), so merged layers load per-shard ranks with no padding. After
loading, the pieces become one stacked shrink (every factored shard's R or B) and one expand
per shard (C with U folded in, in fp64, or A); dense shards keep their weight.
A layer then runs one shrink GEMM and one expand per shard (curkernels' `cur_linear` or
sibling-group op: GPUs get the fused kernels), plus one GEMM per dense shard.

Tensor parallel: a row-parallel layer's rank holds R's columns for its inputs, so its shrink
gives a partial sum of the rank-r codes. vLLM would all-reduce the m-wide output; where the
layer reduces its own output, this method all-reduces the r-wide codes instead and expands
them on every rank (the same expand work either way), which moves r/m of the bytes: per token
and layer, 2·(t-1)/t·r·b bytes per rank for a ring all-reduce of t ranks, b bytes an element,
against 2·(t-1)/t·m·b dense (o_proj of a 4096-wide model at r = 1024: 4× fewer). Column-parallel
layers need no communication of their own: each rank holds its rows of C and the whole R.
"""

import functools
import math

import torch
import torch.nn.functional as F
from vllm.distributed import tensor_model_parallel_all_reduce
from vllm.model_executor.layers.linear import (
    ColumnParallelLinear,
    LinearMethodBase,
    QKVParallelLinear,
    RowParallelLinear,
)
from vllm.model_executor.utils import set_weight_attrs

from ..checkpoint.module_specs import CheckpointError
from ..ops import cur_linear
from ..ops.factors import fold_link
from ..ops.op import shared_group_op
from .vllm_shards import Shard, plan_shards, take_local

QKV_SHARD_IDS = ("q", "k", "v")  # vLLM's shard ids for q/k/v; merged MLPs use 0, 1, ...


def _parallel_kind(layer: torch.nn.Module) -> str:
    if isinstance(layer, RowParallelLinear):
        return "row"
    return "column" if isinstance(layer, ColumnParallelLinear) else "replicated"


def _output_starts(layer: torch.nn.Module, local_outputs: list[int]) -> list[int]:
    """Where this rank's rows start in each shard; replicated k/v heads share a rank's rows."""
    if _parallel_kind(layer) != "column":
        return [0] * len(local_outputs)
    ranks = [layer.tp_rank] * len(local_outputs)
    if isinstance(layer, QKVParallelLinear):
        ranks[1:] = [layer.tp_rank // layer.num_kv_head_replicas] * (len(local_outputs) - 1)
    return [rank * size for rank, size in zip(ranks, local_outputs, strict=True)]


def _shard_index(shard_id, count: int) -> int:
    if shard_id is None and count == 1:
        return 0
    index = QKV_SHARD_IDS.index(shard_id) if shard_id in QKV_SHARD_IDS else shard_id
    if not isinstance(index, int) or not 0 <= index < count:
        raise ValueError(f"shard_id {shard_id!r} names none of this layer's {count} shards")
    return index


def _expand_and_shrink(shard: Shard, local) -> tuple[torch.Tensor, torch.Tensor]:
    """A factored shard's (expand m×r, shrink r×n): an old two-factor layer's A, B; a CUR's
    C·U (`fold_link`, as `CURLinear.fold` does) and R (rows gathered from the base weight in the
    gather form)."""
    spec = shard.spec
    if spec["type"] == "LowRankLinear":
        return local("A"), local("B")
    C, R = local("C"), local("R")
    if spec["gather"]:
        rows = torch.tensor(spec["row_indices"], dtype=torch.int64, device=R.device)
        if rows.numel() and not 0 <= int(rows.min()) <= int(rows.max()) < R.shape[0]:
            raise CheckpointError(f"compression_config.modules[{shard.name!r}].row_indices "
                                  f"must lie in [0, {R.shape[0]})")
        R = R.index_select(0, rows)
    return fold_link(C, None if spec["u"] == "none" else local("U")), R


class CurkernelsLinearMethod(LinearMethodBase):
    """One vLLM layer made of checkpoint modules `names` with specs `specs` (None: dense)."""

    def __init__(self, names: list[str], specs: list[dict | None]):
        if len(names) != len(specs) or all(spec is None for spec in specs):
            raise ValueError("CurkernelsLinearMethod needs one spec per shard, one at least "
                             "not None (a dense layer takes vLLM's own method)")
        self.names, self.specs = names, specs

    def create_weights(self, layer: torch.nn.Module, input_size_per_partition: int,
                       output_partition_sizes: list[int], input_size: int, output_size: int,
                       params_dtype: torch.dtype, **extra_weight_attrs) -> None:
        if len(output_partition_sizes) != len(self.names):
            raise CheckpointError(f"vLLM's layer {layer.prefix!r} has "
                                  f"{len(output_partition_sizes)} output shards; the checkpoint "
                                  f"names {len(self.names)}: {self.names}")
        biased = [name for name, spec in zip(self.names, self.specs, strict=True)
                  if spec is not None and spec["bias"]]
        if biased and not layer.has_bias:
            raise CheckpointError(f"compression_config gives {biased} a bias, but vLLM builds "
                                  f"{layer.prefix!r} without one (the model config's bias "
                                  f"flags): vLLM would drop it")
        parallel = _parallel_kind(layer)
        input_start = layer.tp_rank * input_size_per_partition if parallel == "row" else 0
        shards, sizes = plan_shards(self.names, self.specs, list(output_partition_sizes),
                                    _output_starts(layer, list(output_partition_sizes)),
                                    input_size_per_partition, input_start, parallel)
        layer.curkernels_shards = shards
        layer.curkernels_loaded = set()
        for tensor, size in sizes.items():
            param = torch.nn.Parameter(torch.empty(size, dtype=params_dtype), requires_grad=False)
            layer.register_parameter(tensor, param)
            set_weight_attrs(param, {"weight_loader": functools.partial(_load_piece, layer,
                                                                        tensor)})

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        shards: list[Shard] = layer.curkernels_shards
        missing = [f"{shard.name}.{tensor}" for i, shard in enumerate(shards)
                   for tensor in shard.pieces if (i, tensor) not in layer.curkernels_loaded]
        if missing:
            raise CheckpointError(f"the checkpoint lacks tensors {missing}")
        flats = {tensor: getattr(layer, tensor).data
                 for shard in shards for tensor in shard.pieces}
        shrinks, layout = [], []
        for i, shard in enumerate(shards):
            def local(tensor, shard=shard):
                piece = shard.pieces[tensor]
                size = math.prod(piece.local_shape)
                return flats[tensor][piece.offset:piece.offset + size].view(piece.local_shape)
            if shard.spec is None:
                _register(layer, f"curkernels_dense_{i}", local("weight"))
                layout.append(("dense", i))
                continue
            expand, shrink = _expand_and_shrink(shard, local)
            _register(layer, f"curkernels_expand_{i}", expand)
            shrinks.append(shrink)
            layout.append(("factored", i))
        for tensor in flats:
            delattr(layer, tensor)
        _register(layer, "curkernels_shrink", torch.cat(shrinks))
        layer.curkernels_layout = tuple(layout)
        layer.curkernels_out_features = [shard.out_features for shard in shards]
        # All-reduce the r-wide codes instead of the m-wide output (see the module docstring).
        rank = sum(shard.rank for shard in shards)
        layer.curkernels_reduces_codes = (
            _parallel_kind(layer) == "row" and layer.reduce_results and layer.tp_size > 1
            and rank < shards[0].out_features)
        if layer.curkernels_reduces_codes:
            layer.reduce_results = False

    def apply(self, layer: torch.nn.Module, x: torch.Tensor,
              bias: torch.Tensor | None = None) -> torch.Tensor:
        shrink = layer.curkernels_shrink
        if layer.curkernels_reduces_codes:
            # Every rank now ends with the whole output, so every rank adds the bias.
            bias = None if layer.skip_bias_add else layer.bias
            codes = tensor_model_parallel_all_reduce(F.linear(x, shrink))
            return F.linear(codes, layer.curkernels_expand_0, bias)
        layout = layer.curkernels_layout
        biases = ([None] * len(layout) if bias is None
                  else bias.split(layer.curkernels_out_features))
        if len(layout) == 1:
            return cur_linear(x, layer.curkernels_expand_0, None, shrink, bias,
                              check_factors=False)
        factored = [i for kind, i in layout if kind == "factored"]
        factored_outputs = iter(shared_group_op(
            x, shrink, [getattr(layer, f"curkernels_expand_{i}") for i in factored],
            [biases[i] for i in factored]))
        outputs = [next(factored_outputs) if kind == "factored"
                   else F.linear(x, getattr(layer, f"curkernels_dense_{i}"), biases[i])
                   for kind, i in layout]
        return torch.cat(outputs, dim=-1)


def _register(layer: torch.nn.Module, name: str, tensor: torch.Tensor) -> None:
    layer.register_parameter(name, torch.nn.Parameter(tensor.contiguous(), requires_grad=False))


def _load_piece(layer: torch.nn.Module, tensor: str, param: torch.nn.Parameter,
                loaded: torch.Tensor, shard_id=None) -> None:
    """vLLM's weight_loader for one flat parameter: copy this rank's part of one shard's tensor."""
    shards: list[Shard] = layer.curkernels_shards
    index = _shard_index(shard_id, len(shards))
    shard = shards[index]
    piece = shard.pieces.get(tensor)
    if piece is None:
        kind = "dense" if shard.spec is None else shard.spec["type"]
        raise CheckpointError(f"tensor {shard.name}.{tensor} does not belong to a {kind} "
                              f"module (compression_config says {kind})")
    size = math.prod(piece.local_shape)
    part = take_local(piece, tensor, shard.name, loaded)
    param.data[piece.offset:piece.offset + size].view(piece.local_shape).copy_(part)
    layer.curkernels_loaded.add((index, tensor))
