"""Pair-wise drafts: the compression default's structure on the target's own weights — kept
rows read in place, refit weights the draft's own — their delta checkpoints and healing."""

import copy

import pytest
import torch
from speculative_models import calibration_batches, causal_lm

import curkernels as ck
from curkernels.nn import NarrowLinear
from curkernels.speculative.delta import WEIGHTS_FILE


def storage(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


def narrow_modules(model) -> dict[str, NarrowLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, NarrowLinear)}


@pytest.mark.parametrize("architecture", ["llama", "qwen2"])
def test_pairwise_draft_computes_what_pairwise_compression_computes(architecture):
    model = causal_lm(architecture, block_rank=None)
    batches = calibration_batches(count=2)
    draft = ck.make_draft(model, "pairwise", keep=0.6, calib=batches)
    compressed = copy.deepcopy(model)
    ck.compress(compressed, "pairwise", keep=0.6, calib=batches)
    ids = calibration_batches(count=1, seed=9)[0]["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(draft(ids).logits, compressed(ids).logits,
                                   atol=1e-5, rtol=1e-5)
    kinds = narrow_modules(draft)
    assert len(kinds) == 3 * 7  # q, k, v, o, gate, up, down in every block
    for name, module in kinds.items():
        reference = compressed.get_submodule(name)
        assert torch.equal(module.row_indices if module.gather_rows else module.col_indices,
                           reference.row_indices if module.gather_rows
                           else reference.col_indices), name


@pytest.mark.parametrize("architecture", ["llama", "qwen2"])
def test_pairwise_draft_reads_kept_rows_in_place_and_owns_only_refits(architecture):
    model = causal_lm(architecture, block_rank=None)
    draft = ck.make_draft(model, "pairwise", keep=0.5, calib=calibration_batches(count=1),
                          skip_layers=[1])
    target_storages = {storage(p) for p in model.parameters()}
    modules = narrow_modules(draft)
    owned = {id(p) for m in modules.values() if not m.gather_rows for p in m.parameters()}
    assert owned, "the refits are the draft's own"
    for name, p in draft.named_parameters():
        assert (id(p) in owned) != (storage(p) in target_storages), name
    # draft block 1 is target block 2: its gate rows are the target's gate weight
    gate = draft.model.layers[1].mlp.gate_proj
    assert isinstance(gate, NarrowLinear) and gate.gather_rows
    assert storage(gate.weight) == storage(model.model.layers[2].mlp.gate_proj.weight)
    if architecture == "qwen2":  # q/k/v biases: the kept entries of the target's bias
        q = draft.model.layers[0].self_attn.q_proj
        assert storage(q.bias) == storage(model.model.layers[0].self_attn.q_proj.bias)
    down = draft.model.layers[1].mlp.down_proj
    assert not down.gather_rows and down.weight.shape[1] == len(down.col_indices)
    assert down.weight.shape[1] < model.config.intermediate_size
    assert all(type(m) is torch.nn.Linear for m in model.model.layers[0].modules()
               if isinstance(m, (torch.nn.Linear, NarrowLinear)))


def test_pairwise_delta_checkpoint_stores_indices_and_refits_only(tmp_path):
    model = causal_lm("qwen2", block_rank=None)
    batches = calibration_batches(count=1)
    draft = ck.make_draft(model, "pairwise", keep=0.5, calib=batches, head_tokens=40)
    ck.heal_draft(draft, model, batches, steps=2, lr=1e-2)  # the refits move
    out = ck.save_draft(draft, tmp_path / "draft")
    loaded = ck.load_draft(out, target=model)
    ids = calibration_batches(count=1, seed=4)[0]["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, draft(ids).logits)
    for name, module in narrow_modules(loaded).items():
        original = draft.get_submodule(name)
        assert module.gather_rows == original.gather_rows, name
        if module.gather_rows:
            assert storage(module.weight) == storage(original.weight), name
    from safetensors.torch import load_file
    saved = load_file(str(out / WEIGHTS_FILE))
    own = sum(p.numel() for m in narrow_modules(draft).values() if not m.gather_rows
              for p in m.parameters())
    assert sum(t.numel() for k, t in saved.items() if t.is_floating_point()) == own
    assert not any(k.endswith("gate_proj.weight") for k in saved)


def test_heal_draft_trains_the_refits_only():
    model = causal_lm("llama", block_rank=None)
    batches = calibration_batches(count=1)
    draft = ck.make_draft(model, "pairwise", keep=0.4, calib=batches)
    before = {name: p.detach().clone() for name, p in model.state_dict().items()}
    down = draft.model.layers[0].mlp.down_proj
    refit = down.weight.detach().clone()
    losses = ck.heal_draft(draft, model, batches, steps=20, lr=1e-2)
    assert len(losses) == 20 and losses[-1] < 0.9 * losses[0]
    for name, p in model.state_dict().items():
        assert torch.equal(p, before[name]), name
    assert not torch.equal(down.weight, refit)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("kwargs, message", [
    ({"keep": {"mlp.*": 0.5}}, "keep must be a number"),
    ({"max_rank": 8}, "CURing's options"),
    ({"calib": None}, "pass calib="),
])
def test_pairwise_draft_refuses_curs_options(kwargs, message):
    options = {"keep": 0.5, "calib": calibration_batches(count=1), **kwargs}
    with pytest.raises(ValueError, match=message):
        ck.make_draft(causal_lm("llama"), "pairwise", **options)


def test_shared_rows_narrow_linear_matches_the_copied_rows():
    torch.manual_seed(0)
    dense = torch.nn.Linear(13, 11)
    rows = torch.tensor([0, 3, 4, 10])
    shared = NarrowLinear(dense.weight, dense.bias, out_features=11, in_features=13, rows=rows,
                          scatter_rows=True, gather_rows=True)
    copied = NarrowLinear(dense.weight.detach()[rows], dense.bias.detach()[rows],
                          out_features=11, in_features=13, rows=rows, scatter_rows=True)
    x = torch.randn(2, 5, 13)
    torch.testing.assert_close(shared(x), copied(x))
    assert storage(shared.weight) == storage(dense.weight)
    assert shared.factor_parameters == copied.factor_parameters == 4 * 13
    assert shared.healable == ()
    with pytest.raises(ValueError, match="needs rows"):
        NarrowLinear(dense.weight, None, out_features=11, in_features=13, gather_rows=True)
    with pytest.raises(ValueError, match="out_features=11 rows"):
        NarrowLinear(dense.weight[:5], None, out_features=11, in_features=13, rows=rows[:2],
                     gather_rows=True)
    with pytest.raises(TypeError, match="save_draft"):
        ck.checkpoint.module_specs.module_spec(shared)
