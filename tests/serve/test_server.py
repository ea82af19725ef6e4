"""The HTTP server answers OpenAI-style completions (plain and streamed), queues concurrent
requests, shuts down cleanly, and rejects bad requests with a 4xx and a message."""

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import CHECKPOINT_NAME
from fastapi.testclient import TestClient

from curkernels.serve import StaticCacheGenerator, load_for_inference
from curkernels.serve.engine import CompletionEngine
from curkernels.serve.server import create_app

MODEL = CHECKPOINT_NAME
CONTEXT = 48
PROMPT = "the quick brown fox"


@pytest.fixture(scope="module")
def loaded(checkpoint):
    return load_for_inference(checkpoint, device="cpu")


def make_engine(loaded, generator_class=StaticCacheGenerator, **kwargs) -> CompletionEngine:
    model, tokenizer = loaded
    return CompletionEngine(generator_class(model, max_seq_len=CONTEXT), tokenizer, **kwargs)


@pytest.fixture(scope="module")
def client(loaded):
    engine = make_engine(loaded)
    yield TestClient(create_app(engine, MODEL))
    engine.shutdown()


def greedy_text(loaded, max_tokens: int) -> tuple[str, int]:
    """What the model generates for PROMPT, decoded: the expected completion."""
    model, tokenizer = loaded
    input_ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    tokens = StaticCacheGenerator(model, max_seq_len=CONTEXT).generate(
        input_ids, max_tokens, eos_token_ids=[tokenizer.eos_token_id])[0, input_ids.shape[1]:]
    kept = tokens[tokens != tokenizer.eos_token_id]
    return tokenizer.decode(kept, skip_special_tokens=True), len(tokens)


def test_loaded_with_shared_shrinks_generates_the_same_text(checkpoint, loaded):
    shared = load_for_inference(checkpoint, device="cpu", share_shrinks=True)
    groups = {id(m.shared_shrink) for m in shared[0].modules()
              if getattr(m, "shared_shrink", None) is not None}
    assert len(groups) == 2 * shared[0].config.num_hidden_layers  # q/k/v and gate/up
    assert greedy_text(shared, 12) == greedy_text(loaded, 12)


def request(**overrides) -> dict:
    return {"model": MODEL, "prompt": PROMPT, "max_tokens": 10, "temperature": 0, **overrides}


def sse_events(body: str) -> list:
    lines = [line[len("data: "):] for line in body.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def test_completion(client, loaded):
    response = client.post("/v1/completions", json=request())
    assert response.status_code == 200, response.text
    body = response.json()
    text, count = greedy_text(loaded, 10)
    assert body["object"] == "text_completion" and body["model"] == MODEL
    assert body["choices"][0]["text"] == text and text
    assert body["choices"][0]["finish_reason"] in ("stop", "length")
    prompt_tokens = len(loaded[1](PROMPT)["input_ids"])
    assert body["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": count,
                             "total_tokens": prompt_tokens + count}


def test_streamed_completion_matches_plain(client, loaded):
    with client.stream("POST", "/v1/completions", json=request(stream=True)) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response.read().decode())
    assert len(events) > 2
    assert "".join(e["choices"][0]["text"] for e in events) == greedy_text(loaded, 10)[0]
    assert all(e["choices"][0].get("finish_reason") is None for e in events[:-1])
    assert events[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert events[-1]["usage"]["completion_tokens"] == greedy_text(loaded, 10)[1]


def test_stop_string_cuts_the_text(client, loaded):
    full, _ = greedy_text(loaded, 10)
    stop = full[3:6]
    for stream in (False, True):
        response = client.post("/v1/completions", json=request(stop=[stop], stream=stream))
        assert response.status_code == 200
        if stream:
            events = sse_events(response.text)
            text = "".join(e["choices"][0]["text"] for e in events)
            reason = events[-1]["choices"][0]["finish_reason"]
        else:
            text, reason = (response.json()["choices"][0][k] for k in ("text", "finish_reason"))
        assert text == full[:full.find(stop)] and reason == "stop"


def test_concurrent_requests_are_queued_not_interleaved(client, loaded):
    """All requests share one KV cache: overlapping generations would corrupt each other."""
    expected = greedy_text(loaded, 12)[0]
    with ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(lambda _: client.post("/v1/completions",
                                                        json=request(max_tokens=12)), range(4)))
    assert [r.json()["choices"][0]["text"] for r in responses] == [expected] * 4


