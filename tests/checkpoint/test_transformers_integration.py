"""The quantizer hook finds the files `from_pretrained` loads, so that their tensors are
checked before any weight is read: transformers 5 passes them, 4.x names only the folder."""

from types import SimpleNamespace

import pytest
from model_configs import tiny_model

import curkernels as ck
from curkernels.checkpoint.transformers_integration import files_being_loaded


def _model_from(folder) -> SimpleNamespace:
    return SimpleNamespace(config=SimpleNamespace(name_or_path=str(folder)))


@pytest.mark.parametrize("max_shard_size,expected_files", [("5GB", 1), ("20KB", 3)])
def test_files_of_a_local_folder_without_the_hook_argument(tmp_path, max_shard_size,
                                                           expected_files):
    model = tiny_model("llama")
    ck.compress(model, method="svd", keep=0.5)
    ck.save_compressed(model, tmp_path / "ckpt", max_shard_size=max_shard_size)
    files = files_being_loaded(_model_from(tmp_path / "ckpt"), {})
    on_disk = sorted(str(p) for p in (tmp_path / "ckpt").glob("*.safetensors"))
    assert files == on_disk
    assert len(files) >= expected_files


def test_the_hook_argument_wins_and_a_hub_name_gives_none(tmp_path):
    assert files_being_loaded(_model_from(tmp_path), {"checkpoint_files": ["a.safetensors"]}) \
        == ["a.safetensors"]
    assert files_being_loaded(_model_from("someone/some-model"), {}) is None
    assert files_being_loaded(_model_from(tmp_path), {}) is None  # a folder without weights
