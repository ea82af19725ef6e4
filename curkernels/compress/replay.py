"""Block-by-block replay of calibration data, for the methods that calibrate each layer on
inputs produced by the already-compressed layers before it (ROM, sequential SVD-LLM).

The inputs of the first block are captured once (the forward stops there); afterwards each
block runs on its cached inputs, so no whole-model pass is needed and a block can be run any
number of times — once per target, cut short after it, and once more to produce the next
block's inputs.
"""

import torch
from torch import nn

from .calibration import StopForward, model_device, to_device, token_mask


@torch.no_grad()
def capture_block_inputs(model: nn.Module, block: nn.Module, batches) -> list[tuple]:
    """(token mask, args, kwargs) with which `block` is called for each batch; the forward
    stops there. Caches are switched off so a block can be replayed any number of times."""
    captured = []

    def grab(module, args, kwargs):
        kwargs = dict(kwargs)
        for key in ("cache", "past_key_values", "past_key_value", "layer_past"):
            if key in kwargs:
                kwargs[key] = None
        if "use_cache" in kwargs:
            kwargs["use_cache"] = False
        captured.append((args, kwargs))
        raise StopForward

    handle = block.register_forward_pre_hook(grab, with_kwargs=True)
    device = model_device(model)
    masks = []
    try:
        for batch in batches:
            batch = to_device(batch, device)
            masks.append(token_mask(batch))
            try:
                model(**batch)
            except StopForward:
                pass
    finally:
        handle.remove()
    if len(captured) != len(masks):
        raise RuntimeError("the first block was not reached by every calibration batch")
    return [(mask, args, kwargs) for mask, (args, kwargs) in zip(masks, captured, strict=True)]


@torch.no_grad()
def next_block_inputs(block: nn.Module, inputs: list[tuple]) -> list[tuple]:
    """Run `block` on its cached inputs: the cached inputs of the block after it."""
    out = []
    for mask, args, kwargs in inputs:
        hidden = block(*args, **kwargs)
        hidden = hidden[0] if isinstance(hidden, (tuple, list)) else hidden
        if args:
            out.append((mask, (hidden, *args[1:]), kwargs))
        else:
            out.append((mask, args, {**kwargs, "hidden_states": hidden}))
    return out


def block_passes(block: nn.Module, inputs: list[tuple]):
    """(token mask, a callable running `block` on one cached input), as `stats_from_passes`
    takes them."""
    return ((mask, lambda a=args, k=kwargs: block(*a, **k)) for mask, args, kwargs in inputs)


@torch.no_grad()
def forward_order(block: nn.Module, targets: dict[str, nn.Linear], args, kwargs) -> list[str]:
    """Target names in the order one forward pass of `block` reaches them."""
    order = []
    handles = [linear.register_forward_hook(lambda *_, name=name: order.append(name))
               for name, linear in targets.items()]
    try:
        block(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return list(dict.fromkeys(order)) + [name for name in targets if name not in order]


def targets_in_block(targets: dict[str, nn.Linear], prefix: str, index: int
                     ) -> dict[str, nn.Linear]:
    """The targets inside block `index` of the block list named `prefix`."""
    return {name: linear for name, linear in targets.items()
            if name.startswith(f"{prefix}.{index}.")}
