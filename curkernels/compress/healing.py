"""Healing: a short distillation of the compressed model towards its dense teacher.

Only small tensors learn: by default the ones each compressed module names in `healable`
(a CURLinear's U — C and R stay real rows and columns of W, as in the CURing paper; without U,
the low-rank factors C and R; a NarrowLinear that reads kept inputs — pairwise's o_proj and
down_proj, refit on them — its weight and bias, while the layers keeping rows stay real rows),
or the factors named in `trainable`. Embeddings, norms, the head and
every layer left dense stay as they are. AdamW with a cosine learning-rate schedule.

Causal LMs are distilled on the teacher's next-token distribution: KL(teacher ‖ student) of
the logits at every real token (`kl_weight`, with an optional `temperature`), optionally plus
the hidden-state MSE (`mse_weight`) and the next-token cross-entropy on the data (`ce_weight`).
Encoders have no next-token distribution: for them the loss is the hidden-state MSE.

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

from ..nn import CURLinear, NarrowLinear
from .calibration import is_causal_lm, mean_pool, model_device, to_device, token_mask
from .calibration_sources import as_batches

# heal()'s loss when none is given: the teacher's next-token distribution for causal LMs, the
# hidden states for encoders
CAUSAL_LM_WEIGHTS = {"kl_weight": 1.0, "ce_weight": 0.0, "mse_weight": 0.0}
ENCODER_WEIGHTS = {"kl_weight": 0.0, "ce_weight": 0.0, "mse_weight": 0.9}


def factor_parameters_named(model: nn.Module, trainable: Iterable[str]) -> list[nn.Parameter]:
    """The parameters called one of `trainable` (e.g. 'U', or 'C'/'R') in factored modules."""
    names = set(trainable)
    params = [p for module in model.modules() if isinstance(module, CURLinear)
              for name, p in module.named_parameters(recurse=False) if name in names]
    if not params:
        raise ValueError(f"trainable={sorted(names)} matched no parameter of a factored module "
                         f"(a CURLinear has C, U (unless it has two factors) and R): compress "
                         f"the model first, or name other factors")
    return params


def healable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The small tensors of every compressed module: the parameters its `healable` names (a
    NarrowLinear without a bias names one it does not have)."""
    params = [param for module in model.modules()
              if isinstance(module, (CURLinear, NarrowLinear)) for name in module.healable
              if (param := module._parameters.get(name)) is not None]
    if not params:
        raise ValueError("the model holds no compressed module with trainable small tensors "
                         "(CURLinear.healable, NarrowLinear.healable): compress it first, or "
                         "name the factors in trainable=")
    return params


def norm_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The weights and biases of the model's normalisation layers (LayerNorm, and the RMSNorm
    classes of transformers, which are not nn.LayerNorm subclasses)."""
    return [p for module in model.modules()
            if isinstance(module, nn.LayerNorm) or type(module).__name__.endswith("RMSNorm")
            for p in module.parameters(recurse=False)]


def pooled_cosine_distance(hidden: torch.Tensor, target: torch.Tensor,
                           mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over the batch of 1 − cosine between the mean-pooled `hidden` and `target`
    (pad tokens excluded): 0 when every pooled, normalised embedding matches the teacher's."""
    a, b = mean_pool(hidden.float(), mask), mean_pool(target.float(), mask)
    return (1 - nn.functional.cosine_similarity(a, b, dim=-1, eps=1e-8)).mean()


def check_weights(mse_weight: float, pooled_weight: float, kl_weight: float = 0.0,
                  ce_weight: float = 0.0, temperature: float = 1.0, causal: bool = False) -> None:
    weights = {"mse_weight": mse_weight, "pooled_weight": pooled_weight,
               "kl_weight": kl_weight, "ce_weight": ce_weight}
    for name, value in weights.items():
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite number ≥ 0, got {value!r}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature)
            and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if not causal and kl_weight:
        raise ValueError(f"kl_weight={kl_weight} needs a causal LM: an encoder has no "
                         f"next-token distribution")
    if not any(weights.values()) or not (causal or mse_weight or pooled_weight):
        raise ValueError("mse_weight and pooled_weight are both 0: the encoder loss would be "
                         "empty; give one of them a positive weight" if not causal else
                         "kl_weight, ce_weight, mse_weight and pooled_weight are all 0: the "
                         "loss would be empty; give one of them a positive weight")


def next_token_kl(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None,
                  temperature: float = 1.0) -> torch.Tensor:
    """Mean over real tokens of KL(softmax(target/T) ‖ softmax(logits/T)) · T², in float32."""
    student = torch.log_softmax(logits.float() / temperature, dim=-1)
    teacher = torch.log_softmax(target.float() / temperature, dim=-1)
    per_token = nn.functional.kl_div(student, teacher, log_target=True,
                                     reduction="none").sum(-1)
    per_token = per_token[mask] if mask is not None else per_token
    return per_token.mean() * temperature ** 2


