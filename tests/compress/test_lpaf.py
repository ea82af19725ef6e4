import copy

import pytest
import torch

import curkernels as ck
from curkernels.compress.calibration import block_output_importance
from curkernels.compress.lpaf import (
    mixed_rank_finetune,
    prune_by_importance,
    weighted_low_rank,
    weighted_objective,
)
from curkernels.nn import CURLinear
from curkernels.ops.factors import split_evenly, truncated_svd


def test_weighted_svd_beats_plain_svd_on_its_objective():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(40, 30, generator=g, dtype=torch.float64)
    weights = torch.rand(40, 30, generator=g, dtype=torch.float64) ** 4 * 10 + 0.01
    plain = weighted_objective(W, weights, *split_evenly(*truncated_svd(W, 6)))
    sweeps = [weighted_objective(W, weights, *weighted_low_rank(W, weights, 6, sweeps=s))
              for s in (1, 4)]
    assert sweeps[0] < plain and sweeps[1] <= sweeps[0] + 1e-9
    assert sweeps[1] < 0.9 * plain


def test_uniform_weights_give_the_svd():
    W = torch.randn(20, 12, dtype=torch.float64)
    A, B = weighted_low_rank(W, torch.ones_like(W), 4, sweeps=3)
    A0, B0 = split_evenly(*truncated_svd(W, 4))
    torch.testing.assert_close(A @ B, A0 @ B0)


def test_prune_by_importance_hits_sparsity():
    W = torch.randn(10, 10, dtype=torch.float64)
    importance = torch.arange(100, dtype=torch.float64).reshape(10, 10)
    pruned = prune_by_importance(W, importance, 0.3)
    assert int((pruned == 0).sum()) == 30 and torch.equal(pruned.flatten()[30:], W.flatten()[30:])
    with pytest.raises(ValueError, match="sparsity"):
        prune_by_importance(W, importance, 1.0)


def test_bad_weights_raise():
    with pytest.raises(ValueError, match="weights"):
        weighted_low_rank(torch.ones(3, 3), -torch.ones(3, 3), 1)


def test_mixed_rank_finetuning_moves_factors_and_ends_full_rank(tiny_bert, batches):
    dense = copy.deepcopy(tiny_bert)
    report = ck.compress(tiny_bert, "lpaf", 0.5, batches, sweeps=1)
    modules = [tiny_bert.get_submodule(m.name) for m in report.modules]
    before = [m.C.detach().clone() for m in modules]
    ranks_seen = set()
    hook = modules[0].register_forward_pre_hook(
        lambda m, args: ranks_seen.add(m.forward.args[1] if "forward" in vars(m) else None))
    losses = mixed_rank_finetune(tiny_bert, dense, modules, batches, 8, lr=1e-3,
                                 min_rank_fraction=0.25, full_rank_steps=2)
    hook.remove()
    assert len(losses) == 8
    assert len(ranks_seen) > 2 and max(ranks_seen) == modules[0].rank  # sampled, ends full
    assert min(ranks_seen) >= 0.25 * modules[0].rank
    assert all(isinstance(m, CURLinear) and m.U is None and "forward" not in vars(m)
               for m in modules)
    assert any(not torch.equal(m.C, a) for m, a in zip(modules, before, strict=True))
    assert all(p.requires_grad for p in tiny_bert.parameters())  # training flags restored


def test_lpaf_with_mixed_rank_through_compress(tiny_llama, batches):
    report = ck.compress(tiny_llama, "lpaf", 0.5, batches, sweeps=1, mixed_rank_steps=2,
                         layers=[1])
    assert len(report.modules) == 7


def test_mixed_rank_bad_fraction(tiny_bert, batches):
    with pytest.raises(ValueError, match="min_rank_fraction"):
        ck.compress(tiny_bert, "lpaf", 0.5, batches, mixed_rank_steps=2, min_rank_fraction=0)


class _LinearBlock(torch.nn.Module):
    """A block whose output is one Linear's, returned as decoder layers return it."""

    def __init__(self, linear):
        super().__init__()
        self.proj = linear

    def forward(self, hidden):
        return (self.proj(hidden),)


def test_block_output_importance_is_the_sampled_target_gradient():
    torch.manual_seed(3)
    linear = torch.nn.Linear(6, 5, bias=False)
    block = _LinearBlock(linear)
    inputs = []
    for _ in range(3):
        mask = torch.rand(2, 4) > 0.3
        inputs.append((mask, (torch.randn(2, 4, 6),), {}))
    scores = block_output_importance(block, {"proj": linear}, inputs, seed=5)

    generator = torch.Generator().manual_seed(5)
    weight = linear.weight.detach().double()
    expected = torch.zeros_like(weight)
    for mask, (hidden,), _ in inputs:
        x = hidden[mask].double()
        y = linear(hidden[mask]).detach()
        noise = (torch.randn(y.shape, generator=generator) * y.std()).double()
        # L = ½ mean_rows ‖y − (y + n)‖², so ∂L/∂W = −nᵀx / rows at the dense point
        expected += (weight * (-noise.T @ x / x.shape[0])).abs()
    torch.testing.assert_close(scores["proj"], expected / len(inputs), rtol=1e-5, atol=1e-9)
    assert linear.weight.requires_grad and linear.weight.grad is None


def test_lpaf_block_importance_through_compress(tiny_llama, batches):
    with pytest.raises(ValueError, match="'lm_head' lies outside.*importance='loss'"):
        ck.compress(tiny_llama, "lpaf", 0.5, batches, importance="block",
                    targets=["lm_head"])
    report = ck.compress(tiny_llama, "lpaf", 0.5, batches, sweeps=1, importance="block",
                         layers=[1, 3])
    assert len(report.modules) == 14
