"""Each method's compression of one decoder block on cached calibration inputs — the method's
own layer-local code, run on one block — and the refusal of options that need the whole model
at once."""

from dataclasses import dataclass

import torch
from torch import nn

from .api import METHODS
from .calibration import block_output_importance
from .configs import MethodConfig
from .lpaf import prune_and_factorize
from .pairwise import attention_heads
from .pairwise import compress_block as compress_pairwise_block
from .pairwise_budget import target_groups
from .replay import next_block_inputs
from .report import ModuleReport
from .rom import compress_block_rom
from .svdllm import compress_block_sequential, sequential_replacer


def check_streamable(config: MethodConfig) -> None:
    """Refuse, naming the alternative, what needs the whole model in memory at once."""
    method = config.method
    if method == "lpaf" and config.importance == "loss":
        raise ValueError("lpaf option importance='loss' scores each weight by the gradient of "
                         "the whole model's loss, which block-by-block streaming cannot give: "
                         "stream with importance='block' (each block's output error), or "
                         "compress in memory (without --stream / stream=False)")
    if method == "lpaf" and config.mixed_rank_steps > 0:
        raise ValueError("lpaf option mixed_rank_steps trains against the whole dense model: "
                         "stream with mixed_rank_steps=0, or compress in memory")
    if method == "svdllm" and config.weighting == "fisher":
        raise ValueError("svdllm option weighting='fisher' needs the gradient of the whole "
                         "model's loss: stream with weighting='inputs', or compress in memory")
    if method == "svdllm" and config.allocation == "global":
        raise ValueError("svdllm option allocation='global' shares one budget over the spectra "
                         "of every module of the model: stream with allocation='uniform', or "
                         "compress in memory")


@dataclass(frozen=True)
class Streams:
    """Which cached block inputs a method calibrates on: the dense model's, the compressed
    model's (the outputs of the blocks compressed before), or both."""
    dense: bool
    compressed: bool


def streams_for(config: MethodConfig) -> Streams:
    if config.method == "rom":
        return Streams(dense=False, compressed=True)
    if config.method == "pairwise" or (config.method == "svdllm" and config.sequential):
        return Streams(dense=True, compressed=config.sequential)
    return Streams(dense=True, compressed=False)


class ReplayScope(nn.Module):
    """One block under its full name (`prefix.index`) as a model: `scope(replay=i)` runs the
    block on its cached input i, so the methods' whole-model calibration (`model(**batch)`
    for each batch of `batches`) sees one block, and their swaps use the full names."""

    def __init__(self, prefix: str, index: int, block: nn.Module, inputs: list[tuple]):
        super().__init__()
        *parents, last = prefix.split(".")
        holder = self
        for part in parents:
            holder.add_module(part, nn.Module())
            holder = getattr(holder, part)
        holder.add_module(last, nn.ModuleDict({str(index): block}))
        self.block_name = f"{prefix}.{index}"
        self.inputs = inputs

    @property
    def batches(self) -> list[dict]:
        return [{"replay": i} if mask is None else {"replay": i, "attention_mask": mask}
                for i, (mask, _, _) in enumerate(self.inputs)]

    def forward(self, replay: int, attention_mask: torch.Tensor | None = None):
        _, args, kwargs = self.inputs[replay]
        return self.get_submodule(self.block_name)(*args, **kwargs)


def check_block_targets(model: nn.Module, config: MethodConfig, local_names: set[str]) -> None:
    """Before any block is read: pairwise needs a decoder's heads and whole groups in every
    block."""
    if config.method == "pairwise":
        attention_heads(model)
        target_groups(local_names)


def compress_block(model: nn.Module, config: MethodConfig, keep: float, prefix: str, index: int,
                   block: nn.Module, targets: dict[str, nn.Linear], inputs, dense_inputs,
                   want_dense_next: bool) -> tuple[list[ModuleReport], list | None]:
    """Compress `targets` (full names in `model`, all inside `block`) in place. `inputs`: the
    block's inputs in the compressed model, `dense_inputs`: in the dense model (each None
    when `streams_for(config)` does not keep it). Returns the reports and, with
    `want_dense_next`, the next block's dense inputs."""
    method, options = config.method, config.options()
    name = f"{prefix}.{index}"
    if method == "rom":
        return compress_block_rom(model, block, targets, inputs, keep,
                                  config.rank_multiple), None
    if method == "pairwise":
        local = {full[len(name) + 1:]: linear for full, linear in targets.items()}
        step = compress_pairwise_block(
            name, block, local, keep, inputs if config.sequential else dense_inputs,
            dense_inputs, attention_heads(model), qk_drop=config.qk_drop, vo_drop=config.vo_drop,
            rank_multiple=config.rank_multiple,
            options={key: options[key] for key in ("ridge", "damping", "refit", "selection",
                                                   "token_weighting")})
        return step.reports, step.next_dense_inputs if want_dense_next else None
    if method == "svdllm" and config.sequential:
        replace = sequential_replacer(model, keep, config.rank_multiple, config.damping, None, {})
        reports, twin = compress_block_sequential(name, block, targets, inputs, dense_inputs,
                                                  replace)
        return reports, next_block_inputs(twin, dense_inputs) if want_dense_next else None
    # one-shot methods: calibrated on the dense model's inputs; the next ones taken first,
    # from the dense block
    dense_next = next_block_inputs(block, dense_inputs) if want_dense_next else None
    scope = ReplayScope(prefix, index, block, dense_inputs)
    if method == "lpaf":
        importance = block_output_importance(block, targets, dense_inputs, seed=config.seed)
        reports = prune_and_factorize(
            scope, targets, keep, importance, scope.batches, rank_multiple=config.rank_multiple,
            sparsity=config.sparsity, weight_floor=config.weight_floor, sweeps=config.sweeps)
        return reports, dense_next
    run, needs_calibration = METHODS[method]
    data = {"calib": scope.batches} if needs_calibration else {}
    reports = run(scope, targets, keep, rank_multiple=config.rank_multiple, **data, **options)
    return reports, dense_next