def test_models_lists_the_served_model(client):
    body = client.get("/v1/models").json()
    assert [m["id"] for m in body["data"]] == [MODEL]
    assert body["data"][0]["max_model_len"] == CONTEXT


@pytest.mark.parametrize("body, status, words", [
    ('{"model": "tiny", "prompt": ', 400, "not valid JSON"),
    (request(model="gpt-5"), 404, "'gpt-5' is not served"),
    (request(max_tokens=CONTEXT), 400, f"context is {CONTEXT} tokens"),
    (request(max_tokens=0), 400, "max_tokens"),
    (request(temperature=-1), 400, "temperature"),
    (request(prompt=""), 400, "prompt"),
    ({"model": MODEL}, 400, "prompt: Field required"),
    (request(logprobs=3), 400, "logprobs"),
    (request(stop=["a", ""]), 400, "stop"),
])
def test_bad_requests_get_4xx_with_a_message(client, body, status, words):
    for stream in (False, True):
        if isinstance(body, dict):
            response = client.post("/v1/completions", json={**body, "stream": stream})
        else:
            response = client.post("/v1/completions", content=body,
                                   headers={"content-type": "application/json"})
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert words in error["message"]
        assert error["type"] == "invalid_request_error"


class GatedGenerator(StaticCacheGenerator):
    """Holds every generation until `gate` opens: keeps requests in flight on purpose."""

    gate = threading.Event()

    def stream(self, *args, **kwargs):
        self.gate.wait(timeout=30)
        yield from super().stream(*args, **kwargs)


def test_full_queue_answers_429(loaded):
    engine = make_engine(loaded, GatedGenerator, max_queued=1)
    client = TestClient(create_app(engine, MODEL))
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(client.post, "/v1/completions", json=request(max_tokens=2))
        while engine._admitted == 0:
            threading.Event().wait(0.01)
        refused = client.post("/v1/completions", json=request(max_tokens=2))
        GatedGenerator.gate.set()
        assert first.result().status_code == 200
    assert refused.status_code == 429
    assert "limit is 1" in refused.json()["error"]["message"]
    engine.shutdown()


def test_shutdown_refuses_new_requests(loaded):
    engine = make_engine(loaded)
    app = create_app(engine, MODEL)
    with TestClient(app) as client:  # runs the app's startup and shutdown
        assert client.post("/v1/completions", json=request(max_tokens=2)).status_code == 200
    response = TestClient(app).post("/v1/completions", json=request(max_tokens=2))
    assert response.status_code == 503
    assert "shutting down" in response.json()["error"]["message"]
    assert response.json()["error"]["code"] == "server_shutting_down"


def test_warm_up_runs_on_the_generation_thread(loaded):
    engine = make_engine(loaded)
    threads, original = [], engine.generator.generate

    def recording_generate(*args, **kwargs):
        threads.append(threading.current_thread().name)
        return original(*args, **kwargs)

    engine.generator.generate = recording_generate
    engine.warm_up()
    engine.shutdown()
    assert len(threads) == 1 and threads[0].startswith("generation")


def test_engine_needs_a_batch_one_generator(loaded):
    model, tokenizer = loaded
    with pytest.raises(ValueError, match="batch_size=1"):
        CompletionEngine(StaticCacheGenerator(model, batch_size=2, max_seq_len=8), tokenizer)


@pytest.mark.parametrize("field, value", [
    ("max_tokens", "4"), ("max_tokens", 4.0), ("max_tokens", True),
    ("stream", "yes"), ("stream", 1),
    ("temperature", "0.5"), ("temperature", True),
    ("top_p", "1"), ("n", True), ("n", "1"), ("n", 2),
    ("seed", "7"), ("seed", 7.0),
    ("stop", [1]), ("stop", 5),
    ("prompt", ["the quick", "brown fox"]), ("prompt", [1, 2, 3]), ("prompt", 5),
    ("model", 5),
])
def test_request_fields_have_openai_types(client, field, value):
    """As in OpenAI's API, a value of the wrong JSON type is an error, not converted."""
    for stream in (False, True):
        body = {**request(stream=stream), field: value}
        response = client.post("/v1/completions", json=body)
        assert response.status_code == 400, (body, response.text)
        error = response.json()["error"]
        assert error["param"].split(".")[0] == field and field in error["message"]
        assert error["type"] == "invalid_request_error"


