"""Serve a compressed checkpoint over an OpenAI-style HTTP API (FastAPI + uvicorn).

    python python/serve.py CHECKPOINT --port 8000 --compile --dtype bfloat16
    curl localhost:8000/v1/completions -H 'content-type: application/json' \\
        -d '{"model": "NAME", "prompt": "Hello", "max_tokens": 32, "stream": true}'

NAME is the checkpoint folder's name unless --model-name says otherwise (GET /v1/models lists
it). Requests run one at a time in arrival order; beyond --max-queued they get 429. Ctrl-C or
SIGTERM stops taking requests, finishes the open ones (up to --graceful-seconds) and exits.
"""

import argparse
from pathlib import Path

import uvicorn

from curkernels.serve import StaticCacheGenerator
from curkernels.serve.engine import CompletionEngine
from curkernels.serve.loading import add_loading_arguments, load_from_arguments
from curkernels.serve.server import create_app


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_loading_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--model-name", default=None, help="default: the folder's name")
    parser.add_argument("--max-seq-len", type=int, default=2048,
                        help="prompt + completion tokens (the KV cache length)")
    parser.add_argument("--max-queued", type=int, default=32)
    parser.add_argument("--graceful-seconds", type=int, default=30)
    parser.add_argument("--prefill-chunk-tokens", type=int, default=None,
                        help="run long prompts through prefill in chunks of this many tokens "
                             "(bounds activation memory); default: one forward")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    model, tokenizer = load_from_arguments(args)
    generator = StaticCacheGenerator(model, max_seq_len=args.max_seq_len, compile=args.compile,
                                     prefill_chunk_tokens=args.prefill_chunk_tokens)
    engine = CompletionEngine(generator, tokenizer, max_queued=args.max_queued)
    engine.warm_up()  # compile before the first request rather than during it
    app = create_app(engine, args.model_name or Path(args.checkpoint).resolve().name)
    uvicorn.run(app, host=args.host, port=args.port,
                timeout_graceful_shutdown=args.graceful_seconds)


if __name__ == "__main__":
    main()
