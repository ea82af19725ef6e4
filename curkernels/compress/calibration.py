"""Calibration engine: forward hooks on target Linears that accumulate input/output
statistics in fp64, with pad tokens masked out by `attention_mask`, plus first-order
importance |W ⊙ ∂L/∂W|.

Only the statistics a method asks for are kept, so memory stays bounded: the n×n input Gram
matrix and the m×m output moment are opt-in (per module, on the calibration device).
"""

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm


@dataclass
class LinearStats:
    """Sums over the calibration tokens seen by one Linear (pads excluded).

    `gram` is Σ xxᵀ (n×n), `out_sum` / `out_outer` are Σ y and Σ yyᵀ of the Linear's output.
    """
    tokens: int
    sq_sum: torch.Tensor
    abs_sum: torch.Tensor
    gram: torch.Tensor | None = None
    out_sum: torch.Tensor | None = None
    out_outer: torch.Tensor | None = None

    @property
    def mean_sq(self) -> torch.Tensor:
        """E[x²] per input channel (the Wanda activation norm, squared)."""
        return self.sq_sum / max(self.tokens, 1)

    @property
    def mean_abs(self) -> torch.Tensor:
        return self.abs_sum / max(self.tokens, 1)

    @property
    def second_moment(self) -> torch.Tensor:
        """E[xxᵀ] (n×n)."""
        if self.gram is None:
            raise ValueError("the input Gram matrix was not collected: pass gram=True")
        return self.gram / max(self.tokens, 1)

    @property
    def output_mean(self) -> torch.Tensor:
        if self.out_sum is None:
            raise ValueError("output statistics were not collected: pass outputs=True")
        return self.out_sum / max(self.tokens, 1)

    @property
    def output_covariance(self) -> torch.Tensor:
        """E[(y − μ)(y − μ)ᵀ] (m×m), the mean-centred output covariance."""
        mean = self.output_mean
        return self.out_outer / max(self.tokens, 1) - torch.outer(mean, mean)


def check_finite_stats(name: str, stats: LinearStats) -> None:
    """NaN/Inf in calibration statistics would silently poison every factor built from them."""
    for field in ("sq_sum", "abs_sum", "gram", "out_sum", "out_outer"):
        value = getattr(stats, field)
        if value is not None and not torch.isfinite(value).all():
            raise ValueError(f"calibration statistics of {name!r} hold NaN or Inf in {field}: "
                             f"check the model's weights and the calibration inputs")
    if stats.tokens == 0:
        raise ValueError(f"calibration never reached {name!r}: no tokens were recorded")


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def token_mask(batch: dict) -> torch.Tensor | None:
    mask = batch.get("attention_mask")
    return None if mask is None else mask.bool()


