"""Healing causal LMs: distillation on the dense model's next-token distribution, training
only the compressed modules' small tensors."""

import copy

import pytest
import torch
from torch import nn

import curkernels as ck
from curkernels import NarrowLinear
from curkernels.compress.healing import distillation_loss, healable_parameters, next_token_kl


def kl_by_hand(student_logits, teacher_logits, mask):
    """Mean over real tokens of Σ_v p_t(v)·(log p_t(v) − log p_s(v))."""
    total, count = 0.0, 0
    for b in range(mask.shape[0]):
        for t in range(mask.shape[1]):
            if mask[b, t]:
                p = torch.softmax(teacher_logits[b, t].double(), -1)
                q = torch.softmax(student_logits[b, t].double(), -1)
                total += float((p * (p.log() - q.log())).sum())
                count += 1
    return total / count


def test_next_token_kl_matches_the_hand_computation():
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 5, 11, generator=g), torch.randn(2, 5, 11, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]).bool()
    assert float(next_token_kl(student, teacher, mask)) == pytest.approx(
        kl_by_hand(student, teacher, mask), rel=1e-5)
    assert float(next_token_kl(teacher, teacher, mask)) == pytest.approx(0, abs=1e-6)
    scaled = kl_by_hand(student / 2, teacher / 2, mask) * 4
    assert float(next_token_kl(student, teacher, mask, temperature=2.0)) == pytest.approx(
        scaled, rel=1e-5)


def test_heal_distils_the_next_token_distribution_into_the_small_tensors(tiny_llama, batches):
    dense = tiny_llama
    teacher_state = {n: p.detach().clone() for n, p in dense.state_dict().items()}
    model = copy.deepcopy(dense)
    ck.compress(model, "svdllm", 0.4, batches)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        first = kl_by_hand(model(**batches[0]).logits, dense(**batches[0]).logits,
                           batches[0]["attention_mask"].bool())
    # no trainable= and no loss weights: both factors (C, R) learn, on KL to the teacher alone
    losses = ck.heal(model, dense, batches, steps=15, lr=3e-3)
    assert losses[0] == pytest.approx(first, rel=1e-4)
    assert sum(losses[-3:]) < 0.7 * sum(losses[:3]), losses
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved and all(n.endswith((".C", ".R")) for n in moved), sorted(moved)
    assert {n for n in before if n.endswith((".C", ".R"))} == moved
    assert all(torch.equal(p, teacher_state[n]) for n, p in dense.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())  # flags restored


def test_heal_trains_u_of_cur_modules_by_default(tiny_llama, batches):
    model = copy.deepcopy(tiny_llama)
    ck.compress(model, "curing", 0.5, batches, targets=["gate_proj", "up_proj"],
                layers=[1, 2])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ck.heal(model, tiny_llama, batches, steps=3, lr=1e-2)
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved == {n for n in before if n.endswith(".U")} and len(moved) == 4


def test_heal_can_add_the_hidden_state_mse(tiny_llama, batches):
    model = copy.deepcopy(tiny_llama)
    ck.compress(model, "svd", 0.5)
    with torch.no_grad():
        kl = distillation_loss(model, tiny_llama, batches[0], ce_weight=0.0, mse_weight=0.0,
                               kl_weight=1.0)
        mse = distillation_loss(model, tiny_llama, batches[0], ce_weight=0.0, mse_weight=1.0)
    losses = ck.heal(model, tiny_llama, batches, steps=1, lr=1e-9, mse_weight=0.5)
    assert kl > 0 and mse > 0
    assert losses[0] == pytest.approx(float(kl + 0.5 * mse), rel=1e-4)


@pytest.mark.parametrize("kwargs, match", [
    ({"kl_weight": 0.0}, "all 0"),
    ({"temperature": 0.0}, "temperature"),
    ({"kl_weight": float("inf")}, "kl_weight"),
])
def test_heal_bad_causal_weights(tiny_llama, batches, kwargs, match):
    model = copy.deepcopy(tiny_llama)
    ck.compress(model, "svd", 0.5)
    with pytest.raises(ValueError, match=match):
        ck.heal(model, tiny_llama, batches, steps=1, **kwargs)


def test_kl_needs_a_causal_lm(tiny_bert, batches):
    model = copy.deepcopy(tiny_bert)
    ck.compress(model, "svd", 0.5)
    with pytest.raises(ValueError, match="kl_weight=1.0 needs a causal LM"):
        ck.heal(model, tiny_bert, batches, steps=1, kl_weight=1.0)


def test_heal_trains_the_refit_partners_of_the_default_pairwise(tiny_llama, batches):
    dense = tiny_llama
    model = copy.deepcopy(dense)
    ck.compress(model, keep=0.5, calib=batches)  # the decoder default: pairwise, NarrowLinear
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    def kl_to_dense():
        with torch.no_grad():
            return sum(kl_by_hand(model(**b).logits, dense(**b).logits,
                                  b["attention_mask"].bool()) for b in batches)

    first = kl_to_dense()
    losses = ck.heal(model, dense, batches, steps=15, lr=1e-3)
    assert kl_to_dense() < 0.7 * first, (first, losses)
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    # only the matrices refit on the narrowed inputs learn; q/k/v/gate/up stay dense rows
    partners = {n for n in before if n.endswith(("o_proj.weight", "down_proj.weight"))}
    assert moved == partners and len(partners) == 2 * len(model.model.layers)
    for layer, dense_layer in zip(model.model.layers, dense.model.layers, strict=True):
        for local in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                      "mlp.gate_proj", "mlp.up_proj"):
            narrow = layer.get_submodule(local)
            assert torch.equal(narrow.weight,
                               dense_layer.get_submodule(local).weight[narrow.row_indices])


def test_a_narrow_layer_heals_its_weight_and_bias_only_where_it_reads_kept_inputs():
    g = torch.Generator().manual_seed(0)
    kept = [0, 2, 5]
    rows = NarrowLinear(torch.randn(3, 8, generator=g), torch.randn(3, generator=g),
                        out_features=6, in_features=8, rows=kept, scatter_rows=True)
    partner = NarrowLinear(torch.randn(4, 3, generator=g), torch.randn(4, generator=g),
                           out_features=4, in_features=6, cols=kept, gather_cols=True)
    trained = healable_parameters(nn.Sequential(rows, partner))
    assert [id(p) for p in trained] == [id(partner.weight), id(partner.bias)]
    with pytest.raises(ValueError, match="healable"):
        healable_parameters(nn.Sequential(rows))


def test_heal_calls_before_step_ahead_of_each_steps_forward(tiny_llama, batches):
    model = copy.deepcopy(tiny_llama)
    ck.compress(model, "svdllm", 0.5, batches)
    events = []
    model.register_forward_pre_hook(lambda module, args: events.append("forward"))
    ck.heal(model, tiny_llama, batches, steps=3, lr=1e-3, before_step=events.append)
    assert events == [0, "forward", 1, "forward", 2, "forward"]
