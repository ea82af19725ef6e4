"""Pair-wise compression of decoders that normalise q and k per head (Gemma 3): q_proj and
k_proj stay dense, the budget goes to v/o and the MLP, and the attention pattern is kept."""

import copy

import pytest
import torch
from conftest import random_batches
from model_configs import tiny_model
from torch import nn
from transformers import Gemma3ForCausalLM, Gemma3TextConfig

import curkernels as ck
from curkernels import NarrowLinear
from curkernels.compress.pairwise_budget import normalises_query_key, smallest_block_keep

PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def tiny_gemma3(seed: int = 0) -> Gemma3ForCausalLM:
    """A random Gemma 3 text model (q_norm/k_norm, gelu-tanh gating, sliding and full
    attention, grouped queries) from a config alone: nothing is downloaded."""
    torch.manual_seed(seed)
    config = Gemma3TextConfig(vocab_size=96, hidden_size=48, intermediate_size=80,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                              head_dim=8, max_position_embeddings=64, sliding_window=8,
                              layer_types=["sliding_attention", "full_attention"])
    model = Gemma3ForCausalLM(config).eval()
    model.set_attn_implementation("eager")  # attention weights can be read back
    return model


def first_block_attention(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch, output_attentions=True).attentions[0]


@pytest.mark.parametrize("keep", [0.8, 0.5])
def test_default_leaves_normalised_query_key_dense_and_spends_keep_elsewhere(keep):
    model, calib = tiny_gemma3(), random_batches()
    dense = copy.deepcopy(model)
    report = ck.compress(model, keep=keep, calib=calib)
    assert report.method == "pairwise"
    assert {m.name for m in report.modules} == {
        f"model.layers.{i}.{local}" for i in range(2) for local in PROJECTIONS}
    assert (keep - 0.1) * report.params_before <= report.params_after
    assert report.params_after <= keep * report.params_before
    for layer, dense_layer in zip(model.model.layers, dense.model.layers, strict=True):
        for local in PROJECTIONS[:2]:
            kept = layer.get_submodule(local)
            assert type(kept) is nn.Linear
            assert torch.equal(kept.weight, dense_layer.get_submodule(local).weight)
        for local in PROJECTIONS[2:]:
            assert isinstance(layer.get_submodule(local), NarrowLinear)
    # the first block's attention pattern reads only q/k of the unchanged embeddings
    torch.testing.assert_close(first_block_attention(model, calib[0]),
                               first_block_attention(dense, calib[0]), rtol=0, atol=1e-6)


def test_keep_below_the_dense_query_key_share_is_refused_by_name():
    model = tiny_gemma3()
    block = model.model.layers[0]
    targets = {local: block.get_submodule(local) for local in PROJECTIONS}
    share = sum(targets[local].weight.numel() for local in PROJECTIONS[:2]) / sum(
        linear.weight.numel() for linear in targets.values())
    floor = smallest_block_keep(block, targets)
    assert floor == pytest.approx(share + 0.05 * (1 - share))
    with pytest.raises(ValueError, match=rf"keep=0.1 is below the {floor:.3f} these blocks"):
        ck.compress(model, keep=0.1, calib=random_batches())


def test_query_key_norms_are_detected_by_their_modules():
    assert normalises_query_key(tiny_gemma3().model.layers[0], "self_attn.q_proj")
    assert not normalises_query_key(tiny_model("llama").model.layers[0], "self_attn.q_proj")