def test_null_fields_mean_their_defaults(client, loaded):
    nulls = dict.fromkeys(["max_tokens", "top_p", "stream", "stop", "seed", "n"])
    response = client.post("/v1/completions", json={**request(), **nulls})
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["text"] == greedy_text(loaded, 16)[0]


@pytest.mark.parametrize("seed", [2**64, 2**63, -2**63 - 1, 10**30])
def test_seed_outside_int64_is_a_400(client, seed):
    for stream in (False, True):
        response = client.post("/v1/completions",
                               json=request(seed=seed, temperature=1, stream=stream))
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == "seed"


@pytest.mark.parametrize("seed", [2**63 - 1, -2**63, 0])
def test_seed_at_the_int64_bounds_samples(client, seed):
    texts = set()
    for stream in (False, True):
        response = client.post("/v1/completions",
                               json=request(seed=seed, temperature=1, stream=stream))
        assert response.status_code == 200, response.text
        texts.add("".join(e["choices"][0]["text"] for e in sse_events(response.text)) if stream
                  else response.json()["choices"][0]["text"])
    assert len(texts) == 1  # one seed, one sample, streamed or not


def over_the_limit_chunks(size: int):
    """A body of `size` bytes sent chunked, without a Content-Length."""
    body = json.dumps(request(prompt="x" * size)).encode()
    for start in range(0, len(body), 1000):
        yield body[start:start + 1000]


def test_bodies_over_the_limit_get_413(loaded):
    engine = make_engine(loaded)
    client = TestClient(create_app(engine, MODEL, max_body_bytes=2000))
    assert client.post("/v1/completions", json=request(prompt="x" * 1500)).status_code != 413
    for response in (client.post("/v1/completions", json=request(prompt="x" * 2000)),
                     client.post("/v1/completions", content=over_the_limit_chunks(5000),
                                 headers={"content-type": "application/json"})):
        assert response.status_code == 413, response.text
        error = response.json()["error"]
        assert error["code"] == "request_too_large" and "at most 2000 bytes" in error["message"]
    engine.shutdown()


@pytest.mark.parametrize("limit", [0, -1, 1.5, True])
def test_body_limit_must_be_a_positive_int(loaded, limit):
    engine = make_engine(loaded)
    with pytest.raises(ValueError, match="max_body_bytes"):
        create_app(engine, MODEL, max_body_bytes=limit)
    engine.shutdown()


def test_unknown_routes_and_methods_get_openai_errors(client):
    for response, status in ((client.get("/v1/chat/nothing"), 404),
                             (client.get("/v1/completions"), 405)):
        assert response.status_code == status
        error = response.json()["error"]
        assert error["type"] == "invalid_request_error" and "/v1/" in error["message"]


class FailingGenerator(StaticCacheGenerator):
    """Generates `tokens_before_failing` tokens, then fails as a broken model would."""

    tokens_before_failing = 0

    def stream(self, *args, **kwargs):
        for step, tokens in enumerate(super().stream(*args, **kwargs)):
            if step == self.tokens_before_failing:
                raise RuntimeError("CUDA error: an illegal memory access was encountered")
            yield tokens


def test_a_failure_before_the_first_token_is_a_json_500(loaded):
    engine = make_engine(loaded, FailingGenerator)
    client = TestClient(create_app(engine, MODEL), raise_server_exceptions=False)
    for stream in (False, True):
        response = client.post("/v1/completions", json=request(stream=stream))
        assert response.status_code == 500
        error = response.json()["error"]
        assert error["type"] == "server_error" and "illegal memory access" in error["message"]
    engine.shutdown()


def test_a_failure_mid_stream_ends_it_with_an_error_event(loaded):
    class FailingLate(FailingGenerator):
        tokens_before_failing = 5

    engine = make_engine(loaded, FailingLate)
    engine.eos_token_ids = set()  # five tokens of text come out whatever the model says
    client = TestClient(create_app(engine, MODEL), raise_server_exceptions=False)
    response = client.post("/v1/completions", json=request(stream=True))
    assert response.status_code == 200
    lines = [line[len("data: "):] for line in response.text.splitlines()
             if line.startswith("data: ")]
    assert "[DONE]" not in lines
    *deltas, last = [json.loads(line) for line in lines]
    assert deltas and all("choices" in event for event in deltas)
    assert last["error"]["type"] == "server_error"
    assert "illegal memory access" in last["error"]["message"]
    engine.shutdown()
