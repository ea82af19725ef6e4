"""A checkpoint written before `CURLinear` absorbed `LowRankLinear` (two-factor layers stored as
kind "LowRankLinear", tensors A and B) still loads, through both loaders, and gives the logits
it gave when it was written (fixtures/make_two_factor_checkpoint.py made it)."""

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import curkernels as ck

FIXTURES = Path(__file__).parent / "fixtures"
FOLDER = FIXTURES / "two_factor_v1"
TWO_FACTOR = ("model.layers.0.self_attn.k_proj", "model.layers.0.mlp.down_proj")


@pytest.fixture(scope="module")
def expected():
    return load_file(FIXTURES / "two_factor_v1_expected.safetensors")


def check_model(model, expected) -> None:
    for name in TWO_FACTOR:
        module = model.get_submodule(name)
        assert type(module) is ck.CURLinear and module.U is None, name
    with torch.no_grad():
        logits = model(expected["input_ids"]).logits
    torch.testing.assert_close(logits, expected["logits"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("load", [ck.load_compressed, AutoModelForCausalLM.from_pretrained],
                         ids=["load_compressed", "from_pretrained"])
def test_old_checkpoint_loads_with_its_logits(load, expected):
    check_model(load(FOLDER), expected)


def test_old_checkpoint_saved_again_loads_in_the_new_format(tmp_path, expected):
    ck.save_compressed(ck.load_compressed(FOLDER), tmp_path / "again")
    reloaded = ck.load_compressed(tmp_path / "again")
    kinds = {spec["type"] for spec in reloaded.config.compression_config["modules"].values()}
    assert kinds == {"CURLinear"}
    check_model(reloaded, expected)


def corrupt_copy(tmp_path, edit):
    folder = tmp_path / "corrupt"
    shutil.copytree(FOLDER, folder)
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def poison(tensors):
    tensors[f"{TWO_FACTOR[0]}.A"].view(-1)[2] = float("inf")


@pytest.mark.parametrize("edit, match", [
    (lambda t: t.pop(f"{TWO_FACTOR[1]}.B"),
     rf"lacks tensor '{TWO_FACTOR[1]}.B' \(expected shape \(10, 48\)\)"),
    (poison, rf"'{TWO_FACTOR[0]}.A' holds NaN or Inf"),
])
def test_a_corrupt_old_checkpoint_names_the_tensor_as_stored(tmp_path, edit, match):
    with pytest.raises(ck.CheckpointError, match=match):
        ck.load_compressed(corrupt_copy(tmp_path, edit))
