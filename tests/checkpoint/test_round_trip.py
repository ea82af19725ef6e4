"""save_compressed → load_compressed / from_pretrained gives the same model, safetensors only."""

import json

import pytest
import torch
from model_configs import model_outputs, sample_inputs, tiny_model
from safetensors import safe_open
from transformers import AutoModel, AutoModelForCausalLM, BertTokenizerFast

import curkernels as ck
from curkernels import CURLinear

PICKLE_MAGIC = b"\x80"


def assert_no_pickle(folder):
    for path in folder.rglob("*"):
        assert path.suffix not in (".bin", ".pt", ".pth", ".pkl", ".ckpt"), path
        if path.is_file() and path.suffix != ".safetensors":
            assert not path.read_bytes().startswith(PICKLE_MAGIC), path


def cur_model(architecture="llama"):
    """Every attention q/k projection as a CURLinear with real CUR indices (U full)."""
    model = tiny_model(architecture)
    g = torch.Generator().manual_seed(5)
    for name, linear in list(model.named_modules()):
        if name.endswith(("q_proj", "k_proj")):
            w = linear.weight.detach()
            rows = torch.randperm(w.shape[0], generator=g)[:6]
            cols = torch.randperm(w.shape[1], generator=g)[:8]
            C, R = w[:, cols], w[rows]
            U = torch.linalg.pinv(C.double()) @ w.double() @ torch.linalg.pinv(R.double())
            model.set_submodule(name, CURLinear(C, U.float(), R, linear.bias,
                                                 row_indices=rows, col_indices=cols))
    return model


def test_llama_round_trip_through_from_pretrained_gives_identical_logits(tmp_path):
    model = tiny_model("llama")
    ck.compress(model, method="svd", keep=0.5)
    inputs = sample_inputs()
    expected = model_outputs(model, inputs)
    ck.save_compressed(model, tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    down = reloaded.model.layers[1].mlp.down_proj
    assert isinstance(down, CURLinear) and down.U is None
    assert torch.equal(model_outputs(reloaded, inputs), expected)
    assert_no_pickle(tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "curkernels"
    block = config["compression_config"]
    assert block["method"] == "svd" and block["format_version"] == ck.checkpoint.FORMAT_VERSION
    assert block["modules"]["model.layers.0.self_attn.q_proj"]["rank"] == \
        model.model.layers[0].self_attn.q_proj.rank
    report = json.loads((tmp_path / "out" / "compression_report.json").read_text())
    assert report["method"] == "svd" and len(report["modules"]) == 14


@pytest.mark.parametrize("architecture", ["llama", "mistral", "qwen2"])
def test_cur_modules_and_indices_survive_load_compressed(tmp_path, architecture):
    model = cur_model(architecture)
    inputs = sample_inputs()
    expected = model_outputs(model, inputs)
    ck.save_compressed(model, tmp_path / "cur")
    reloaded = ck.load_compressed(tmp_path / "cur", device="cpu")
    q = reloaded.model.layers[0].self_attn.q_proj
    assert isinstance(q, CURLinear) and q.u_kind == "full"
    assert torch.equal(q.row_indices, model.model.layers[0].self_attn.q_proj.row_indices)
    assert torch.equal(q.col_indices, model.model.layers[0].self_attn.q_proj.col_indices)
    assert torch.equal(model_outputs(reloaded, inputs), expected)
    with safe_open(str(tmp_path / "cur" / "model.safetensors"), "pt") as handle:
        assert "model.layers.0.self_attn.q_proj.U" in handle.keys()
        assert "model.layers.0.self_attn.q_proj.weight" not in handle.keys()


def test_load_in_another_dtype(tmp_path):
    model = cur_model()
    ck.save_compressed(model, tmp_path / "cur")
    reloaded = ck.load_compressed(tmp_path / "cur", dtype=torch.bfloat16)
    q = reloaded.model.layers[0].self_attn.q_proj
    assert q.C.dtype == q.U.dtype == torch.bfloat16 and q.row_indices.dtype == torch.int64
    out = model_outputs(reloaded, sample_inputs())
    torch.testing.assert_close(out.float(), model_outputs(model, sample_inputs()),
                               rtol=0.1, atol=0.1)


def test_encoder_with_tokenizer_through_auto_model(tmp_path, minilm_tokenizer):
    model = tiny_model("bert")
    ck.compress(model, method="svd", keep=0.6)
    inputs = sample_inputs()
    ck.save_compressed(model, tmp_path / "bert", tokenizer=minilm_tokenizer)
    reloaded = AutoModel.from_pretrained(tmp_path / "bert")
    assert torch.equal(model_outputs(reloaded, inputs), model_outputs(model, inputs))
    tokenizer = BertTokenizerFast.from_pretrained(tmp_path / "bert")
    assert tokenizer("a test")["input_ids"] == minilm_tokenizer("a test")["input_ids"]
    assert_no_pickle(tmp_path / "bert")


def test_resave_of_a_loaded_checkpoint_round_trips(tmp_path):
    model = cur_model()
    ck.save_compressed(model, tmp_path / "a")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    ck.save_compressed(loaded, tmp_path / "b")
    again = ck.load_compressed(tmp_path / "b")
    inputs = sample_inputs()
    assert torch.equal(model_outputs(again, inputs), model_outputs(model, inputs))


def test_rom_biases_on_a_biasless_llama_round_trip(tmp_path):
    """ROM gives its factored layers a bias where Llama has none: the checkpoint records it and
    loading builds the layer from the spec, not from the dense layer's bias flag."""
    model = tiny_model("llama")
    g = torch.Generator().manual_seed(0)
    calib = [{"input_ids": torch.randint(3, model.config.vocab_size, (2, 12), generator=g)}]
    ck.compress(model, method="rom", keep=0.5, calib=calib)
    assert any(isinstance(m, CURLinear) and m.U is None and m.bias is not None
               for m in model.modules())
    ck.save_compressed(model, tmp_path / "rom")
    reloaded = ck.load_compressed(tmp_path / "rom")
    inputs = sample_inputs()
    torch.testing.assert_close(model_outputs(reloaded, inputs), model_outputs(model, inputs),
                               rtol=0, atol=0)
