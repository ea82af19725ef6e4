"""python/serve.py as a user runs it: --max-body-bytes answers larger bodies 413, and SIGTERM
answers the queued requests 503 at once and the running one once --graceful-seconds pass."""

import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
from conftest import CHECKPOINT_NAME
from served_programs import (
    ENVIRONMENT,
    PROGRAMS,
    assert_shuts_down_cleanly,
    running_server,
    said,
)

PROMPT = "the quick brown fox"
# The fixture's model, greedy from PROMPT, runs 4000 tokens without an end of sequence (24 s
# on this project's CPU machine): the running request outlasts SIGTERM and the grace period.
LONG = 4000


def test_serve_refuses_large_bodies_and_answers_queued_requests_503_on_sigterm(checkpoint):
    with running_server([sys.executable, str(PROGRAMS / "serve.py"), str(checkpoint),
                         "--device", "cpu", "--max-seq-len", "4096", "--max-body-bytes", "4096",
                         "--graceful-seconds", "1"]) as (server, base):
        completion = {"model": CHECKPOINT_NAME, "prompt": PROMPT, "temperature": 0}
        large = httpx.post(f"{base}/v1/completions", timeout=60,
                           json={**completion, "prompt": "x" * 5000})
        assert large.status_code == 413
        assert "at most 4096 bytes" in large.json()["error"]["message"]

        with ThreadPoolExecutor(3) as pool:

            def post(**fields):
                return pool.submit(httpx.post, f"{base}/v1/completions",
                                   json={**completion, **fields}, timeout=60)

            running = post(max_tokens=LONG)
            time.sleep(0.5)  # its turn has come: the next two wait behind it
            queued = [post(max_tokens=4), post(max_tokens=4, stream=True)]
            time.sleep(0.5)
            server.send_signal(signal.SIGTERM)
            for response in (future.result() for future in queued):
                assert response.status_code == 503, response.text
                assert response.json()["error"]["code"] == "server_shutting_down"
            assert not running.done()  # answered at once, not once the running one ended
            cut = running.result()
        assert cut.status_code == 503, cut.text
        assert "finished" in cut.json()["error"]["message"]
        assert_shuts_down_cleanly(server)


def test_serve_rejects_a_body_limit_below_one(checkpoint):
    result = subprocess.run(
        [sys.executable, str(PROGRAMS / "serve.py"), str(checkpoint), "--max-body-bytes", "0"],
        capture_output=True, text=True, timeout=120, env=ENVIRONMENT)
    assert result.returncode == 2
    assert "Invalid value for '--max-body-bytes'" in said(result)  # the rest varies with typer

