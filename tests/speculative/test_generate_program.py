"""python/generate.py --draft prints the dense model's own greedy text."""

import os
import subprocess
import sys
from pathlib import Path

import torch
from speculative_models import LOW_RANK, calibration_batches, causal_lm
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import curkernels as ck

PROGRAM = Path(__file__).resolve().parents[2] / "python" / "generate.py"
PROMPT = "w3 w14 w15 w92"
NEW_TOKENS = 12


def word_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """One token per space-separated word w0 … w{vocab_size-1}."""
    vocab = {f"w{i}": i for i in range(vocab_size)}
    model = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    model.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=model, unk_token="w0")


def test_generate_with_a_draft_prints_the_dense_greedy_text(tmp_path):
    model = causal_lm("llama")
    model.generation_config.eos_token_id = None
    tokenizer = word_tokenizer(model.config.vocab_size)
    model.save_pretrained(tmp_path / "dense")
    tokenizer.save_pretrained(tmp_path / "dense")
    draft = ck.make_draft(model, keep=0.5, calib=calibration_batches(count=1), max_rank=LOW_RANK)
    ck.save_draft(draft, tmp_path / "draft")
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
    result = subprocess.run(
        [sys.executable, str(PROGRAM), str(tmp_path / "dense"), PROMPT, "--draft",
         str(tmp_path / "draft"), "--max-new-tokens", str(NEW_TOKENS), "--device", "cpu"],
        capture_output=True, text=True, timeout=300,
        env=dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false"))
    assert result.returncode == 0, result.stderr
    printed = result.stdout[len(PROMPT):].split()
    assert printed == [f"w{t}" for t in expected[0, ids.shape[1]:].tolist()]
    assert "tokens per verification" in result.stderr
