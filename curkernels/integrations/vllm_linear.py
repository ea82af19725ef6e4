"""The vLLM linear method for factored checkpoint modules (CUR, low-rank): compute with them.

After loading (`vllm_loading`), a layer's pieces become one stacked shrink (every factored
shard's R, or B in checkpoints whose two-factor layers are of the old kind "LowRankLinear") and
one expand per shard (C with U folded in, in fp64, or A); dense shards keep their weight. A layer
then runs one shrink GEMM and one expand per shard (curkernels' `cur_linear` or sibling-group op:
GPUs get the fused kernels), plus one GEMM per dense shard.

Tensor parallel: a row-parallel layer's rank holds R's columns for its inputs, so its shrink
gives a partial sum of the rank-r codes. vLLM would all-reduce the m-wide output; where the
layer reduces its own output, this method all-reduces the r-wide codes instead and expands
them on every rank (the same expand work either way), which moves r/m of the bytes: per token
and layer, 2·(t-1)/t·r·b bytes per rank for a ring all-reduce of t ranks, b bytes an element,
against 2·(t-1)/t·m·b dense (o_proj of a 4096-wide model at r = 1024: 4× fewer). Column-parallel
layers need no communication of their own: each rank holds its rows of C and the whole R.
"""

import torch
import torch.nn.functional as F
from vllm.distributed import tensor_model_parallel_all_reduce

from ..checkpoint.module_specs import CheckpointError
from ..ops import cur_linear
from ..ops.factors import fold_link
from ..ops.op import shared_group_op
from .vllm_loading import ShardedLinearMethod, parallel_kind, register_tensor
from .vllm_shards import Shard


def _expand_and_shrink(shard: Shard, pieces: dict[str, torch.Tensor]
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """A factored shard's (expand m×r, shrink r×n): an old two-factor layer's A, B; a CUR's
    C·U (`fold_link`, as `CURLinear.fold` does) and R (rows gathered from the base weight in the
    gather form)."""
    spec = shard.spec
    if spec["type"] == "LowRankLinear":
        return pieces["A"], pieces["B"]
    C, R = pieces["C"], pieces["R"]
    if spec["gather"]:
        rows = torch.tensor(spec["row_indices"], dtype=torch.int64, device=R.device)
        if rows.numel() and not 0 <= int(rows.min()) <= int(rows.max()) < R.shape[0]:
            raise CheckpointError(f"compression_config.modules[{shard.name!r}].row_indices "
                                  f"must lie in [0, {R.shape[0]})")
        R = R.index_select(0, rows)
    return fold_link(C, None if spec["u"] == "none" else pieces["U"]), R


class CurkernelsLinearMethod(ShardedLinearMethod):
    """One vLLM layer made of factored (CUR, low-rank) and dense checkpoint modules."""

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        shards: list[Shard] = layer.curkernels_shards
        shrinks, layout = [], []
        for i, (shard, pieces) in enumerate(zip(shards, self.loaded_pieces(layer),
                                                strict=True)):
            if shard.spec is None:
                register_tensor(layer, f"curkernels_dense_{i}", pieces["weight"])
                layout.append(("dense", i))
                continue
            expand, shrink = _expand_and_shrink(shard, pieces)
            register_tensor(layer, f"curkernels_expand_{i}", expand)
            shrinks.append(shrink)
            layout.append(("factored", i))
        register_tensor(layer, "curkernels_shrink", torch.cat(shrinks))
        layer.curkernels_layout = tuple(layout)
        layer.curkernels_out_features = [shard.out_features for shard in shards]
        # All-reduce the r-wide codes instead of the m-wide output (see the module docstring).
        rank = sum(shard.rank for shard in shards)
        layer.curkernels_reduces_codes = (
            parallel_kind(layer) == "row" and layer.reduce_results and layer.tp_size > 1
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

