"""Serve a compressed checkpoint (or any model) over an OpenAI-style HTTP API (FastAPI +
uvicorn).

    python python/serve.py CHECKPOINT --port 8000 --compile --dtype bfloat16
    python python/serve.py DENSE_MODEL --draft DRAFT --num-draft-tokens 4
    curl localhost:8000/v1/completions -H 'content-type: application/json' \\
        -d '{"model": "NAME", "prompt": "Hello", "max_tokens": 32, "stream": true}'

NAME is the checkpoint folder's name unless --model-name says otherwise (GET /v1/models lists
it). Requests run one at a time in arrival order; beyond --max-queued they get 429, and
bodies over --max-body-bytes get 413. A request whose client disconnects is dropped from the
queue or stopped at its next token. Ctrl-C or SIGTERM stops taking requests (503), answers the
queued ones 503 at once, gives the running one up to --graceful-seconds, and exits. --draft
decodes speculatively with a draft cut from the served (dense) model: answers stay the model's
own. This is `curkernels serve` as a program of its own (`--help` lists the rest).
"""

from curkernels.cli import run_program, serve

if __name__ == "__main__":
    run_program(serve)
