"""The example programs in python/ run as a user runs them: generate.py prints the model's greedy
text; serve.py answers a completion over HTTP and exits cleanly on SIGTERM."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from conftest import CHECKPOINT_NAME

from curkernels.serve import StaticCacheGenerator, load_for_inference

PROGRAMS = Path(__file__).resolve().parents[2] / "python"
PROMPT = "the quick brown fox"
NEW_TOKENS = 8
# One CPU thread: the model is tiny, and spare OpenMP threads only spin on a busy machine.
ENVIRONMENT = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")


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


def test_generate_prints_the_greedy_completion(checkpoint):
    result = subprocess.run(
        [sys.executable, str(PROGRAMS / "generate.py"), str(checkpoint), PROMPT,
         "--max-new-tokens", str(NEW_TOKENS), "--device", "cpu"],
        capture_output=True, text=True, timeout=300, env=ENVIRONMENT)
    assert result.returncode == 0, result.stderr
    assert result.stdout == PROMPT + greedy_completion(checkpoint)
    assert "tokens; first after" in result.stderr


def test_generate_rejects_an_unknown_dtype(checkpoint):
    result = subprocess.run(
        [sys.executable, str(PROGRAMS / "generate.py"), str(checkpoint), PROMPT, "--dtype", "int8"],
        capture_output=True, text=True, timeout=120, env=ENVIRONMENT)
    assert result.returncode == 2 and "--dtype" in result.stderr and "int8" in result.stderr


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until_serving(server: subprocess.Popen, url: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"serve.py exited with {server.returncode}: {server.stderr.read()}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.5)
    pytest.fail(f"serve.py did not answer {url} within {seconds} s")


def test_serve_answers_a_completion_and_exits_cleanly_on_sigterm(checkpoint):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, str(PROGRAMS / "serve.py"), str(checkpoint), "--port", str(port),
         "--device", "cpu", "--max-seq-len", "48", "--graceful-seconds", "5"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENVIRONMENT)
    try:
        wait_until_serving(server, f"{base}/v1/models", seconds=180)
        response = httpx.post(f"{base}/v1/completions", timeout=60, json={
            "model": CHECKPOINT_NAME, "prompt": PROMPT, "max_tokens": NEW_TOKENS, "temperature": 0})
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["text"] == greedy_completion(checkpoint)
        unknown = httpx.post(f"{base}/v1/completions", timeout=60,
                             json={"model": "other", "prompt": PROMPT})
        assert unknown.status_code == 404 and "'other' is not served" in unknown.text
        server.send_signal(signal.SIGTERM)
        # uvicorn re-raises the signal once it has shut down (since 0.29): -SIGTERM is a clean
        # exit as long as the application's shutdown (the engine's) completed first.
        status = server.wait(timeout=60)
        log = server.stderr.read()
        assert status in (0, -signal.SIGTERM) and "Application shutdown complete" in log, log
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
