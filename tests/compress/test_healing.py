import copy

import pytest
import torch

import curkernels as ck
from curkernels.compress.calibration import mean_pool
from curkernels.compress.healing import distillation_loss, pooled_cosine_distance


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_bert"])
def test_healing_trains_only_u_and_lowers_loss(fixture, batches, request):
    dense = request.getfixturevalue(fixture)
    model = copy.deepcopy(dense)
    report = ck.compress(model, "curing", 0.4, batches, layers=[1, 2, 3] if fixture ==
                         "tiny_llama" else None)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not n.endswith(".U")}
    us = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith(".U")}
    assert len(us) == len(report.modules)
    losses = ck.heal(model, dense, batches, steps=12, lr=3e-3)
    assert len(losses) == 12 and sum(losses[-3:]) < sum(losses[:3])
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    assert any(not torch.equal(dict(model.named_parameters())[n], u) for n, u in us.items())


def test_heal_can_also_train_the_norms(tiny_bert, batches):
    """train_norms adds the LayerNorm weights and biases to the factors; nothing else moves."""
    dense = copy.deepcopy(tiny_bert)
    ck.compress(tiny_bert, "svd", 0.5, batches)
    before = {n: p.detach().clone() for n, p in tiny_bert.named_parameters()}
    flags = [p.requires_grad for p in tiny_bert.parameters()]
    ck.heal(tiny_bert, dense, batches, steps=4, lr=1e-2, trainable=("C", "R"), train_norms=True)
    moved = {n for n, p in tiny_bert.named_parameters() if not torch.equal(p, before[n])}
    norms = {n for n in before if "LayerNorm" in n}
    assert norms and norms <= moved
    assert all(n.endswith((".C", ".R")) or n in norms for n in moved), sorted(moved)
    assert [p.requires_grad for p in tiny_bert.parameters()] == flags  # restored afterwards


def test_heal_needs_factored_model(tiny_bert, batches):
    with pytest.raises(ValueError, match="trainable"):
        ck.heal(tiny_bert, copy.deepcopy(tiny_bert), batches, steps=1)


def test_heal_bad_steps(tiny_bert, batches):
    dense = copy.deepcopy(tiny_bert)
    ck.compress(tiny_bert, "curing", 0.5, batches)
    with pytest.raises(ValueError, match="steps"):
        ck.heal(tiny_bert, dense, batches, steps=0)


def pooled_distance(model, teacher, batches):
    """Mean over batches of 1 − cos of the mask-aware mean-pooled last hidden states."""
    with torch.no_grad():
        return sum(pooled_cosine_distance(model(**b).last_hidden_state,
                                          teacher(**b).last_hidden_state,
                                          b["attention_mask"].bool())
                   for b in batches).item() / len(batches)


def test_mean_pool_and_cosine_distance_ignore_padding():
    g = torch.Generator().manual_seed(0)
    h, t = torch.randn(2, 5, 8, generator=g), torch.randn(2, 5, 8, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]).bool()
    pooled = mean_pool(h, mask)
    assert torch.allclose(pooled[1], h[1, :3].mean(0)) and torch.allclose(pooled[0], h[0].mean(0))
    assert torch.allclose(mean_pool(h, None), h.mean(1))
    assert pooled_cosine_distance(h, h, mask).abs() < 1e-6
    noisy = h.clone()
    noisy[1, 3:] += 100.0  # pad positions: must not count
    distance = pooled_cosine_distance(h, t, mask)
    assert torch.allclose(pooled_cosine_distance(noisy, t, mask), distance)
    expected = 1 - torch.nn.functional.cosine_similarity(mean_pool(h, mask), mean_pool(t, mask))
    assert torch.allclose(distance, expected.mean())


def test_distillation_loss_adds_pooled_term(tiny_bert, batches):
    dense = copy.deepcopy(tiny_bert)
    ck.compress(tiny_bert, "svd", 0.5, batches)
    batch = batches[-1]  # the padded one
    with torch.no_grad():
        base = distillation_loss(tiny_bert, dense, batch)
        both = distillation_loss(tiny_bert, dense, batch, pooled_weight=2.0)
        pooled = distillation_loss(tiny_bert, dense, batch, mse_weight=0.0, pooled_weight=1.0)
        expected = pooled_cosine_distance(tiny_bert(**batch).last_hidden_state,
                                          dense(**batch).last_hidden_state,
                                          batch["attention_mask"].bool())
    assert torch.allclose(pooled, expected) and pooled > 0
    assert torch.allclose(both, base + 2.0 * expected)


def test_pooled_objective_improves_pooled_cosine(tiny_bert, batches):
    dense = copy.deepcopy(tiny_bert)
    ck.compress(tiny_bert, "svd", 0.4, batches)
    before_model = copy.deepcopy(tiny_bert)
    before = pooled_distance(tiny_bert, dense, batches)
    losses = ck.heal(tiny_bert, dense, batches, steps=9, lr=3e-3, trainable=("C", "R"),
                     mse_weight=0.0, pooled_weight=1.0)
    # with the MSE off, the first step's loss is the pooled cosine distance of the first batch
    assert abs(losses[0] - pooled_distance(before_model, dense, batches[:1])) < 1e-5
    after = pooled_distance(tiny_bert, dense, batches)
    assert after < 0.7 * before, (before, after)


@pytest.mark.parametrize("kwargs, match", [
    ({"pooled_weight": -1.0}, "pooled_weight"),
    ({"pooled_weight": float("nan")}, "pooled_weight"),
    ({"mse_weight": -0.5}, "mse_weight"),
    ({"mse_weight": 0.0, "pooled_weight": 0.0}, "both 0"),
])
def test_heal_bad_weights(tiny_bert, batches, kwargs, match):
    dense = copy.deepcopy(tiny_bert)
    ck.compress(tiny_bert, "svd", 0.5, batches)
    flags = [p.requires_grad for p in tiny_bert.parameters()]
    weights = [p.detach().clone() for p in tiny_bert.parameters()]
    with pytest.raises(ValueError, match=match):
        ck.heal(tiny_bert, dense, batches, steps=2, trainable=("C", "R"), **kwargs)
    assert flags == [p.requires_grad for p in tiny_bert.parameters()]
    assert all(torch.equal(p, w) for p, w in zip(tiny_bert.parameters(), weights, strict=True))
