"""Corrupt, mismatched or foreign checkpoints fail with errors that name the problem;
a failed save leaves the previous folder intact."""

import json

import pytest
import torch
from model_configs import tiny_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import curkernels as ck
from curkernels import CheckpointError


@pytest.fixture
def saved(tmp_path):
    model = tiny_model("llama")
    ck.compress(model, method="svd", keep=0.5)
    ck.save_compressed(model, tmp_path / "ckpt")
    return tmp_path / "ckpt"


def rewrite_weights(folder, edit):
    path = folder / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def rewrite_config(folder, edit):
    path = folder / "config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))


def test_missing_tensor_is_named(saved):
    rewrite_weights(saved, lambda t: t.pop("model.layers.1.mlp.up_proj.R"))
    with pytest.raises(CheckpointError, match=r"lacks tensor 'model.layers.1.mlp.up_proj.R'"):
        ck.load_compressed(saved)


def test_wrong_shape_is_named_with_the_expected_one(saved):
    def widen(tensors):
        tensors["model.layers.0.self_attn.q_proj.C"] = torch.zeros(48, 3)
    rewrite_weights(saved, widen)
    with pytest.raises(CheckpointError, match=r"q_proj.C' has shape \(48, 3\), expected"):
        AutoModelForCausalLM.from_pretrained(saved)


def test_unexpected_tensor_is_named(saved):
    def add(tensors):
        tensors["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(48, 48)
    rewrite_weights(saved, add)
    with pytest.raises(CheckpointError, match="q_proj.weight"):
        ck.load_compressed(saved)


def test_unknown_format_version(saved):
    rewrite_config(saved, lambda c: c["compression_config"].update(format_version=99))
    with pytest.raises(CheckpointError, match="format_version 99"):
        ck.load_compressed(saved)


def test_module_the_model_does_not_have(saved):
    def rename(config):
        modules = config["compression_config"]["modules"]
        modules["model.layers.7.self_attn.q_proj"] = modules.pop("model.layers.0.self_attn.q_proj")
    rewrite_config(saved, rename)
    with pytest.raises(CheckpointError, match="model.layers.7.self_attn.q_proj"):
        ck.load_compressed(saved)


def test_a_dense_folder_is_not_a_curkernels_checkpoint(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path / "dense")
    with pytest.raises(CheckpointError, match="compression_config"):
        ck.load_compressed(tmp_path / "dense")
    with pytest.raises(FileNotFoundError, match="config.json"):
        ck.load_compressed(tmp_path / "nowhere")


def test_saving_an_uncompressed_model_is_refused(tmp_path):
    with pytest.raises(ValueError, match="compress it first"):
        ck.save_compressed(tiny_model("llama"), tmp_path / "x")
    with pytest.raises(TypeError, match="PreTrainedModel"):
        ck.save_compressed(torch.nn.Linear(2, 2), tmp_path / "y")


def test_failed_save_leaves_the_old_folder_and_no_debris(saved, monkeypatch):
    before = {p.name: p.read_bytes() for p in saved.iterdir()}
    model = tiny_model("llama", seed=9)
    ck.compress(model, method="svd", keep=0.3)

    def crash(self, folder, **kwargs):
        (folder / "model.safetensors").write_bytes(b"half")
        raise OSError("disk full")
    monkeypatch.setattr(type(model), "save_pretrained", crash)
    with pytest.raises(OSError, match="disk full"):
        ck.save_compressed(model, saved, overwrite=True)
    assert {p.name: p.read_bytes() for p in saved.iterdir()} == before
    assert sorted(p.name for p in saved.parent.iterdir()) == [saved.name]


def test_save_over_an_existing_folder_replaces_it(saved):
    model = tiny_model("llama", seed=4)
    ck.compress(model, method="svd", keep=0.25)
    ck.save_compressed(model, saved, overwrite=True)
    reloaded = ck.load_compressed(saved)
    assert reloaded.model.layers[0].self_attn.q_proj.rank == \
        model.model.layers[0].self_attn.q_proj.rank
    assert sorted(p.name for p in saved.parent.iterdir()) == [saved.name]
