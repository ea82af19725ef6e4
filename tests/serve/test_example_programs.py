"""The example programs in python/ and the CLI run as a user runs them: generate.py and
`curkernels generate` print the model's greedy text; serve.py answers a completion over HTTP
and exits cleanly on SIGTERM."""

import signal
import subprocess
import sys

import httpx
import pytest
from conftest import CHECKPOINT_NAME
from served_programs import CLI, ENVIRONMENT, PROGRAMS, assert_shuts_down_cleanly, running_server

from curkernels.serve import StaticCacheGenerator, load_for_inference

PROMPT = "the quick brown fox"
NEW_TOKENS = 8
GENERATE = {"python/generate.py": (sys.executable, str(PROGRAMS / "generate.py")),
            "curkernels generate": (*CLI, "generate")}


def greedy_completion(checkpoint) -> str:
    """The text the model generates greedily for PROMPT, up to its end-of-sequence token."""
    model, tokenizer = load_for_inference(checkpoint, device="cpu")
    input_ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    tokens = StaticCacheGenerator(model, max_seq_len=input_ids.shape[1] + NEW_TOKENS).generate(
        input_ids, NEW_TOKENS, eos_token_ids=[tokenizer.eos_token_id])[0, input_ids.shape[1]:]
    tokens = tokens.tolist()
    if tokenizer.eos_token_id in tokens:
        tokens = tokens[:tokens.index(tokenizer.eos_token_id)]
    return tokenizer.decode(tokens)


@pytest.mark.parametrize("program", GENERATE)
def test_generate_prints_the_greedy_completion(checkpoint, program):
    result = subprocess.run(
        [*GENERATE[program], str(checkpoint), PROMPT, "--max-new-tokens", str(NEW_TOKENS),
         "--device", "cpu"], capture_output=True, text=True, timeout=300, env=ENVIRONMENT)
    assert result.returncode == 0, result.stderr
    assert result.stdout == PROMPT + greedy_completion(checkpoint)
    assert "tokens; first after" in result.stderr


def test_generate_rejects_an_unknown_dtype(checkpoint):
    result = subprocess.run(
        [*GENERATE["python/generate.py"], str(checkpoint), PROMPT, "--dtype", "int8"],
        capture_output=True, text=True, timeout=120, env=ENVIRONMENT)
    assert result.returncode == 2 and "--dtype" in result.stderr and "int8" in result.stderr


def test_serve_answers_a_completion_and_exits_cleanly_on_sigterm(checkpoint):
    with running_server([sys.executable, str(PROGRAMS / "serve.py"), str(checkpoint),
                         "--device", "cpu", "--max-seq-len", "48", "--graceful-seconds", "5"]
                        ) as (server, base):
        response = httpx.post(f"{base}/v1/completions", timeout=60, json={
            "model": CHECKPOINT_NAME, "prompt": PROMPT, "max_tokens": NEW_TOKENS, "temperature": 0})
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["text"] == greedy_completion(checkpoint)
        unknown = httpx.post(f"{base}/v1/completions", timeout=60,
                             json={"model": "other", "prompt": PROMPT})
        assert unknown.status_code == 404 and "'other' is not served" in unknown.text
        server.send_signal(signal.SIGTERM)
        assert_shuts_down_cleanly(server)
