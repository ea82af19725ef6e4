"""Serve a compressed checkpoint over an OpenAI-style HTTP API (FastAPI + uvicorn).

    python python/serve.py CHECKPOINT --port 8000 --compile --dtype bfloat16
    curl localhost:8000/v1/completions -H 'content-type: application/json' \\
        -d '{"model": "NAME", "prompt": "Hello", "max_tokens": 32, "stream": true}'

NAME is the checkpoint folder's name unless --model-name says otherwise (GET /v1/models lists
it). Requests run one at a time in arrival order; beyond --max-queued they get 429, and
bodies over --max-body-bytes get 413. A request whose client disconnects is dropped from the
queue or stopped at its next token. Ctrl-C or SIGTERM stops taking requests (503), answers the
queued ones 503 at once, gives the running one up to --graceful-seconds, and exits.
"""

import argparse
from pathlib import Path

import uvicorn

from curkernels.serve import StaticCacheGenerator
from curkernels.serve.draining import DrainingServer
from curkernels.serve.engine import CompletionEngine
from curkernels.serve.loading import add_loading_arguments, load_from_arguments
from curkernels.serve.server import DEFAULT_MAX_BODY_BYTES, create_app


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_loading_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--model-name", default=None, help="default: the folder's name")
    parser.add_argument("--max-seq-len", type=int, default=2048,
                        help="prompt + completion tokens (the KV cache length)")
    parser.add_argument("--max-queued", type=int, default=32)
    parser.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES,
                        help="larger request bodies get 413 without being read")
    parser.add_argument("--graceful-seconds", type=int, default=30,
                        help="on SIGTERM, how long the running request may take to finish")
    parser.add_argument("--prefill-chunk-tokens", type=int, default=None,
                        help="run long prompts through prefill in chunks of this many tokens "
                             "(bounds activation memory); default: one forward")
    args = parser.parse_args()
    if args.max_body_bytes < 1:
        parser.error(f"--max-body-bytes must be at least 1, got {args.max_body_bytes}")
    return args


def main() -> None:
    args = parse_args()
    model, tokenizer = load_from_arguments(args)
    generator = StaticCacheGenerator(model, max_seq_len=args.max_seq_len, compile=args.compile,
                                     prefill_chunk_tokens=args.prefill_chunk_tokens)
    engine = CompletionEngine(generator, tokenizer, max_queued=args.max_queued)
    engine.warm_up()  # compile before the first request rather than during it
    app = create_app(engine, args.model_name or Path(args.checkpoint).resolve().name,
                     max_body_bytes=args.max_body_bytes)
    DrainingServer(uvicorn.Config(app, host=args.host, port=args.port,
                                  timeout_graceful_shutdown=args.graceful_seconds), engine).run()


if __name__ == "__main__":
    main()
