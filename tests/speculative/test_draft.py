"""make_draft: a draft that reads the target's tensors in place, its options and its errors;
heal_draft: training the draft's own factors only."""

import pytest
import torch
from speculative_models import LOW_RANK, calibration_batches, causal_lm

import curkernels as ck
from curkernels.nn import CURLinear
from curkernels.speculative.head import FrequentTokenHead


def storage(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


@pytest.mark.parametrize("architecture", ["llama", "qwen2"])
def test_draft_reads_the_targets_tensors_in_place(architecture):
    model = causal_lm(architecture)
    draft = ck.make_draft(model, keep=0.5, calib=calibration_batches(count=1), skip_layers=[1],
                          head_tokens=40)
    target_storages = {storage(p) for p in model.parameters()}
    owned = {id(p) for m in draft.modules() if isinstance(m, CURLinear) for p in (m.C, m.U)}
    for name, p in draft.named_parameters():
        assert (id(p) in owned) != (storage(p) in target_storages), name
    # the draft's block 1 is the target's block 2: its rows are the target's q weight
    q = draft.model.layers[1].self_attn.q_proj
    assert isinstance(q, CURLinear) and q.gather
    assert storage(q.R) == storage(model.model.layers[2].self_attn.q_proj.weight)
    assert storage(draft.model.embed_tokens.weight) == storage(model.model.embed_tokens.weight)
    assert storage(draft.lm_head.weight) == storage(model.lm_head.weight)
    assert (storage(draft.model.layers[0].input_layernorm.weight)
            == storage(model.model.layers[0].input_layernorm.weight))
    assert len(draft.model.layers) == 2 and draft.config.num_hidden_layers == 2
    assert model.config.num_hidden_layers == 3  # the target is untouched
    assert all(type(m) is torch.nn.Linear for m in model.model.layers[0].modules()
               if isinstance(m, (torch.nn.Linear, CURLinear)))


def test_draft_owns_only_its_factors_and_reproduces_low_rank_layers():
    model = causal_lm("llama")  # block Linears of rank 6: CUR of rank 6 is exact
    draft = ck.make_draft(model, keep=0.5, calib=calibration_batches(count=1), max_rank=LOW_RANK)
    factored = [m for m in draft.modules() if isinstance(m, CURLinear)]
    assert len(factored) == 3 * 7
    for module in factored:
        owned = module.C.numel() + module.U.numel()
        assert owned < 0.5 * module.dense_parameters
    ids = calibration_batches(count=1, seed=5)[0]["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(draft(ids).logits, model(ids).logits, atol=1e-3, rtol=1e-3)


def test_frequent_token_head_scores_only_its_tokens():
    model = causal_lm("llama")
    batches = [{"input_ids": torch.tensor([[5, 5, 5, 7, 7, 9, 1, 2]]),
                "attention_mask": torch.tensor([[1, 1, 1, 1, 1, 1, 0, 0]])}]
    draft = ck.make_draft(model, keep={"q_proj": 0.5}, calib=batches, head_tokens=3)
    assert isinstance(draft.lm_head, FrequentTokenHead)
    assert draft.lm_head.token_ids.tolist() == [5, 7, 9]  # masked tokens 1, 2 not counted
    with torch.no_grad():
        logits = draft(torch.tensor([[3, 4, 5]])).logits
        dense = model.lm_head(draft.model(torch.tensor([[3, 4, 5]])).last_hidden_state)
    assert torch.isinf(logits[..., [0, 1, 2, 3, 4, 6, 8]]).all()
    torch.testing.assert_close(logits[..., [5, 7, 9]], dense[..., [5, 7, 9]])
    # only q_proj matched the keep mapping: the other Linears are the target's own
    layer = draft.model.layers[0]
    assert isinstance(layer.self_attn.q_proj, CURLinear)
    assert type(layer.self_attn.k_proj) is torch.nn.Linear


def test_skip_layers_by_angular_distance_never_drops_the_ends():
    model = causal_lm("llama", num_layers=4)
    draft = ck.make_draft(model, keep=0.8, calib=calibration_batches(count=1), skip_layers=2)
    assert draft.draft_spec.base_layers == [0, 3]
    assert len(draft.model.layers) == 2


@pytest.mark.parametrize("kwargs, message", [
    ({"method": "svd"}, "method must be one of"),
    ({"keep": 1.5}, "keep must be a fraction"),
    ({"keep": {"q_proj": 0}}, "keep must be a fraction"),
    ({"skip_layers": 1}, "pass calib="),
    ({"skip_layers": [0, 1, 2]}, "leaving at least one block"),
    ({"skip_layers": [7]}, r"indices in \[0, 3\)"),
    ({"head_tokens": 10}, "pass calib="),
    ({"head_tokens": [3, 3]}, "must not repeat"),
    ({"head_tokens": [96]}, r"must lie in \[0, 96\)"),
])
def test_bad_options_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ck.make_draft(causal_lm("llama"), **kwargs)


def test_heal_draft_trains_only_u_and_lowers_the_kl():
    model = causal_lm("llama", block_rank=None)
    batches = calibration_batches(count=1)
    draft = ck.make_draft(model, keep=0.3, calib=batches, head_tokens=60)
    before = {name: p.detach().clone() for name, p in model.state_dict().items()}
    C = draft.model.layers[0].self_attn.q_proj.C.detach().clone()
    U = draft.model.layers[0].self_attn.q_proj.U.detach().clone()
    losses = ck.heal_draft(draft, model, batches, steps=20, lr=2e-2)
    assert len(losses) == 20 and losses[-1] < 0.9 * losses[0]
    for name, p in model.state_dict().items():
        assert torch.equal(p, before[name]), name
    assert torch.equal(draft.model.layers[0].self_attn.q_proj.C, C)
    assert not torch.equal(draft.model.layers[0].self_attn.q_proj.U, U)
    assert all(p.grad is None for p in model.parameters())  # no gradient reached the target


def test_heal_draft_refuses_the_shared_rows_and_a_plain_model():
    model = causal_lm("llama")
    draft = ck.make_draft(model, keep=0.5)
    with pytest.raises(ValueError, match="cannot name 'R'"):
        ck.heal_draft(draft, model, calibration_batches(), trainable=("R",))
    with pytest.raises(TypeError, match="made by make_draft"):
        ck.heal_draft(model, model, calibration_batches())
