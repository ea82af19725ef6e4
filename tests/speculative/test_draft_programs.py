"""--draft in the programs: `curkernels generate` and python/generate.py print the dense
model's own greedy text, and `curkernels serve --draft` answers greedy requests exactly as the
server without a draft does."""

import json
import subprocess
import sys

import httpx
import pytest
import torch
from served_programs import CLI, ENVIRONMENT, PROGRAMS, running_server
from speculative_models import LOW_RANK, calibration_batches, causal_lm
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import curkernels as ck
from curkernels.serve import StaticCacheGenerator
from curkernels.serve.engine import CompletionEngine, CompletionJob

PROMPT = "w3 w14 w15 w92"
NEW_TOKENS = 12
MAX_SEQ_LEN = 64
GENERATE = {"python/generate.py": (sys.executable, str(PROGRAMS / "generate.py")),
            "curkernels generate": (*CLI, "generate")}


def word_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """One token per space-separated word w0 … w{vocab_size-1}."""
    vocab = {f"w{i}": i for i in range(vocab_size)}
    model = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    model.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=model, unk_token="w0")


@pytest.fixture(scope="module")
def dense_and_draft(tmp_path_factory):
    """(model, tokenizer, dense folder, draft folder): a tiny random Llama that never ends a
    sequence, saved with its tokenizer, and a CUR draft of it saved by `ck.save_draft`."""
    folder = tmp_path_factory.mktemp("speculative")
    model = causal_lm("llama")
    model.generation_config.eos_token_id = None
    tokenizer = word_tokenizer(model.config.vocab_size)
    model.save_pretrained(folder / "dense")
    tokenizer.save_pretrained(folder / "dense")
    draft = ck.make_draft(model, keep=0.5, calib=calibration_batches(count=1), max_rank=LOW_RANK)
    ck.save_draft(draft, folder / "draft")
    return model, tokenizer, folder / "dense", folder / "draft"


@pytest.mark.parametrize("program", GENERATE)
def test_generate_with_a_draft_prints_the_dense_greedy_text(dense_and_draft, program):
    model, tokenizer, dense, draft = dense_and_draft
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
    result = subprocess.run(
        [*GENERATE[program], str(dense), PROMPT, "--draft", str(draft), "--max-new-tokens",
         str(NEW_TOKENS), "--device", "cpu"],
        capture_output=True, text=True, timeout=300, env=ENVIRONMENT)
    assert result.returncode == 0, result.stderr
    printed = result.stdout[len(PROMPT):].split()
    assert printed == [f"w{t}" for t in expected[0, ids.shape[1]:].tolist()]
    assert "tokens per verification" in result.stderr


def test_serve_with_a_draft_answers_as_without_it(dense_and_draft):
    model, tokenizer, dense, draft = dense_and_draft
    engine = CompletionEngine(StaticCacheGenerator(model, max_seq_len=MAX_SEQ_LEN), tokenizer)
    try:
        plain = engine.run(CompletionJob(tokenizer(PROMPT)["input_ids"], NEW_TOKENS,
                                         temperature=0.0))
    finally:
        engine.shutdown()
    assert plain.completion_tokens == NEW_TOKENS
    with running_server([*CLI, "serve", str(dense), "--draft", str(draft), "--num-draft-tokens",
                         "3", "--device", "cpu", "--max-seq-len", str(MAX_SEQ_LEN)]
                        ) as (_server, base):
        for stream in (False, True):
            response = httpx.post(f"{base}/v1/completions", timeout=60, json={
                "model": dense.name, "prompt": PROMPT, "max_tokens": NEW_TOKENS,
                "temperature": 0, "stream": stream})
            assert response.status_code == 200, response.text
            if stream:
                text = "".join(choice["text"] for line in response.text.splitlines()
                               if line.startswith("data: {")
                               for choice in json.loads(line[6:])["choices"])
            else:
                text = response.json()["choices"][0]["text"]
            assert text == plain.text
