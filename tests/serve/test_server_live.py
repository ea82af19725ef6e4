"""The HTTP server over real sockets (uvicorn on a thread): requests whose clients disconnect
are cancelled and free the queue, tokenizing leaves the event loop free, chunked bodies are
cut off at the limit, and stopping the server answers the queued requests 503 at once."""

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import pytest
import uvicorn
from conftest import CHECKPOINT_NAME

from curkernels.serve import StaticCacheGenerator, load_for_inference
from curkernels.serve.draining import DrainingServer
from curkernels.serve.engine import CompletionEngine
from curkernels.serve.server import create_app

MODEL = CHECKPOINT_NAME
CONTEXT = 512
LONG = 300  # tokens: at STEP_SECONDS each, 6 s of generation
STEP_SECONDS = 0.02


@pytest.fixture(scope="module")
def loaded(checkpoint):
    return load_for_inference(checkpoint, device="cpu")


class SlowGenerator(StaticCacheGenerator):
    """Takes STEP_SECONDS per decoded token, and counts them."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.steps = 0

    def decode(self, tokens, position):
        self.steps += 1
        time.sleep(STEP_SECONDS)
        return super().decode(tokens, position)


class GatedGenerator(StaticCacheGenerator):
    """Holds each generation until `gate` opens, and says when one is held."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gate, self.holding = threading.Event(), threading.Event()

    def stream(self, *args, **kwargs):
        self.holding.set()
        self.gate.wait(timeout=30)
        yield from super().stream(*args, **kwargs)


def make_engine(loaded, generator_class=SlowGenerator, tokenizer=None) -> CompletionEngine:
    model, real_tokenizer = loaded
    engine = CompletionEngine(generator_class(model, max_seq_len=CONTEXT),
                              tokenizer or real_tokenizer)
    engine.eos_token_ids = set()  # every generation runs to max_tokens, whatever the model says
    return engine


@contextmanager
def live_server(engine, graceful_seconds: float = 10, **app_options):
    """The app over `engine`, served by uvicorn on a free port; yields (server, base URL)."""
    config = uvicorn.Config(create_app(engine, MODEL, **app_options), host="127.0.0.1", port=0,
                            log_level="warning", timeout_graceful_shutdown=graceful_seconds)
    server = DrainingServer(config, engine)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield server, f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        assert not thread.is_alive(), "uvicorn did not stop"


def request(**overrides) -> dict:
    return {"model": MODEL, "prompt": "the quick brown fox", "max_tokens": 4, "temperature": 0,
            **overrides}


def wait_for(condition, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


@pytest.mark.parametrize("stream", [False, True])
def test_abandoned_requests_are_cancelled_and_free_the_queue(loaded, stream):
    """Three clients give up on long generations; the next short request runs at once."""
    engine = make_engine(loaded)
    with live_server(engine) as (_server, url):

        def abandon() -> None:
            try:
                with httpx.stream("POST", f"{url}/v1/completions", timeout=0.5,
                                  json=request(max_tokens=LONG, stream=stream)) as response:
                    next(response.iter_lines())  # the running one streams: read, then leave
            except httpx.TimeoutException:  # still queued (or, not streamed, still running)
                pass

        with ThreadPoolExecutor(3) as pool:
            list(pool.map(lambda _: abandon(), range(3)))
        started = time.monotonic()
        response = httpx.post(f"{url}/v1/completions", json=request(), timeout=60)
        waited = time.monotonic() - started
        assert response.status_code == 200, response.text
        # Not cancelled, the three would hold the queue for 3 x LONG x STEP_SECONDS = 18 s.
        assert waited < 3, f"the next request waited {waited:.1f} s"
        assert engine.generator.steps < LONG  # the three together ran less than one of them
        assert engine._admitted == 0


class GatedTokenizer:
    """The model's tokenizer, except that encoding waits for `gate` (a huge prompt)."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self.gate, self.holding = threading.Event(), threading.Event()

    def __call__(self, *args, **kwargs):
        self.holding.set()
        self.gate.wait(timeout=30)
        return self._tokenizer(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


def test_tokenizing_leaves_the_event_loop_free(loaded):
    tokenizer = GatedTokenizer(loaded[1])
    engine = make_engine(loaded, tokenizer=tokenizer)
    with live_server(engine) as (_server, url), ThreadPoolExecutor(1) as pool:
        completion = pool.submit(httpx.post, f"{url}/v1/completions", json=request(),
                                 timeout=60)
        try:
            assert tokenizer.holding.wait(timeout=10)
            health = httpx.get(f"{url}/health", timeout=2)
            assert health.status_code == 200
            assert not completion.done()
        finally:
            tokenizer.gate.set()
        assert completion.result().status_code == 200


def test_a_chunked_body_over_the_limit_gets_413(loaded):
    engine = make_engine(loaded)
    body = json.dumps(request(prompt="x" * 20_000)).encode()
    chunks = (body[start:start + 1000] for start in range(0, len(body), 1000))
    with live_server(engine, max_body_bytes=4000) as (_server, url):
        response = httpx.post(f"{url}/v1/completions", content=chunks, timeout=30,
                              headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"


def test_stopping_answers_queued_requests_503_and_lets_the_running_one_finish(loaded):
    engine = make_engine(loaded, GatedGenerator)
    with live_server(engine, graceful_seconds=30) as (server, url), \
            ThreadPoolExecutor(3) as pool:

        def post(body: dict):
            return pool.submit(httpx.post, f"{url}/v1/completions", json=body, timeout=60)

        running = post(request())
        assert engine.generator.holding.wait(timeout=10)
        queued = [post(request()), post(request(stream=True))]
        wait_for(lambda: engine._admitted == 3)
        server.should_exit = True  # what uvicorn's SIGTERM and SIGINT handlers do
        try:
            for response in (future.result(timeout=10) for future in queued):
                assert response.status_code == 503, response.text
                error = response.json()["error"]
                assert error["code"] == "server_shutting_down" and error["type"] == "server_error"
            assert not running.done()
        finally:
            engine.generator.gate.set()
        assert running.result().status_code == 200


@pytest.mark.parametrize("stream", [False, True])
def test_stopping_fails_the_running_request_past_the_grace_period(loaded, stream):
    engine = make_engine(loaded)
    with live_server(engine, graceful_seconds=0.5) as (server, url), \
            ThreadPoolExecutor(1) as pool:
        running = pool.submit(httpx.post, f"{url}/v1/completions", timeout=60,
                              json=request(max_tokens=LONG, stream=stream))
        wait_for(lambda: engine.generator.steps > 0)
        server.should_exit = True
        response = running.result(timeout=10)
    if stream:  # the 200 went out with the first token: the error ends the stream
        assert response.status_code == 200
        error = json.loads(response.text.strip().splitlines()[-1][len("data: "):])["error"]
    else:
        assert response.status_code == 503
        error = response.json()["error"]
    assert error["code"] == "server_shutting_down"
    assert engine.generator.steps < LONG