def distillation_loss(model: nn.Module, teacher: nn.Module, batch: dict,
                      ce_weight: float = 0.1, mse_weight: float = 0.9,
                      pooled_weight: float = 0.0, kl_weight: float = 0.0,
                      temperature: float = 1.0) -> torch.Tensor:
    """kl_weight·KL(teacher ‖ student) of the next-token distributions + ce_weight·next-token
    CE (both causal LMs only) + mse_weight·MSE of every hidden state against the teacher's +
    pooled_weight·(1 − cosine) of the mean-pooled last hidden state against the teacher's,
    pad tokens excluded throughout."""
    mask = token_mask(batch)
    causal = is_causal_lm(model)
    hidden = bool(mse_weight or pooled_weight)
    extra = {"output_hidden_states": hidden}
    if causal and ce_weight:
        labels = batch["input_ids"].clone()
        if mask is not None:
            labels[~mask] = -100
        extra["labels"] = labels
    out = model(**batch, **extra)
    with torch.no_grad():
        target = teacher(**batch, output_hidden_states=hidden)
    loss = 0.0
    if mse_weight:
        mse = 0.0
        for h, t in zip(out.hidden_states, target.hidden_states, strict=True):
            diff = (h.float() - t.float()) ** 2
            mse = mse + (diff[mask].mean() if mask is not None else diff.mean())
        loss = mse_weight * mse / len(target.hidden_states)
    if pooled_weight:
        loss = loss + pooled_weight * pooled_cosine_distance(out.hidden_states[-1],
                                                             target.hidden_states[-1], mask)
    if causal and kl_weight:
        loss = loss + kl_weight * next_token_kl(out.logits, target.logits, mask, temperature)
    if causal and ce_weight:
        loss = loss + ce_weight * out.loss
    return loss


def train_factors(model: nn.Module, teacher: nn.Module, data: Iterable[dict], params,
                  steps: int, lr: float, weight_decay: float = 0.0, warmup: int = 0,
                  before_step: Callable[[int], None] | None = None,
                  desc: str = "healing", **weights) -> list[float]:
    """AdamW on `params` for `steps` batches (cycling `data`) with linear warm-up then cosine
    decay to 0; `before_step(step)` runs before each forward (LPAF samples its rank there).
    The loss is `distillation_loss` with `weights` (its keyword arguments).
    Returns the loss of every step."""
    weights = {"ce_weight": 0.1, "mse_weight": 0.9, "pooled_weight": 0.0, "kl_weight": 0.0,
               "temperature": 1.0, **weights}
    check_weights(**weights, causal=is_causal_lm(model))
    if steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps}")
    if lr <= 0:
        raise ValueError(f"lr must be positive, got {lr}")
    batches = list(data)
    if not batches:
        raise ValueError("data is empty: healing needs batches")
    device = model_device(model)
    teacher.eval()
    was_training = model.training
    model.eval()  # dropout off: healing matches the deployed model to the teacher
    try:
        return run_training(
            params, batches,
            lambda batch: distillation_loss(model, teacher, to_device(batch, device), **weights),
            steps, lr, weight_decay=weight_decay, warmup=warmup, before_step=before_step,
            desc=desc)
    finally:
        model.train(was_training)


def run_training(params, batches: list, loss_of: Callable[[dict], torch.Tensor], steps: int,
                 lr: float, *, weight_decay: float = 0.0, warmup: int = 0,
                 before_step: Callable[[int], None] | None = None,
                 desc: str = "healing") -> list[float]:
    """AdamW on `params` for `steps` batches (cycling `batches`), linear warm-up then cosine
    decay to 0, minimising `loss_of(batch)`; a non-finite loss stops it. Returns each step's
    loss."""
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: (
        (s + 1) / warmup if s < warmup
        else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, steps - warmup)))))
    losses = []
    for step, batch in zip(tqdm(range(steps), desc=desc, leave=False),
                           itertools.cycle(batches)):
        if before_step is not None:
            before_step(step)
        loss = loss_of(batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"the loss became {loss.item()} at step {step}: lower lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    return losses


def heal(model: nn.Module, teacher: nn.Module, data, steps: int = 200, *,
         lr: float = 1e-4, weight_decay: float = 0.0, warmup: int = 0,
         trainable: tuple[str, ...] | None = None, kl_weight: float | None = None,
         ce_weight: float | None = None, mse_weight: float | None = None,
         pooled_weight: float = 0.0, temperature: float = 1.0, train_norms: bool = False,
         tokenizer=None, seq_len: int = 256, batch_size: int = 4,
         before_step: Callable[[int], None] | None = None) -> list[float]:
    """Distil `model` (compressed, in place) towards `teacher` (the dense model) on `data` —
    input dicts, or texts with `tokenizer` (cut to `seq_len` tokens, `batch_size` a batch) —
    and return the loss of every step.

    Trains the small tensors of the compressed modules (`healable_parameters`), or the factors
    named in `trainable` (e.g. ('U',), or ('C', 'R')), and with `train_norms` the
    normalisation layers' weights and biases, which adapt to the shifted statistics of the
    compressed layers' outputs. Nothing else changes.

    The loss (`distillation_loss`): for causal LMs by default KL(teacher ‖ student) of the
    next-token distributions (kl_weight 1; ce_weight and mse_weight 0); for encoders
    `mse_weight` 0.9 · hidden-state MSE, plus `pooled_weight`·(1 − cosine) of the
    attention-mask mean-pooled last hidden state — the sentence embedding a mean-pooling
    encoder is scored on (e.g. STS). Weights must be finite and ≥ 0, and not all 0.

    `before_step(step)` runs before each step's forward, e.g. to check a validation loss.
    """
    defaults = CAUSAL_LM_WEIGHTS if is_causal_lm(model) else ENCODER_WEIGHTS
    given = {"kl_weight": kl_weight, "ce_weight": ce_weight, "mse_weight": mse_weight}
    weights = {name: defaults[name] if value is None else value
               for name, value in given.items()}
    weights.update(pooled_weight=pooled_weight, temperature=temperature)
    check_weights(**weights, causal=is_causal_lm(model))
    batches = as_batches(data, tokenizer, seq_len=seq_len, batch_size=batch_size)
    params = healable_parameters(model) if trainable is None else \
        factor_parameters_named(model, trainable)
    if train_norms:
        params += norm_parameters(model)
    flags = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    try:
        return train_factors(model, teacher, batches, params, steps, lr, weight_decay, warmup,
                             before_step=before_step, **weights)
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
