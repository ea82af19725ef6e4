"""Calibration engine: forward hooks on target Linears that accumulate input/output
statistics in fp64, with pad tokens masked out by `attention_mask`, plus first-order
importance |W ⊙ ∂L/∂W|.

Only the statistics a method asks for are kept, so memory stays bounded: the n×n input Gram
matrix and the m×m output moment are opt-in (per module, on the calibration device).
"""

from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

# statistics are accumulated (and checked) this many fp64 values at a time: a wide
# input's whole batch in fp64 (2048 tokens × 8192 = 134 MB) is never copied at once (8 MB)
CHUNK_VALUES = 1 << 20


def _count(stats) -> float:
    """What the sums are divided by: the tokens seen, or the sum of their weights where the
    tokens were weighted."""
    weight = getattr(stats, "weight", None)
    return max(stats.tokens, 1) if weight is None else weight


def _per_token(total: str, doc: str) -> property:
    """A read-only statistic: the sum kept in field `total` over the tokens seen."""
    return property(lambda stats: getattr(stats, total) / _count(stats), doc=doc)


@dataclass
class LinearStats:
    """Sums over the calibration tokens seen by one Linear (pads excluded).

    `in_sum` is Σ x, `gram` is Σ xxᵀ (n×n), `out_sum` / `out_outer` are Σ y and Σ yyᵀ of the
    Linear's output.
    """
    tokens: int
    in_sum: torch.Tensor
    sq_sum: torch.Tensor
    abs_sum: torch.Tensor
    gram: torch.Tensor | None = None
    out_sum: torch.Tensor | None = None
    out_outer: torch.Tensor | None = None

    mean = _per_token("in_sum", "E[x] per input channel.")
    mean_sq = _per_token("sq_sum", "E[x²] per input channel (the Wanda activation norm, "
                         "squared).")
    mean_abs = _per_token("abs_sum", "E[|x|] per input channel.")

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


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether every entry is finite, checked a block of entries at a time: `torch.isfinite`
    of a whole n×n matrix makes temporaries several times its size (|x| and three masks)."""
    flat = tensor.reshape(-1)
    return all(bool(torch.isfinite(flat[start:start + CHUNK_VALUES]).all())
               for start in range(0, flat.numel(), CHUNK_VALUES))


def check_finite_stats(name: str, stats: LinearStats) -> None:
    """NaN/Inf in calibration statistics would silently poison every factor built from them."""
    for field in ("in_sum", "sq_sum", "abs_sum", "gram", "out_sum", "out_outer"):
        value = getattr(stats, field)
        if value is not None and not all_finite(value):
            raise ValueError(f"calibration statistics of {name!r} hold NaN or Inf in {field}: "
                             f"check the model's weights and the calibration inputs")
    if stats.tokens == 0:
        raise ValueError(f"calibration never reached {name!r}: no tokens were recorded")


def check_finite_parameters(model: nn.Module) -> None:
    """A NaN/Inf weight, found before any forward pass: calibration would otherwise blame the
    statistics of whichever later target its output reaches first."""
    for name, parameter in model.named_parameters():
        if parameter.is_floating_point() and not torch.isfinite(parameter).all():
            raise ValueError(f"the model's parameter {name!r} holds NaN or Inf: cannot "
                             f"compress a model with non-finite weights")


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def token_mask(batch: dict) -> torch.Tensor | None:
    mask = batch.get("attention_mask")
    return None if mask is None else mask.bool()


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of `hidden` (batch, tokens, width) over the tokens where `mask` is true (all of
    them when mask is None): the sentence embedding of a mean-pooling encoder, as
    sentence-transformers pools all-MiniLM-L6-v2."""
    if mask is None:
        return hidden.mean(dim=1)
    weights = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


