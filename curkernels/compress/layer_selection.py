"""Which transformer blocks to compress: the CURing paper's angular-distance rule.

A block whose output hidden state points almost the same way as its input changes the
representation least, so it is the safest to approximate. The distance of block i is
arccos(cos(h_i, h_{i+1}))/π at the last non-pad token, averaged over the calibration samples;
the first and last blocks are never chosen, and of the rest the N smallest are.
"""

import math
from collections.abc import Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from .calibration import model_device, to_device


def block_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's repeated blocks: the longest ModuleList whose children hold Linears."""
    best = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and all(
                any(isinstance(m, nn.Linear) for m in child.modules()) for child in module):
            if best is None or len(module) > len(best[1]):
                best = (name, module)
    if best is None:
        raise ValueError(f"{type(model).__name__} has no list of repeated blocks holding "
                         f"nn.Linear layers: pass targets= explicitly")
    return best


@torch.no_grad()
def angular_layer_scores(model: nn.Module, batches: Iterable[dict]) -> torch.Tensor:
    """Mean angular distance (in [0, 1]) between each block's input and output hidden state
    at the last non-pad token; one score per block."""
    device = model_device(model)
    total, count = None, 0
    for batch in tqdm(batches, desc="layer scores", leave=False):
        batch = to_device(batch, device)
        hidden = model(**batch, output_hidden_states=True).hidden_states
        last = last_positions(batch.get("attention_mask"), batch["input_ids"].shape, device)
        rows = torch.arange(last.shape[0], device=device)
        states = torch.stack([h[rows, last].double() for h in hidden])  # (L+1, B, d)
        distance = angular_distances(states[:-1], states[1:])  # (L, B)
        total = distance.sum(1) if total is None else total + distance.sum(1)
        count += distance.shape[1]
    if not count:
        raise ValueError("calib held no batches: cannot score layers")
    return total / count


def last_positions(mask: torch.Tensor | None, shape: torch.Size, device) -> torch.Tensor:
    """Each sequence's last non-pad position (the last one without a mask)."""
    if mask is None:
        return torch.full((shape[0],), shape[1] - 1, device=device)
    # works for right padding; with left padding the last position is real
    positions = torch.arange(mask.shape[1], device=device)
    return (mask.bool() * positions).argmax(1)


def angular_distances(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """arccos(cos(before, after))/π along the last dimension (fp64 inputs)."""
    cos = torch.nn.functional.cosine_similarity(before, after, dim=-1)
    return torch.arccos(cos.clamp(-1, 1)) / math.pi


def select_layers(scores: torch.Tensor, count: int) -> list[int]:
    """The `count` blocks with the smallest scores, first and last excluded, ascending."""
    eligible = len(scores) - 2
    if not 1 <= count <= eligible:
        raise ValueError(f"layers must pick between 1 and {eligible} blocks (first and last are "
                         f"never compressed) of {len(scores)}, got {count}")
    order = torch.argsort(scores[1:-1].double(), stable=True)[:count] + 1
    return sorted(int(i) for i in order)
