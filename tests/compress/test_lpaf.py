import copy

import pytest
import torch

import curkernels as ck
from curkernels.compress.lowrank import split_svd
from curkernels.compress.lpaf import prune_by_importance, weighted_low_rank, weighted_objective
from curkernels.nn import LowRankLinear


def test_weighted_svd_beats_plain_svd_on_its_objective():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(40, 30, generator=g, dtype=torch.float64)
    weights = torch.rand(40, 30, generator=g, dtype=torch.float64) ** 4 * 10 + 0.01
    plain = weighted_objective(W, weights, *split_svd(W, 6))
    sweeps = [weighted_objective(W, weights, *weighted_low_rank(W, weights, 6, sweeps=s))
              for s in (1, 4)]
    assert sweeps[0] < plain and sweeps[1] <= sweeps[0] + 1e-9
    assert sweeps[1] < 0.9 * plain


def test_uniform_weights_give_the_svd():
    W = torch.randn(20, 12, dtype=torch.float64)
    A, B = weighted_low_rank(W, torch.ones_like(W), 4, sweeps=3)
    A0, B0 = split_svd(W, 4)
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


@pytest.mark.parametrize("fixture", ["tiny_bert", "tiny_llama"])
def test_mixed_rank_finetuning_moves_factors_and_ends_full_rank(fixture, batches, request):
    model = request.getfixturevalue(fixture)
    dense = copy.deepcopy(model)
    report = ck.compress(model, "lpaf", 0.5, batches, mixed_rank_steps=6, lr=1e-3)
    modules = [model.get_submodule(m.name) for m in report.modules]
    assert all(isinstance(m, LowRankLinear) and "forward" not in vars(m) for m in modules)
    factored = copy.deepcopy(dense)
    ck.compress(factored, "lpaf", 0.5, batches)
    first = factored.get_submodule(report.modules[0].name)
    assert not torch.equal(first.A, modules[0].A)  # the fine-tuning changed the factors
    assert all(p.requires_grad for p in model.parameters())  # training flags restored


def test_mixed_rank_bad_fraction(tiny_bert, batches):
    with pytest.raises(ValueError, match="min_rank_fraction"):
        ck.compress(tiny_bert, "lpaf", 0.5, batches, mixed_rank_steps=2, min_rank_fraction=0)