def _real_tokens(t: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """(tokens, features) rows of `t`, pads dropped when the mask lines up with t's shape."""
    if mask is not None and t.dim() == mask.dim() + 1 and t.shape[:-1] == mask.shape:
        return t[mask]
    return t.reshape(-1, t.shape[-1])


class StopForward(Exception):
    """Raised from a hook to end a calibration forward pass early."""


class _StatsHook:
    def __init__(self, linear: nn.Linear, gram: bool, outputs: bool,
                 gram_dtype: torch.dtype = torch.float64):
        n, m = linear.in_features, linear.out_features
        device = linear.weight.device
        zeros = lambda *s, dtype=torch.float64: torch.zeros(  # noqa: E731
            s, dtype=dtype, device=device)
        self.stats = LinearStats(0, zeros(n), zeros(n), zeros(n),
                                 zeros(n, n, dtype=gram_dtype) if gram else None,
                                 zeros(m) if outputs else None,
                                 zeros(m, m) if outputs else None)
        self.mask = None

    def __call__(self, module, args, output):
        tokens = _real_tokens(args[0].detach(), self.mask)
        outputs = (_real_tokens(output.detach(), self.mask)
                   if self.stats.out_sum is not None else None)
        rows = max(1, CHUNK_VALUES // tokens.shape[-1])
        for start in range(0, tokens.shape[0], rows):
            self.add(tokens[start:start + rows],
                     None if outputs is None else outputs[start:start + rows])

    def add(self, x: torch.Tensor, y: torch.Tensor | None) -> None:
        s = self.stats
        s.tokens += x.shape[0]
        if s.gram is not None:  # in place: no n×n product beside the sum
            low = x.to(s.gram.dtype)
            s.gram.addmm_(low.T, low)
        x = x.double()
        s.in_sum += x.sum(0)
        s.sq_sum += (x * x).sum(0)
        s.abs_sum += x.abs().sum(0)
        if y is not None:
            y = y.double()
            s.out_sum += y.sum(0)
            s.out_outer.addmm_(y.T, y)


@torch.no_grad()
def collect_linear_stats(model: nn.Module, targets: dict[str, nn.Linear], batches: Iterable[dict],
                         *, gram: bool = False, outputs: bool = False,
                         stop_after: bool = False, gram_dtype: torch.dtype = torch.float64,
                         desc: str = "calibration") -> dict[str, LinearStats]:
    """Run `batches` through `model` and return the statistics of each target's input (and
    output with `outputs=True`); the Gram matrix is summed in `gram_dtype`. With `stop_after`, each forward pass is cut short once every
    target has been seen (the rest of the model is not needed). Raises if any statistic is
    NaN/Inf or a target saw nothing."""
    device = model_device(model)

    def passes():
        for batch in batches:
            batch = to_device(batch, device)
            yield token_mask(batch), lambda batch=batch: model(**batch)

    return stats_from_passes(targets, passes(), gram=gram, outputs=outputs,
                             stop_after=stop_after, gram_dtype=gram_dtype, desc=desc)


def stats_from_passes(targets: dict[str, nn.Linear], passes: Iterable, *, gram: bool = False,
                      outputs: bool = False, stop_after: bool = False,
                      gram_dtype: torch.dtype = torch.float64,
                      desc: str = "calibration") -> dict[str, LinearStats]:
    """`collect_linear_stats` over arbitrary forward passes: `passes` yields (token mask or
    None, a callable running one forward) — e.g. one transformer block on cached inputs."""
    hooks = {name: _StatsHook(linear, gram, outputs, gram_dtype)
             for name, linear in targets.items()}
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


@dataclass
class PairedInputStats:
    """Sums over the tokens seen by a Linear in the compressed model (inputs x̂) and by its
    twin in the dense model (inputs x) on the same calibration tokens: Σ x̂, Σ x, Σ x̂x̂ᵀ and
    Σ x x̂ᵀ (n×n) — what fitting the compressed layer to the dense layer's outputs needs.
    With token weights the sums are weighted and `weight` is the weights' sum."""
    tokens: int
    sum: torch.Tensor
    dense_sum: torch.Tensor
    gram: torch.Tensor
    cross: torch.Tensor
    weight: float | None = None

    mean = _per_token("sum", "E[x̂] per input channel.")
    dense_mean = _per_token("dense_sum", "E[x] per input channel.")
    second_moment = _per_token("gram", "E[x̂x̂ᵀ] (n×n).")
    cross_moment = _per_token("cross", "E[x x̂ᵀ] (n×n): dense inputs against compressed inputs.")

    @property
    def mean_sq(self) -> torch.Tensor:
        """E[x̂²] per input channel."""
        return self.gram.diagonal() / _count(self)


@torch.no_grad()
def paired_input_stats(name: str, dense_linear: nn.Linear, linear: nn.Linear,
                       passes: Iterable, desc: str = "calibration",
                       token_weights: Sequence[torch.Tensor] | None = None) -> PairedInputStats:
    """`passes` yields (token mask or None, a callable running the dense model, a callable
    running the compressed model) on the same batch; each forward is cut short once its
    Linear has been seen. With `dense_linear is linear` (one model: x̂ = x) the second
    callable is not used. `token_weights`: one tensor a batch, a weight per token position
    (the batch's shape without features), for weighted sums. Raises on NaN/Inf or when a
    Linear saw nothing."""
    n = linear.in_features
    zeros = lambda *s: torch.zeros(s, dtype=torch.float64, device=linear.weight.device)  # noqa: E731
    stats = PairedInputStats(0, zeros(n), zeros(n), zeros(n, n), zeros(n, n),
                             None if token_weights is None else 0.0)
    same = dense_linear is linear
    seen = {}

    def grab(*keys):
        def hook(module, args, output):
            seen.update(dict.fromkeys(keys, args[0].detach()))
            raise StopForward
        return hook

    handles = [dense_linear.register_forward_hook(grab("dense", "compressed") if same
                                                  else grab("dense"))]
    if not same:
        handles.append(linear.register_forward_hook(grab("compressed")))
    try:
        for batch, (mask, run_dense, run) in enumerate(tqdm(passes, desc=desc, leave=False)):
            seen.clear()
            for forward in (run_dense,) if same else (run_dense, run):
                try:
                    forward()
                except StopForward:
                    pass
            if len(seen) != 2:
                raise ValueError(f"calibration did not reach {name!r} in both the dense and "
                                 f"the compressed model")
            x = _real_tokens(seen["dense"], mask).double()
            x_hat = _real_tokens(seen["compressed"], mask).double()
            if x.shape != x_hat.shape:
                raise ValueError(f"{name!r} saw inputs of shape {tuple(x.shape)} in the dense "
                                 f"model but {tuple(x_hat.shape)} in the compressed one")
            stats.tokens += x.shape[0]
            weighted = x_hat
            if token_weights is not None:
                positions = seen["dense"].shape[:-1]
                if token_weights[batch].shape != positions:
                    raise ValueError(f"token_weights[{batch}] has shape "
                                     f"{tuple(token_weights[batch].shape)} but {name!r} saw "
                                     f"inputs at {tuple(positions)} positions")
                weights = _real_tokens(token_weights[batch][..., None], mask).double()
                stats.weight += float(weights.sum())
                weighted = weights * x_hat
            stats.sum += weighted.sum(0)
            stats.dense_sum += (x if token_weights is None else weights * x).sum(0)
            stats.gram += x_hat.T @ weighted
            stats.cross += x.T @ weighted
    finally:
        for handle in handles:
            handle.remove()
    for field in ("sum", "dense_sum", "gram", "cross"):
        if not torch.isfinite(getattr(stats, field)).all():
            raise ValueError(f"calibration statistics of {name!r} hold NaN or Inf in {field}: "
                             f"check the model's weights and the calibration inputs")
    if stats.tokens == 0:
        raise ValueError(f"calibration never reached {name!r}: no tokens were recorded")
    return stats


def is_causal_lm(model: nn.Module) -> bool:
    from transformers import GenerationMixin
    return isinstance(model, GenerationMixin) and hasattr(model, "get_output_embeddings") and \
        model.get_output_embeddings() is not None


ENCODER_TARGETS = ("tokens", "pooled")


def check_encoder_target(model: nn.Module, encoder_target: str) -> None:
    if encoder_target not in ENCODER_TARGETS:
        raise ValueError(f"encoder_target must be one of {ENCODER_TARGETS}, got "
                         f"{encoder_target!r}")
    if encoder_target == "pooled" and is_causal_lm(model):
        raise ValueError("encoder_target='pooled' is for sentence encoders; a causal LM is "
                         "calibrated on its next-token loss")


def calibration_loss(model: nn.Module, batch: dict, generator: torch.Generator,
                     encoder_target: str = "tokens") -> torch.Tensor:
    """Next-token cross-entropy for causal LMs. For encoders, distillation to the dense
    model's own outputs with targets sampled around them (y ~ N(h, σ²)): at the dense point a
    plain MSE to itself has zero gradient, while the sampled-target loss gives gradients whose
    magnitudes follow the output Fisher information — what first-order importance needs.
    `encoder_target` picks the output distilled: every token's last hidden state ("tokens"),
    or the normalised mean-pooled sentence embedding that similarity search and STS read
    ("pooled"), so that errors which do not move that embedding cost nothing."""
    if is_causal_lm(model):
        labels = batch["input_ids"].clone()
        mask = token_mask(batch)
        if mask is not None:
            labels[~mask] = -100
        return model(**batch, labels=labels).loss
    hidden = model(**batch).last_hidden_state
    mask = token_mask(batch)
    if encoder_target == "pooled":
        return sampled_target_loss(
            torch.nn.functional.normalize(mean_pool(hidden, mask), dim=-1), generator)
    return sampled_target_loss(_real_tokens(hidden, mask), generator)


def sampled_target_loss(output: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """½‖output − y‖² per row, averaged, with targets y ~ N(output, σ²) (σ: the output's own
    spread) drawn from `generator` on the CPU, so that the draws do not depend on the device."""
    noise = torch.randn(output.shape, generator=generator, dtype=output.dtype,
                        device="cpu").to(output.device) * output.detach().std()
    return 0.5 * ((output - (output.detach() + noise)) ** 2).sum(-1).mean()


@contextmanager
def _gradients_for(model: nn.Module, params: Iterable[nn.Parameter]):
    """Eval mode (dropout off: the statistics are those of the deployed model) with gradients
    only for `params`; the flags and the mode are restored afterwards."""
    was_training = model.training
    model.eval()
    requires = {name: p.requires_grad for name, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
        p.grad = None
    try:
        yield
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(requires[name])
            p.grad = None
        model.train(was_training)


def _backward(loss: torch.Tensor) -> None:
    if not torch.isfinite(loss):
        raise ValueError("the calibration loss is NaN or Inf: cannot take its gradient")
    loss.backward()


def _calibration_backward(model: nn.Module, batch: dict, generator: torch.Generator,
                          encoder_target: str = "tokens") -> None:
    _backward(calibration_loss(model, batch, generator, encoder_target))


def _mean_weight_gradient(owner: nn.Module, targets: dict[str, nn.Linear], items: Iterable,
                          backward, desc: str) -> dict[str, torch.Tensor]:
    """Mean over `items` of |W ⊙ ∂L/∂W| per target, `backward(item)` running L's backward
    with gradients for the targets' weights only (all other parameters of `owner` frozen)."""
    sums = {name: torch.zeros_like(linear.weight, dtype=torch.float64)
            for name, linear in targets.items()}
    count = 0
    with _gradients_for(owner, [linear.weight for linear in targets.values()]):
        for item in tqdm(items, desc=desc, leave=False):
            backward(item)
            for name, linear in targets.items():
                sums[name] += (linear.weight.detach().double() * linear.weight.grad.double()).abs()
                linear.weight.grad = None
            count += 1
    if count == 0:
        raise ValueError("calib held no batches: cannot score importance")
    return {name: total / count for name, total in sums.items()}


def first_order_importance(model: nn.Module, targets: dict[str, nn.Linear],
                           batches: Iterable[dict], *, seed: int = 0,
                           desc: str = "importance") -> dict[str, torch.Tensor]:
    """Mean over batches of |W ⊙ ∂L/∂W| for each target (fp64, on the weight's device), the
    first-order (movement-style) estimate of the loss change from zeroing each entry; L is the
    whole model's `calibration_loss`."""
    device = model_device(model)
    generator = torch.Generator().manual_seed(seed)
    return _mean_weight_gradient(
        model, targets, batches,
        lambda batch: _calibration_backward(model, to_device(batch, device), generator), desc)


def block_output_importance(block: nn.Module, targets: dict[str, nn.Linear], inputs: list[tuple],
                            *, seed: int = 0, desc: str = "block importance"
                            ) -> dict[str, torch.Tensor]:
    """`first_order_importance` of targets inside `block`, with L the block's own output
    distilled to itself (`sampled_target_loss` over its real tokens) on its cached inputs
    (token mask, args, kwargs), as `capture_block_inputs` gives them: a score that needs one
    block and its inputs, not the whole model — what block-by-block streaming can compute."""
    generator = torch.Generator().manual_seed(seed)

    def backward(entry):
        mask, args, kwargs = entry
        output = block(*args, **kwargs)
        output = output[0] if isinstance(output, (tuple, list)) else output
        _backward(sampled_target_loss(_real_tokens(output, mask), generator))

    return _mean_weight_gradient(block, targets, inputs, backward, desc)


def output_fisher(model: nn.Module, targets: dict[str, nn.Linear], batches: Iterable[dict], *,
                  seed: int = 0, desc: str = "output fisher",
                  encoder_target: str = "tokens") -> dict[str, torch.Tensor]:
    """E[ggᵀ] (m×m, fp64) of each target's output gradient g = ∂L/∂y per real token, with L
    the `calibration_loss` summed over tokens. This is the Fisher (Gauss–Newton) metric of the
    Linear's outputs: a small change Δy of one token's output costs about ½·ΔyᵀE[ggᵀ]Δy of
    loss — what the output side of a layer's approximation error should be weighed by.
    `encoder_target`: see `calibration_loss`."""
    check_encoder_target(model, encoder_target)
    device = model_device(model)
    generator = torch.Generator().manual_seed(seed)
    sums = {name: torch.zeros(linear.out_features, linear.out_features, dtype=torch.float64,
                              device=linear.weight.device) for name, linear in targets.items()}
    tokens, mask = 0, None

    def keep_gradient(name):
        def forward_hook(module, args, output):
            def gradient_hook(grad):
                # the loss is a mean over the real tokens (over the sentences, pooled): undo it
                g = _real_tokens(grad.detach(), mask).double() * averaged_over
                sums[name].add_(g.T @ g)
            output.register_hook(gradient_hook)
        return forward_hook

    handles = [linear.register_forward_hook(keep_gradient(name))
               for name, linear in targets.items()]
    try:
        with _gradients_for(model, [linear.weight for linear in targets.values()]):
            for batch in tqdm(batches, desc=desc, leave=False):
                batch = to_device(batch, device)
                mask = token_mask(batch)
                count = int(mask.sum()) if mask is not None else batch["input_ids"].numel()
                averaged_over = batch["input_ids"].shape[0] if encoder_target == "pooled" \
                    else count
                _calibration_backward(model, batch, generator, encoder_target)
                tokens += count
    finally:
        for handle in handles:
            handle.remove()
    if tokens == 0:
        raise ValueError("calib held no batches: cannot estimate the output Fisher")
    for name, total in sums.items():
        if not torch.isfinite(total).all():
            raise ValueError(f"the output gradients of {name!r} hold NaN or Inf")
    return {name: total / tokens for name, total in sums.items()}
