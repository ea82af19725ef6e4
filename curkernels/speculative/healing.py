"""`heal_draft`: train a draft's own small tensors toward the target's next-token distribution.

Speculative decoding accepts a drafted token as often as the draft's distribution agrees
with the target's, so the loss is KL(target ‖ draft) on the next-token logits at every real
token — over the draft head's token subset when it has one (it cannot put mass elsewhere).
Only the draft's own tensors learn — by default what each module names `healable` (a CUR
module's U, a pair-wise draft's refit weights), or the CUR factors named in `trainable`; the
shared tensors are frozen parameters of the draft, so the target's weights never change. The best training text
is the target's own greedy continuations (bench/speculative.py's `on_policy_batches`): exactly
what the draft must predict during greedy speculative decoding.
"""


import torch
import torch.nn.functional as F
from torch import nn

from ..compress.calibration import model_device, to_device, token_mask
from ..compress.calibration_sources import as_batches
from ..compress.healing import factor_parameters_named, healable_parameters, run_training
from .assembly import draft_spec


def draft_kl(draft: nn.Module, model: nn.Module, batch: dict,
             token_ids: torch.Tensor | None) -> torch.Tensor:
    """Mean over real tokens of KL(target ‖ draft) of the next-token distributions."""
    with torch.no_grad():
        target = model(**batch).logits.float()
    logits = draft(**batch).logits.float()
    if token_ids is not None:
        target, logits = target[..., token_ids], logits[..., token_ids]
    kl = F.kl_div(F.log_softmax(logits, -1), F.log_softmax(target, -1), log_target=True,
                  reduction="none").sum(-1)
    mask = token_mask(batch)
    return kl[mask].mean() if mask is not None else kl.mean()


def heal_draft(draft: nn.Module, model: nn.Module, texts, *, tokenizer=None, steps: int = 100,
               lr: float = 1e-3, trainable: tuple[str, ...] | None = None, seq_len: int = 256,
               batch_size: int = 8) -> list[float]:
    """Distil `draft` toward `model` (its target) on `texts` (strings with `tokenizer=`, or
    input dicts): AdamW with cosine decay on the draft's `trainable` CUR factors (of C, U), or
    when None on what its modules name healable (U; a pair-wise draft's refit weights and
    biases). Returns the loss of every step."""
    spec = draft_spec(draft)
    if steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps}")
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr}")
    if trainable is not None and "R" in trainable:
        raise ValueError("trainable cannot name 'R': a draft's rows are the target's own weight")
    batches = as_batches(texts, tokenizer, seq_len=seq_len, batch_size=batch_size)
    params = (healable_parameters(draft) if trainable is None
              else factor_parameters_named(draft, trainable))
    flags = {p: p.requires_grad for p in draft.parameters()}
    for p in draft.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    device = model_device(draft)
    token_ids = spec.head_token_ids
    token_ids = None if token_ids is None else token_ids.to(device)
    try:
        return run_training(
            params, list(batches),
            lambda batch: draft_kl(draft, model, to_device(batch, device), token_ids),
            steps, lr, desc="healing draft")
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
