"""Generate text from a compressed checkpoint, streaming it to the terminal.

    python python/generate.py CHECKPOINT "Once upon a time" --max-new-tokens 64
    python python/generate.py CHECKPOINT "Once upon a time" --compile --dtype bfloat16

CHECKPOINT is a folder written by `curkernels.save_compressed` (or `curkernels compress`) that
holds the tokenizer, or pass --tokenizer. --compile compiles the decode step into one graph
(CUDA graphs on a GPU): the first tokens wait for compilation, the rest run much faster.
"""

import argparse
import sys
import time

import torch

from curkernels.serve import IncrementalDetokenizer, StaticCacheGenerator, end_of_sequence_ids
from curkernels.serve.loading import add_loading_arguments, load_from_arguments


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_loading_arguments(parser)
    parser.add_argument("prompt")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    model, tokenizer = load_from_arguments(args)
    input_ids = tokenizer(args.prompt, return_tensors="pt")["input_ids"]
    generator = StaticCacheGenerator(model, max_seq_len=input_ids.shape[1] + args.max_new_tokens,
                                     compile=args.compile)
    stops = end_of_sequence_ids(model, tokenizer)
    detokenizer = IncrementalDetokenizer(tokenizer)
    print(args.prompt, end="", flush=True)
    start, first, count = time.perf_counter(), None, 0
    for tokens in generator.stream(input_ids, args.max_new_tokens, temperature=args.temperature,
                                   top_p=args.top_p, eos_token_ids=stops, seed=args.seed):
        first = first or time.perf_counter()
        count += 1
        if int(tokens[0]) in stops:
            break
        print(detokenizer.push(int(tokens[0])), end="", flush=True)
    print(detokenizer.finish(), end="")
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    end = time.perf_counter()
    rate = f", then {(count - 1) / (end - first):.1f} tokens/s" if count > 1 else ""
    print(f"\n[{count} tokens; first after {first - start:.2f} s{rate}]", file=sys.stderr)


if __name__ == "__main__":
    main()
