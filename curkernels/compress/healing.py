"""Healing: a short distillation of the compressed model towards its dense teacher.

As the CURing paper: only the factors named in `trainable` learn (U by default; C and R stay
real rows and columns of W), with loss 0.1·cross-entropy + 0.9·MSE of the hidden states
against the teacher's, AdamW and a cosine learning-rate schedule. Encoders have no
next-token loss: for them the loss is the hidden-state MSE alone.
"""

import itertools
import math
from collections.abc import Callable, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..nn import FACTORED_MODULES
from .calibration import is_causal_lm, model_device, to_device, token_mask


def factor_parameters_named(model: nn.Module, trainable: Iterable[str]) -> list[nn.Parameter]:
    """The parameters called one of `trainable` (e.g. 'U', or 'A'/'B') in factored modules."""
    names = set(trainable)
    params = [p for module in model.modules() if isinstance(module, FACTORED_MODULES)
              for name, p in module.named_parameters(recurse=False) if name in names]
    if not params:
        raise ValueError(f"trainable={sorted(names)} matched no parameter of a factored module "
                         f"(CURLinear has C/U/R, LowRankLinear has A/B): compress the model "
                         f"first, or name other factors")
    return params


def distillation_loss(model: nn.Module, teacher: nn.Module, batch: dict,
                      ce_weight: float = 0.1, mse_weight: float = 0.9) -> torch.Tensor:
    """ce_weight·next-token CE (causal LMs only) + mse_weight·MSE of every hidden state
    against the teacher's, pad tokens excluded."""
    mask = token_mask(batch)
    causal = is_causal_lm(model)
    labels = None
    if causal:
        labels = batch["input_ids"].clone()
        if mask is not None:
            labels[~mask] = -100
    out = model(**batch, labels=labels, output_hidden_states=True) if causal else \
        model(**batch, output_hidden_states=True)
    with torch.no_grad():
        target = teacher(**batch, output_hidden_states=True).hidden_states
    mse = 0.0
    for h, t in zip(out.hidden_states, target, strict=True):
        diff = (h.float() - t.float()) ** 2
        mse = mse + (diff[mask].mean() if mask is not None else diff.mean())
    loss = mse_weight * mse / len(target)
    return loss + ce_weight * out.loss if causal else loss


def train_factors(model: nn.Module, teacher: nn.Module, data: Iterable[dict], params,
                  steps: int, lr: float, weight_decay: float = 0.0, warmup: int = 0,
                  before_step: Callable[[int], None] | None = None,
                  desc: str = "healing") -> list[float]:
    """AdamW on `params` for `steps` batches (cycling `data`) with linear warm-up then cosine
    decay to 0; `before_step(step)` runs before each forward (LPAF samples its rank there).
    Returns the loss of every step."""
    if steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps}")
    if lr <= 0:
        raise ValueError(f"lr must be positive, got {lr}")
    batches = list(data)
    if not batches:
        raise ValueError("data is empty: healing needs batches")
    device = model_device(model)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: (
        (s + 1) / warmup if s < warmup
        else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, steps - warmup)))))
    teacher.eval()
    was_training = model.training
    model.eval()  # dropout off: healing matches the deployed model to the teacher
    losses = []
    try:
        for step, batch in zip(tqdm(range(steps), desc=desc, leave=False),
                               itertools.cycle(batches)):
            if before_step is not None:
                before_step(step)
            loss = distillation_loss(model, teacher, to_device(batch, device))
            if not torch.isfinite(loss):
                raise FloatingPointError(f"the loss became {loss.item()} at step {step}: "
                                         f"lower lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
    finally:
        model.train(was_training)
    return losses


def heal(model: nn.Module, teacher: nn.Module, data: Iterable[dict], steps: int = 200, *,
         lr: float = 1e-4, weight_decay: float = 0.0, warmup: int = 0,
         trainable: tuple[str, ...] = ("U",)) -> list[float]:
    """Distil `model` (compressed, in place) towards `teacher` (the dense model) on `data`
    (input dicts), training only the factors named in `trainable`. Returns per-step losses."""
    params = factor_parameters_named(model, trainable)
    flags = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    try:
        return train_factors(model, teacher, data, params, steps, lr, weight_decay, warmup)
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
