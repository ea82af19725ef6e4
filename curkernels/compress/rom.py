"""ROM (reduced order modelling of latent features, arXiv 2312.07046).

Layer by layer in forward order, each Linear is calibrated on inputs produced by the
already-compressed layers before it (so errors are corrected downstream, not compounded).
For outputs y = Wx + b with mean μ and mean-centred covariance Σ_y = E[(y − μ)(y − μ)ᵀ],
the symmetric eigensolver gives eigenvectors in descending eigenvalue order; V_r (m×r) keeps
the leading r. The layer is re-parameterised as

    y' = V_r·(V_rᵀW)·x + b',    b' = V_rV_rᵀb + (I − V_rV_rᵀ)μ,

i.e. y' = μ + V_rV_rᵀ(y − μ): the centred output projected on its r principal directions,
whose mean is exactly μ (E[y'] = V_rV_rᵀ(μ − b) + V_rV_rᵀb + (I − V_rV_rᵀ)μ = μ).
Stored as A = V_r (m×r), B = V_rᵀW (r×n). The budget rule r = ⌊keep·mn/(m+n)⌋ is the
largest rank whose factors fit `keep` of the layer (`rank_for_keep`); `layers=` picks the
blocks (the paper compresses the last N). Everything runs on the model's device — a CPU is
enough, as in the paper.
"""

import torch
from torch import nn

from .calibration import (
    StopForward,
    collect_linear_stats,
    model_device,
    stats_from_passes,
    to_device,
    token_mask,
)
from .layer_selection import block_list
from .lowrank import bias_of, replace_with_low_rank
from .report import ModuleReport


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


def _hidden_of(output):
    return output[0] if isinstance(output, (tuple, list)) else output


def _with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


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


def rom_factors(weight: torch.Tensor, bias: torch.Tensor | None, output_mean: torch.Tensor,
                output_covariance: torch.Tensor, rank: int):
    """(A = V_r, B = V_rᵀW, b') from the output statistics, all fp64."""
    eigenvalues, eigenvectors = torch.linalg.eigh(output_covariance.double())
    basis = eigenvectors[:, torch.argsort(eigenvalues, descending=True)[:rank]]
    w = weight.detach().double()
    mean = output_mean.double()
    new_bias = mean - basis @ (basis.T @ mean)
    if bias is not None:
        new_bias = new_bias + basis @ (basis.T @ bias.double())
    return basis, basis.T @ w, new_bias


def compress_rom(model: nn.Module, targets: dict[str, nn.Linear], keep: float, *, calib,
                 rank_multiple: int = 1, **_) -> list[ModuleReport]:
    """Block by block: the inputs of block 0 are captured once, then each block is replayed
    on its cached inputs — once per target (cut short after it) and once more, fully
    compressed, to produce the next block's inputs. Targets outside the blocks are done last
    with whole-model passes."""
    prefix, blocks = block_list(model)
    inputs = capture_block_inputs(model, blocks[0], calib)
    reports = []
    remaining = dict(targets)
    for index, block in enumerate(blocks):
        inside = {name: linear for name, linear in remaining.items()
                  if name.startswith(f"{prefix}.{index}.")}
        _, args, kwargs = inputs[0]
        for name in forward_order(block, inside, args, kwargs):
            linear = remaining.pop(name)
            passes = ((mask, lambda a=a, k=k, b=block: b(*a, **k)) for mask, a, k in inputs)
            stats = stats_from_passes({name: linear}, passes, outputs=True, stop_after=True,
                                      desc=f"rom {name}")
            reports += _replace(model, name, linear, keep, rank_multiple, stats)
        if not remaining:
            break
        inputs = [(mask, *_with_hidden(a, k, _hidden_of(block(*a, **k))))
                  for mask, a, k in inputs]
    for name, linear in remaining.items():  # outside the blocks: whole-model passes
        stats = collect_linear_stats(model, {name: linear}, calib, outputs=True,
                                     stop_after=True, desc=f"rom {name}")
        reports += _replace(model, name, linear, keep, rank_multiple, stats)
    return reports


def _replace(model, name, linear, keep, rank_multiple, stats) -> list[ModuleReport]:
    s = stats[name]
    return replace_with_low_rank(
        model, {name: linear}, keep, rank_multiple,
        lambda _, lin, rank: rom_factors(lin.weight, bias_of(lin), s.output_mean,
                                         s.output_covariance, rank), stats)