def _real_tokens(t: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """(tokens, features) rows of `t`, pads dropped when the mask lines up with t's shape."""
    if mask is not None and t.dim() == mask.dim() + 1 and t.shape[:-1] == mask.shape:
        return t[mask]
    return t.reshape(-1, t.shape[-1])


class StopForward(Exception):
    """Raised from a hook to end a calibration forward pass early."""


class _StatsHook:
    def __init__(self, linear: nn.Linear, gram: bool, outputs: bool):
        n, m = linear.in_features, linear.out_features
        device = linear.weight.device
        zeros = lambda *s: torch.zeros(s, dtype=torch.float64, device=device)  # noqa: E731
        self.stats = LinearStats(0, zeros(n), zeros(n), zeros(n, n) if gram else None,
                                 zeros(m) if outputs else None,
                                 zeros(m, m) if outputs else None)
        self.mask = None

    def __call__(self, module, args, output):
        x = _real_tokens(args[0].detach(), self.mask).double()
        s = self.stats
        s.tokens += x.shape[0]
        s.sq_sum += (x * x).sum(0)
        s.abs_sum += x.abs().sum(0)
        if s.gram is not None:
            s.gram += x.T @ x
        if s.out_sum is not None:
            y = _real_tokens(output.detach(), self.mask).double()
            s.out_sum += y.sum(0)
            s.out_outer += y.T @ y


@torch.no_grad()
def collect_linear_stats(model: nn.Module, targets: dict[str, nn.Linear], batches: Iterable[dict],
                         *, gram: bool = False, outputs: bool = False,
                         stop_after: bool = False,
                         desc: str = "calibration") -> dict[str, LinearStats]:
    """Run `batches` through `model` and return the statistics of each target's input (and
    output with `outputs=True`). With `stop_after`, each forward pass is cut short once every
    target has been seen (the rest of the model is not needed). Raises if any statistic is
    NaN/Inf or a target saw nothing."""
    device = model_device(model)

    def passes():
        for batch in batches:
            batch = to_device(batch, device)
            yield token_mask(batch), lambda batch=batch: model(**batch)

    return stats_from_passes(targets, passes(), gram=gram, outputs=outputs,
                             stop_after=stop_after, desc=desc)


def stats_from_passes(targets: dict[str, nn.Linear], passes: Iterable, *, gram: bool = False,
                      outputs: bool = False, stop_after: bool = False,
                      desc: str = "calibration") -> dict[str, LinearStats]:
    """`collect_linear_stats` over arbitrary forward passes: `passes` yields (token mask or
    None, a callable running one forward) — e.g. one transformer block on cached inputs."""
    hooks = {name: _StatsHook(linear, gram, outputs) for name, linear in targets.items()}
    handles = [linear.register_forward_hook(hooks[name]) for name, linear in targets.items()]
    pending = set()
    if stop_after:
        def stop_when_all_seen(module, args, output):
            pending.discard(module)
            if not pending:
                raise StopForward
        handles += [linear.register_forward_hook(stop_when_all_seen)
                    for linear in targets.values()]
    try:
        for mask, run in tqdm(passes, desc=desc, leave=False):
            for hook in hooks.values():
                hook.mask = mask
            pending.update(targets.values())
            try:
                run()
            except StopForward:
                pass
    finally:
        for handle in handles:
            handle.remove()
    for name, hook in hooks.items():
        check_finite_stats(name, hook.stats)
    return {name: hook.stats for name, hook in hooks.items()}


def is_causal_lm(model: nn.Module) -> bool:
    from transformers import GenerationMixin
    return isinstance(model, GenerationMixin) and hasattr(model, "get_output_embeddings") and \
        model.get_output_embeddings() is not None


def calibration_loss(model: nn.Module, batch: dict, generator: torch.Generator) -> torch.Tensor:
    """Next-token cross-entropy for causal LMs. For encoders, distillation to the dense
    model's own outputs with targets sampled around them (y ~ N(h, σ²)): at the dense point a
    plain MSE to itself has zero gradient, while the sampled-target loss gives gradients whose
    magnitudes follow the output Fisher information — what first-order importance needs."""
    if is_causal_lm(model):
        labels = batch["input_ids"].clone()
        mask = token_mask(batch)
        if mask is not None:
            labels[~mask] = -100
        return model(**batch, labels=labels).loss
    hidden = model(**batch).last_hidden_state
    mask = token_mask(batch)
    hidden = _real_tokens(hidden, mask)
    noise = torch.randn(hidden.shape, generator=generator, dtype=hidden.dtype,
                        device="cpu").to(hidden.device) * hidden.detach().std()
    return 0.5 * ((hidden - (hidden.detach() + noise)) ** 2).sum(-1).mean()


def first_order_importance(model: nn.Module, targets: dict[str, nn.Linear],
                           batches: Iterable[dict], *, seed: int = 0,
                           desc: str = "importance") -> dict[str, torch.Tensor]:
    """Mean over batches of |W ⊙ ∂L/∂W| for each target (fp64, on the weight's device), the
    first-order (movement-style) estimate of the loss change from zeroing each entry."""
    device = model_device(model)
    generator = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()  # dropout off: the importance is that of the deployed model
    requires = {name: p.requires_grad for name, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for linear in targets.values():
        linear.weight.requires_grad_(True)
        linear.weight.grad = None
    sums = {name: torch.zeros_like(linear.weight, dtype=torch.float64)
            for name, linear in targets.items()}
    count = 0
    try:
        for batch in tqdm(batches, desc=desc, leave=False):
            loss = calibration_loss(model, to_device(batch, device), generator)
            if not torch.isfinite(loss):
                raise ValueError("the calibration loss is NaN or Inf: cannot score importance")
            loss.backward()
            for name, linear in targets.items():
                sums[name] += (linear.weight.detach().double() * linear.weight.grad.double()).abs()
                linear.weight.grad = None
            count += 1
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(requires[name])
        model.train(was_training)
    if count == 0:
        raise ValueError("calib held no batches: cannot score importance")
    return {name: total / count for name, total in sums.items()}
