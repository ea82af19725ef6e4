"""on_policy_batches (bench/speculative.py): the target's own greedy continuations as draft data."""

import pytest
import torch
from bench_scripts import load_bench_script
from speculative_models import causal_lm

import curkernels as ck

on_policy_batches = load_bench_script("speculative").on_policy_batches


@torch.no_grad()
def greedy_without_cache(model, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    for _ in range(new_tokens):
        ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


def test_batches_hold_the_targets_greedy_continuations_in_prompt_order():
    model = causal_lm("llama")
    prompts = torch.randint(0, 96, (5, 6), generator=torch.Generator().manual_seed(1))
    batches = on_policy_batches(model, prompts, 10, batch_size=2)
    assert [b["input_ids"].shape for b in batches] == [(2, 16), (2, 16), (1, 16)]
    ids = torch.cat([b["input_ids"] for b in batches])
    assert torch.equal(ids, greedy_without_cache(model, prompts, 10))
    assert all(torch.equal(b["attention_mask"], torch.ones_like(b["input_ids"]))
               for b in batches)


def test_heal_draft_on_policy_trains_the_drafts_own_c_and_u_only():
    model = causal_lm("llama", block_rank=None)
    prompts = torch.randint(0, 96, (4, 8), generator=torch.Generator().manual_seed(2))
    batches = on_policy_batches(model, prompts, 24, batch_size=4)
    draft = ck.make_draft(model, keep=0.3, calib=batches, head_tokens=60)
    before = {name: p.detach().clone() for name, p in model.state_dict().items()}
    q_proj = draft.model.layers[0].self_attn.q_proj
    C, U = q_proj.C.detach().clone(), q_proj.U.detach().clone()
    losses = ck.heal_draft(draft, model, batches, steps=20, lr=2e-2, trainable=("C", "U"))
    assert losses[-1] < 0.9 * losses[0]
    assert not torch.equal(q_proj.C, C) and not torch.equal(q_proj.U, U)
    for name, p in model.state_dict().items():
        assert torch.equal(p, before[name]), name
    assert q_proj.R.untyped_storage().data_ptr() == \
        model.model.layers[0].self_attn.q_proj.weight.untyped_storage().data_ptr()


@pytest.mark.parametrize(("prompts", "kwargs", "message"), [
    (torch.zeros(3, dtype=torch.int64), {}, "prompts must be a 2-D tensor"),
    (torch.zeros(2, 3), {}, "prompts must be a 2-D tensor"),
    (torch.zeros(2, 3, dtype=torch.int64), {"new_tokens": 0}, "new_tokens must be a positive"),
    (torch.zeros(2, 3, dtype=torch.int64), {"batch_size": 0}, "batch_size must be a positive"),
])
def test_bad_inputs_are_refused(prompts, kwargs, message):
    with pytest.raises(ValueError, match=message):
        on_policy_batches(causal_lm("llama"), prompts, **{"new_tokens": 4, **kwargs})
