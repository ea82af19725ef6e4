import copy

import pytest
import torch

import curkernels as ck


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


def test_heal_needs_factored_model(tiny_bert, batches):
    with pytest.raises(ValueError, match="trainable"):
        ck.heal(tiny_bert, copy.deepcopy(tiny_bert), batches, steps=1)


def test_heal_bad_steps(tiny_bert, batches):
    dense = copy.deepcopy(tiny_bert)
    ck.compress(tiny_bert, "curing", 0.5, batches)
    with pytest.raises(ValueError, match="steps"):
        ck.heal(tiny_bert, dense, batches, steps=0)
