"""save_draft / load_draft: the delta round trip, its size, and the refusals."""

import json

import pytest
import torch
from safetensors.torch import save_model
from speculative_models import calibration_batches, causal_lm

import curkernels as ck
from curkernels.speculative import DraftBaseMismatchError


def folder_bytes(folder) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def model_and_draft():
    model = causal_lm("qwen2")
    draft = ck.make_draft(model, keep=0.25, calib=calibration_batches(count=1), skip_layers=[1],
                          head_tokens=64)
    ck.heal_draft(draft, model, calibration_batches(count=1), steps=2, lr=1e-2)  # U moves
    return model, draft


def test_round_trip_rebuilds_the_same_draft_on_the_targets_tensors(model_and_draft, tmp_path):
    model, draft = model_and_draft
    out = ck.save_draft(draft, tmp_path / "draft")
    assert sorted(p.name for p in out.iterdir()) == ["draft.json", "draft.safetensors"]
    loaded = ck.load_draft(out, target=model)
    ids = calibration_batches(count=1, seed=9)[0]["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, draft(ids).logits, rtol=0, atol=0)
    q = loaded.model.layers[1].self_attn.q_proj
    assert (q.R.untyped_storage().data_ptr()
            == model.model.layers[2].self_attn.q_proj.weight.untyped_storage().data_ptr())
    assert loaded.draft_spec.base_layers == [0, 2]


def test_delta_is_a_small_fraction_of_the_dense_checkpoint(model_and_draft, tmp_path):
    model, draft = model_and_draft
    out = ck.save_draft(draft, tmp_path / "draft")
    save_model(model, str(tmp_path / "dense.safetensors"))
    ratio = folder_bytes(out) / (tmp_path / "dense.safetensors").stat().st_size
    assert ratio <= 0.15, ratio


def test_a_different_base_is_refused(model_and_draft, tmp_path):
    model, draft = model_and_draft
    out = ck.save_draft(draft, tmp_path / "draft")
    retrained = causal_lm("qwen2", seed=1)
    with pytest.raises(DraftBaseMismatchError, match="weights differ"):
        ck.load_draft(out, target=retrained)
    wider = causal_lm("qwen2", vocab_size=100)
    with pytest.raises(DraftBaseMismatchError, match="vocab_size: draft's base 96, target 100"):
        ck.load_draft(out, target=wider)


def test_saving_never_replaces_what_it_did_not_write(model_and_draft, tmp_path):
    model, draft = model_and_draft
    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="is not a curkernels draft"):
        ck.save_draft(draft, user)
    assert (user / "notes.txt").read_text() == "mine"
    out = ck.save_draft(draft, tmp_path / "draft")
    with pytest.raises(ValueError, match="pass overwrite=True"):
        ck.save_draft(draft, out)
    ck.save_draft(draft, out, overwrite=True)
    (out / "extra.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="extra.bin"):
        ck.save_draft(draft, out, overwrite=True)
    assert not list(tmp_path.glob(".draft.tmp-*"))  # no staging folder left behind
    with pytest.raises(TypeError, match="made by make_draft"):
        ck.save_draft(model, tmp_path / "plain")


def test_a_corrupt_draft_folder_is_named(model_and_draft, tmp_path):
    model, draft = model_and_draft
    out = ck.save_draft(draft, tmp_path / "draft")
    meta = json.loads((out / "draft.json").read_text())
    meta["modules"].append("model.layers.0.mlp.nonexistent")
    (out / "draft.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="missing .*nonexistent"):
        ck.load_draft(out, target=model)
    with pytest.raises(ValueError, match="is not a curkernels draft"):
        ck.load_draft(tmp_path, target=model)
