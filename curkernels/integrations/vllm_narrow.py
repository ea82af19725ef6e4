"""The vLLM linear method for narrow checkpoint modules (`NarrowLinear`, what the default
method "pairwise" writes): one GEMM over the kept rows and columns of a layer's shards.

vLLM builds every layer at the model config's dense widths. A layer's narrow and dense shards
stack their weights into one (they read the same inputs), so a merged layer runs one GEMM;
the two frames the checkpoint records decide the rest, as `NarrowLinear` does:
- q, k, v keep rows but scatter them to the dense width (`scatter_rows`): attention reshapes
  by the head size. The GEMM's outputs are copied into a zero output of the layer's width.
- o_proj keeps columns of a dense-width input (`gather_cols`): its input is gathered.
- The MLP's intermediate stays narrow end to end (gate/up keep k rows without scattering, down
  keeps those k columns without gathering): gate_up returns [gate_k, up_k], vLLM's activation
  splits its input in halves whatever the width, and down reads the k products directly. That
  does the narrowed product and nothing else; the alternative, gate_up scattered to the dense
  2·I width with zeros and down gathering k of I, costs a zero fill, a scatter, the activation
  over I instead of k and a gather every step, for the same result.
Under tensor parallel each rank keeps the kept rows/columns in its dense range (`vllm_shards`);
a narrow intermediate is split the same way on both sides as long as down's kept columns are
gate's and up's kept rows, which `check_narrow_pairs` asks of a checkpoint.
"""

import torch
import torch.nn.functional as F

from ..checkpoint.module_specs import CheckpointError
from .vllm_loading import ShardedLinearMethod, register_tensor
from .vllm_shards import NARROW_TYPE, Shard


def _narrow_output(spec: dict | None) -> bool:
    """The module returns its kept rows only (the next layer reads just those)."""
    return spec is not None and spec["row_indices"] is not None and not spec["scatter_rows"]


def _narrow_input(spec: dict | None) -> bool:
    """The module reads an input that holds just its kept columns."""
    return spec is not None and spec["col_indices"] is not None and not spec["gather_cols"]


def check_narrow_pairs(specs: dict[str, dict]) -> None:
    """Each module reading a narrow input must have siblings (modules of the same parent)
    writing it, and they must keep its columns as their rows, in the same order: vLLM
    splits both sides by those dense positions under tensor parallel."""
    for name, spec in specs.items():
        if spec["type"] != NARROW_TYPE or not _narrow_input(spec):
            continue
        parent = name.rpartition(".")[0]
        writers = {other: other_spec["row_indices"] for other, other_spec in specs.items()
                   if other.rpartition(".")[0] == parent and other_spec["type"] == NARROW_TYPE
                   and _narrow_output(other_spec)}
        if not writers or any(rows != spec["col_indices"] for rows in writers.values()):
            raise CheckpointError(f"compression_config.modules[{name!r}] reads a narrow input "
                                  f"(col_indices without gather_cols); vLLM serves that only "
                                  f"where the modules beside it write it, keeping the same "
                                  f"indices as rows: found {sorted(writers) or 'none'}")


class NarrowLinearMethod(ShardedLinearMethod):
    """One vLLM layer made of narrow and dense checkpoint modules."""

    def __init__(self, names: list[str], specs: list[dict | None]):
        super().__init__(names, specs)
        for name, spec in zip(names, specs, strict=True):
            if spec is not None and spec["type"] != NARROW_TYPE:
                raise CheckpointError(f"compression_config.modules[{name!r}] is a "
                                      f"{spec['type']} in a vLLM layer with NarrowLinear "
                                      f"modules ({names}); the plugin serves one or the other "
                                      f"in a merged layer")
        reads = {(None, False) if spec is None else (
            None if spec["col_indices"] is None else tuple(spec["col_indices"]),
            spec["gather_cols"]) for spec in specs}
        if len(reads) > 1:
            raise CheckpointError(f"the modules {names}, which vLLM merges into one layer, read "
                                  f"different input columns: they must read the same")
        narrow_rows = {tuple(spec["row_indices"]) for spec in specs if _narrow_output(spec)}
        if narrow_rows and (len(narrow_rows) > 1 or not all(map(_narrow_output, specs))):
            raise CheckpointError(f"the modules {names}, which vLLM merges into one layer, "
                                  f"must all keep the same rows where one returns its kept "
                                  f"rows only (no scatter_rows)")

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        shards: list[Shard] = layer.curkernels_shards
        pieces = self.loaded_pieces(layer)
        dense_bias = getattr(layer, "bias", None)
        positions, biases, width, slot = [], [], 0, 0
        for shard in shards:
            # this rank's dense outputs of the shard that the weight's rows compute
            kept = (torch.arange(shard.out_features) if shard.rows is None
                    else torch.tensor(shard.rows.local, dtype=torch.int64))
            if dense_bias is not None:  # held at the dense width (`vllm_loading`)
                biases.append(dense_bias.data[slot + kept.to(dense_bias.device)])
            if _narrow_output(shard.spec):
                positions.append(width + torch.arange(len(kept)))
                width += len(kept)
            else:
                positions.append(width + kept)
                width += shard.out_features
            slot += shard.out_features
        if _narrow_output(shards[0].spec) and dense_bias is not None and layer.skip_bias_add:
            raise CheckpointError(f"vLLM's layer {layer.prefix!r} leaves its bias to the "
                                  f"caller, at the dense width, but returns kept rows only")
        register_tensor(layer, "curkernels_weight",
                        torch.cat([piece["weight"] for piece in pieces]))
        if dense_bias is not None:
            register_tensor(layer, "curkernels_bias", torch.cat(biases))
        output_positions = torch.cat(positions)
        layer.curkernels_width = width
        scatter = not torch.equal(output_positions, torch.arange(width))
        _register_index(layer, "curkernels_rows", output_positions if scatter else None)
        shard = shards[0]
        gather = shard.cols is not None and shard.spec["gather_cols"]
        _register_index(layer, "curkernels_cols",
                        torch.tensor(shard.cols.local, dtype=torch.int64) if gather else None)

    def apply(self, layer: torch.nn.Module, x: torch.Tensor,
              bias: torch.Tensor | None = None) -> torch.Tensor:
        if layer.curkernels_cols is not None:
            x = x.index_select(-1, layer.curkernels_cols)
        y = F.linear(x, layer.curkernels_weight, None if bias is None else layer.curkernels_bias)
        if layer.curkernels_rows is None:
            return y
        out = y.new_zeros(*y.shape[:-1], layer.curkernels_width)
        return out.index_copy_(-1, layer.curkernels_rows, y)


def _register_index(layer: torch.nn.Module, name: str, index: torch.Tensor | None) -> None:
    device = layer.curkernels_weight.device
    layer.register_buffer(name, None if index is None else index.to(device), persistent=False)
