"""Finding and swapping target Linears on the architectures curkernels supports."""

import pytest
import torch
from model_configs import BLOCK_LINEARS, model_outputs, sample_inputs, tiny_model

from curkernels import CURLinear
from curkernels.nn import find_linears, name_matches, swap_linears


@pytest.mark.parametrize("pattern, name, hit", [
    ("q_proj", "model.layers.0.self_attn.q_proj", True),
    ("self_attn.q_proj", "model.layers.0.self_attn.q_proj", True),
    ("model.layers.*.mlp.*", "model.layers.3.mlp.up_proj", True),
    ("proj", "model.layers.0.self_attn.q_proj", False),
    ("mlp.*", "model.layers.0.mlp.up_proj", True),
    ("model.layers.1.*", "model.layers.10.mlp.up_proj", False),
])
def test_name_patterns(pattern, name, hit):
    assert name_matches(name, pattern) is hit


@pytest.mark.parametrize("architecture", ["llama", "mistral", "qwen2", "bert"])
def test_full_rank_swap_keeps_every_architecture_s_outputs(architecture):
    model = tiny_model(architecture)
    inputs = sample_inputs()
    before = model_outputs(model, inputs)
    targets = {name: linear for name, linear in find_linears(model).items()
               if ".layer" in name}
    assert len(targets) == 2 * BLOCK_LINEARS[architecture]
    swapped = swap_linears(model, targets, lambda _, linear: CURLinear.from_linear(
        linear, min(linear.in_features, linear.out_features)))
    assert all(isinstance(model.get_submodule(name), CURLinear) for name in swapped)
    assert not find_linears(model, list(targets))
    torch.testing.assert_close(model_outputs(model, inputs), before, rtol=1e-4, atol=1e-4)


def test_exclude_patterns():
    model = tiny_model("llama")
    found = find_linears(model, ["q_proj", "k_proj"], exclude=["model.layers.0.*"])
    assert sorted(found) == ["model.layers.1.self_attn.k_proj", "model.layers.1.self_attn.q_proj"]
