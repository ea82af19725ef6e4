"""Loading one vLLM layer made of checkpoint modules: its parameters, their weight loaders and
its bias; the linear methods (`vllm_linear`, `vllm_narrow`) compute with what this loads.

Each checkpoint tensor name (C, U, R, A, B, weight) of a layer gets one flat parameter that
holds every shard's piece of it on this rank (`vllm_shards`), so merged layers load shards of
different kinds and sizes with no padding. The layer's bias is vLLM's own parameter (dense
width); a narrow shard's bias, stored for its kept rows only, is scattered into its place
there, and a shard whose checkpoint has no bias gets zeros (vLLM leaves the memory unset).
"""

import functools
import math

import torch
from vllm.model_executor.layers.linear import (
    ColumnParallelLinear,
    LinearMethodBase,
    QKVParallelLinear,
    RowParallelLinear,
)
from vllm.model_executor.utils import set_weight_attrs

from ..checkpoint.module_specs import CheckpointError
from .vllm_shards import Shard, plan_shards, take_local

QKV_SHARD_IDS = ("q", "k", "v")  # vLLM's shard ids for q/k/v; merged MLPs use 0, 1, ...


def parallel_kind(layer: torch.nn.Module) -> str:
    if isinstance(layer, RowParallelLinear):
        return "row"
    return "column" if isinstance(layer, ColumnParallelLinear) else "replicated"


def _output_starts(layer: torch.nn.Module, local_outputs: list[int]) -> list[int]:
    """Where this rank's rows start in each shard; replicated k/v heads share a rank's rows."""
    if parallel_kind(layer) != "column":
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


class ShardedLinearMethod(LinearMethodBase):
    """Loads a vLLM layer made of checkpoint modules `names` with specs `specs` (None: dense);
    subclasses turn the loaded pieces into what `apply` computes with."""

    def __init__(self, names: list[str], specs: list[dict | None]):
        if len(names) != len(specs) or all(spec is None for spec in specs):
            raise ValueError(f"{type(self).__name__} needs one spec per shard, one at least "
                             f"not None (a dense layer takes vLLM's own method)")
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
        parallel = parallel_kind(layer)
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
        # vLLM creates the bias after this call, with `layer.weight_loader` as its loader: an
        # instance attribute here is the one hook before loading that narrow biases need.
        layer.curkernels_biases_loaded = set()
        layer.weight_loader = functools.partial(_load_bias, layer, layer.weight_loader)

    def loaded_pieces(self, layer: torch.nn.Module) -> list[dict[str, torch.Tensor]]:
        """Each shard's tensors on this rank (views of the flat parameters, which are removed
        from the layer), after checking every one was loaded; completes the bias."""
        shards: list[Shard] = layer.curkernels_shards
        missing = [f"{shard.name}.{tensor}" for i, shard in enumerate(shards)
                   for tensor in shard.pieces if (i, tensor) not in layer.curkernels_loaded]
        if missing:
            raise CheckpointError(f"the checkpoint lacks tensors {missing}")
        _complete_bias(layer)
        flats = {tensor: getattr(layer, tensor).data
                 for shard in shards for tensor in shard.pieces}
        pieces = []
        for shard in shards:
            views = {}
            for tensor, piece in shard.pieces.items():
                size = math.prod(piece.local_shape)
                views[tensor] = flats[tensor][piece.offset:piece.offset + size].view(
                    piece.local_shape)
            pieces.append(views)
        for tensor in flats:
            delattr(layer, tensor)
        return pieces


def register_tensor(layer: torch.nn.Module, name: str, tensor: torch.Tensor) -> None:
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


def _bias_slot(layer: torch.nn.Module, index: int) -> torch.Tensor:
    """Shard `index`'s entries of the layer's bias on this rank."""
    shards: list[Shard] = layer.curkernels_shards
    start = sum(shard.out_features for shard in shards[:index])
    return layer.bias.data.narrow(0, start, shards[index].out_features)


def _load_bias(layer: torch.nn.Module, vllm_loader, param: torch.nn.Parameter,
               loaded: torch.Tensor, shard_id=None) -> None:
    """The bias's weight_loader: vLLM's own for a shard with every row, a scatter of the kept
    rows' entries (zeros elsewhere) for a narrow one."""
    shards: list[Shard] = layer.curkernels_shards
    index = _shard_index(shard_id, len(shards))
    shard = shards[index]
    if shard.rows is None:
        if shard_id is None:
            vllm_loader(param, loaded)
        else:
            vllm_loader(param, loaded, shard_id)
    else:
        expected = (len(shard.spec["row_indices"]),)
        if tuple(loaded.shape) != expected:
            raise CheckpointError(f"tensor {shard.name}.bias has shape {tuple(loaded.shape)}, "
                                  f"expected {expected} (one entry a kept row)")
        positions = torch.tensor(shard.rows.positions, dtype=torch.int64, device=loaded.device)
        local = torch.tensor(shard.rows.local, dtype=torch.int64, device=param.device)
        slot = _bias_slot(layer, index)
        slot.zero_()
        slot.index_copy_(0, local, loaded.index_select(0, positions).to(slot))
    layer.curkernels_biases_loaded.add(index)


def _complete_bias(layer: torch.nn.Module) -> None:
    """Zeros for the shards of a biased layer whose modules have no bias (a merged layer is
    built with a bias when one of its shards has one); a bias the spec names must be there."""
    if getattr(layer, "bias", None) is None:
        return
    for index, shard in enumerate(layer.curkernels_shards):
        if index in layer.curkernels_biases_loaded:
            continue
        if shard.spec is not None and shard.spec["bias"]:
            raise CheckpointError(f"the checkpoint lacks tensor {shard.name}.bias "
                                  f"(compression_config gives it a bias)")
        _bias_slot(layer, index).zero_()
