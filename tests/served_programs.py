"""The example programs (python/) and the CLI run as a user runs them: a server started on a
free port, waited for, and stopped with SIGTERM."""

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

PROGRAMS = Path(__file__).resolve().parents[1] / "python"
# One CPU thread: the models are tiny, and spare OpenMP threads only spin on a busy machine.
ENVIRONMENT = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
CLI = (sys.executable, "-m", "curkernels")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until_serving(server: subprocess.Popen, url: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"the server exited with {server.returncode}: {server.stderr.read()}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.5)
    pytest.fail(f"the server did not answer {url} within {seconds} s")


@contextmanager
def running_server(command: list[str]):
    """`command` (a server program and its arguments, less --port) listening on a free port,
    answering GET /v1/models; yields (process, base URL) and kills what is still running."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([*command, "--port", str(port)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=ENVIRONMENT)
    try:
        wait_until_serving(server, f"{base}/v1/models", seconds=180)
        yield server, base
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def assert_shuts_down_cleanly(server: subprocess.Popen) -> None:
    """After SIGTERM: uvicorn re-raises the signal once it has shut down (since 0.29), so
    -SIGTERM is a clean exit as long as the application's shutdown (the engine's) completed."""
    status = server.wait(timeout=60)
    log = server.stderr.read()
    assert status in (0, -signal.SIGTERM) and "Application shutdown complete" in log, log


def said(result: subprocess.CompletedProcess) -> str:
    """stderr as one line of words: typer's error box wraps and frames long messages."""
    return " ".join(result.stderr.replace("│", " ").split())
