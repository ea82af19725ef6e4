"""The angular distance of every block (as `angular_layer_scores` measures it on the whole
model) from one streamed pass of the dense model: each block read, run and freed in turn."""

import torch
from torch import nn

from .layer_selection import angular_distances, last_positions
from .replay import next_block_inputs
from .shard_reader import ShardReader
from .skeleton import fill, release


def hidden_of(entry: tuple) -> torch.Tensor:
    """The hidden state of one cached block input (mask, args, kwargs)."""
    _, args, kwargs = entry
    return args[0] if args else kwargs["hidden_states"]


def final_norm(model: nn.Module) -> tuple[str, nn.Module]:
    """The decoder's last norm, which its last hidden state (the one the scores read) has
    passed; an error when the decoder names none."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    norm = getattr(decoder, "norm", None)
    if not isinstance(norm, nn.Module):
        raise ValueError(f"{type(model).__name__} has no decoder.norm: streaming cannot score "
                         f"blocks by angular distance; pass block indices as layers=, or "
                         f"allocation='uniform' for pairwise")
    name = next(n for n, m in model.named_modules() if m is norm)
    return name, norm


@torch.no_grad()
def streamed_layer_scores(model: nn.Module, reader: ShardReader, prefix: str,
                          blocks: nn.ModuleList, inputs: list[tuple]) -> torch.Tensor:
    """Mean angular distance between each block's input and output at the last non-pad token,
    per block; `inputs` are block 0's cached inputs."""
    norm_name, norm = final_norm(model)
    fill(norm, f"{norm_name}.", reader)
    total = torch.zeros(len(blocks), dtype=torch.float64)
    lasts = [last_positions(entry[0], hidden_of(entry).shape, hidden_of(entry).device)
             for entry in inputs]
    count = sum(last.shape[0] for last in lasts)

    def at_last(hidden, last):
        return hidden[torch.arange(last.shape[0], device=hidden.device), last].double()

    try:
        for index, block in enumerate(blocks):
            fill(block, f"{prefix}.{index}.", reader)
            following = next_block_inputs(block, inputs)
            release(block)
            for entry, after, last in zip(inputs, following, lasts, strict=True):
                out = hidden_of(after)
                if index == len(blocks) - 1:
                    out = norm(out)
                total[index] += angular_distances(at_last(hidden_of(entry), last),
                                                  at_last(out, last)).sum()
            inputs = following
    finally:
        release(norm)
    if not count:
        raise ValueError("calib held no batches: cannot score layers")
    return total / count
