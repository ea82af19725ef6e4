"""Healing: a short distillation of the compressed model towards its dense teacher.

As the CURing paper: only the factors named in `trainable` learn (U by default; C and R stay
real rows and columns of W), with loss 0.1·cross-entropy + 0.9·MSE of the hidden states
against the teacher's, AdamW and a cosine learning-rate schedule. Encoders have no
next-token loss: for them the loss is the hidden-state MSE alone.

Sentence encoders are scored on the mean-pooled, L2-normalised last hidden state, not on the
hidden states one by one: `pooled_weight` adds that objective, the cosine distance
1 − cos(pool(student), pool(teacher)) averaged over the batch, with pooling over the
attention mask's tokens only. It is off (0) by default; `mse_weight` scales (or, at 0, drops)
the hidden-state MSE next to it.
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


def norm_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The weights and biases of the model's normalisation layers (LayerNorm, and the RMSNorm
    classes of transformers, which are not nn.LayerNorm subclasses)."""
    return [p for module in model.modules()
            if isinstance(module, nn.LayerNorm) or type(module).__name__.endswith("RMSNorm")
            for p in module.parameters(recurse=False)]


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of `hidden` (batch, tokens, width) over the tokens where `mask` is true (all of
    them when mask is None), in float32: the sentence embedding of a mean-pooling encoder."""
    hidden = hidden.float()
    if mask is None:
        return hidden.mean(dim=1)
    weights = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


def pooled_cosine_distance(hidden: torch.Tensor, target: torch.Tensor,
                           mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over the batch of 1 − cosine between the mean-pooled `hidden` and `target`
    (pad tokens excluded): 0 when every pooled, normalised embedding matches the teacher's."""
    a, b = mean_pool(hidden, mask), mean_pool(target, mask)
    return (1 - nn.functional.cosine_similarity(a, b, dim=-1, eps=1e-8)).mean()


def check_weights(mse_weight: float, pooled_weight: float) -> None:
    for name, value in (("mse_weight", mse_weight), ("pooled_weight", pooled_weight)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite number ≥ 0, got {value!r}")
    if mse_weight == 0 and pooled_weight == 0:
        raise ValueError("mse_weight and pooled_weight are both 0: the encoder loss would be "
                         "empty; give one of them a positive weight")


def distillation_loss(model: nn.Module, teacher: nn.Module, batch: dict,
                      ce_weight: float = 0.1, mse_weight: float = 0.9,
                      pooled_weight: float = 0.0) -> torch.Tensor:
    """ce_weight·next-token CE (causal LMs only) + mse_weight·MSE of every hidden state
    against the teacher's + pooled_weight·(1 − cosine) of the mean-pooled last hidden state
    against the teacher's, pad tokens excluded throughout."""
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
    loss = 0.0
    if mse_weight:
        mse = 0.0
        for h, t in zip(out.hidden_states, target, strict=True):
            diff = (h.float() - t.float()) ** 2
            mse = mse + (diff[mask].mean() if mask is not None else diff.mean())
        loss = mse_weight * mse / len(target)
    if pooled_weight:
        loss = loss + pooled_weight * pooled_cosine_distance(out.hidden_states[-1], target[-1],
                                                             mask)
    return loss + ce_weight * out.loss if causal else loss


def train_factors(model: nn.Module, teacher: nn.Module, data: Iterable[dict], params,
                  steps: int, lr: float, weight_decay: float = 0.0, warmup: int = 0,
                  before_step: Callable[[int], None] | None = None,
                  desc: str = "healing", mse_weight: float = 0.9,
                  pooled_weight: float = 0.0) -> list[float]:
    """AdamW on `params` for `steps` batches (cycling `data`) with linear warm-up then cosine
    decay to 0; `before_step(step)` runs before each forward (LPAF samples its rank there).
    The loss is `distillation_loss` with `mse_weight` and `pooled_weight`.
    Returns the loss of every step."""
    check_weights(mse_weight, pooled_weight)
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
            loss = distillation_loss(model, teacher, to_device(batch, device),
                                     mse_weight=mse_weight, pooled_weight=pooled_weight)
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
         trainable: tuple[str, ...] = ("U",), mse_weight: float = 0.9,
         pooled_weight: float = 0.0, train_norms: bool = False) -> list[float]:
    """Distil `model` (compressed, in place) towards `teacher` (the dense model) on `data`
    (input dicts), training only the factors named in `trainable` (the paper's CURing heals U
    alone) and, with `train_norms`, the normalisation layers' weights and biases, which adapt
    to the shifted statistics of the compressed layers' outputs. Returns per-step losses.

    The loss is 0.1·next-token CE (causal LMs only) + `mse_weight`·hidden-state MSE +
    `pooled_weight`·(1 − cosine) of the attention-mask mean-pooled last hidden state against
    the teacher's — the sentence embedding a mean-pooling encoder is scored on (e.g. STS).
    Both weights must be finite and ≥ 0, and not both 0."""
    check_weights(mse_weight, pooled_weight)
    params = factor_parameters_named(model, trainable)
    if train_norms:
        params += norm_parameters(model)
    flags = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    try:
        return train_factors(model, teacher, data, params, steps, lr, weight_decay, warmup,
                             mse_weight=mse_weight, pooled_weight=pooled_weight)
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
