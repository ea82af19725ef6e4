"""`prepare_for_inference`: a compressed model frozen, links folded, outputs kept."""

import pytest
import torch
from model_configs import model_outputs, sample_inputs, tiny_model

from curkernels import CURLinear
from curkernels.nn import find_linears, prepare_for_inference, swap_linears


def _compressed_llama() -> torch.nn.Module:
    model = tiny_model("llama")
    targets = find_linears(model, ["q_proj", "gate_proj", "down_proj"])
    generator = torch.Generator().manual_seed(3)

    def factor(name: str, linear: torch.nn.Linear) -> torch.nn.Module:
        m, n = linear.weight.shape
        if name.endswith("down_proj"):
            return CURLinear.from_linear(linear, 6, link=False)  # two factors
        rank = 5
        # a full link on q, a diagonal one on gate: prepare folds both
        U = (torch.randn(rank, rank, generator=generator) if name.endswith("q_proj")
             else torch.rand(rank, generator=generator) + 0.5)
        return CURLinear(torch.randn(m, rank, generator=generator) * 0.3, U,
                         torch.randn(rank, n, generator=generator) * 0.3)

    swap_linears(model, targets, factor)
    return model.train()


def test_folds_every_link_and_freezes_the_model():
    model = _compressed_llama()
    inputs = sample_inputs()
    before = model_outputs(model.eval(), inputs)
    model.train()
    assert prepare_for_inference(model) is model
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    cur = [m for m in model.modules() if isinstance(m, CURLinear)]
    assert len(cur) == 6 and all(m.U is None for m in cur)
    torch.testing.assert_close(model_outputs(model, inputs), before, rtol=1e-4, atol=1e-4)


def test_fold_false_keeps_links():
    model = prepare_for_inference(_compressed_llama(), fold=False)
    assert not any(p.requires_grad for p in model.parameters())
    linked = [m for m in model.modules() if isinstance(m, CURLinear) and m.U is not None]
    assert len(linked) == 4


def test_rejects_what_is_not_a_module():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        prepare_for_inference({"weight": torch.zeros(2, 2)})
