"""Accept drafted tokens against the target's logits: greedy prefix match, or rejection
sampling (Leviathan et al. 2023; Chen et al. 2023) whose output has exactly the target's
distribution whatever the draft proposes.

Both take the k drafted tokens and the target's k + 1 next-token predictions (one per
drafted position plus one past the last) and return how many drafted tokens stand and the
token that follows them (the target's correction, or its bonus token when all k stand).
"""

import torch


def accept_greedy(drafted: torch.Tensor, target_logits: torch.Tensor) -> tuple[int, torch.Tensor]:
    """drafted (k,), target_logits (k + 1, V): the longest prefix equal to the target's argmax."""
    predicted = target_logits.argmax(dim=-1)
    matches = drafted == predicted[:drafted.numel()]
    accepted = int(matches.int().cumprod(0).sum())
    return accepted, predicted[accepted]


def accept_sampled(drafted: torch.Tensor, draft_probs: torch.Tensor, target_probs: torch.Tensor,
                   generator: torch.Generator | None = None) -> tuple[int, torch.Tensor]:
    """drafted (k,) drawn from draft_probs (k, V); target_probs (k + 1, V). Token i stands with
    probability min(1, p(t)/q(t)); the first rejected one is replaced by a draw from the
    residual max(p − q, 0), renormalised; when all stand, a bonus token is drawn from p."""
    k = drafted.numel()
    steps = torch.arange(k, device=drafted.device)
    p = target_probs[steps, drafted]
    q = draft_probs[steps, drafted]
    uniform = torch.rand(k, generator=generator, device=drafted.device)
    rejected = (uniform * q > p).nonzero()
    if rejected.numel() == 0:
        return k, torch.multinomial(target_probs[k], 1, generator=generator)[0]
    accepted = int(rejected[0])
    residual = (target_probs[accepted] - draft_probs[accepted]).clamp_min(0)
    if not residual.sum() > 0:  # p ≤ q everywhere only when p = q up to rounding
        residual = target_probs[accepted]
    return accepted, torch.multinomial(residual, 1, generator=generator)[0]
