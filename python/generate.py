"""Generate text from a compressed checkpoint, streaming it to the terminal.

    python python/generate.py CHECKPOINT "Once upon a time" --max-new-tokens 64
    python python/generate.py CHECKPOINT "Once upon a time" --compile --dtype bfloat16
    python python/generate.py DENSE_MODEL "Once upon a time" --draft DRAFT --num-draft-tokens 4

CHECKPOINT is a folder written by `curkernels.save_compressed` (or `curkernels compress`) that
holds the tokenizer, or pass --tokenizer. --compile compiles the decode step into one graph
(CUDA graphs on a GPU): the first tokens wait for compilation, the rest run much faster.
--draft decodes speculatively with a draft saved by `curkernels.save_draft`: CHECKPOINT is
then the dense model the draft was cut from (a transformers folder), and the output is that
model's own, produced in fewer of its forwards.
"""

import argparse
import sys
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from curkernels.serve import IncrementalDetokenizer, StaticCacheGenerator, end_of_sequence_ids
from curkernels.serve.loading import (
    add_loading_arguments,
    default_device,
    load_from_arguments,
    parse_dtype,
)
from curkernels.speculative import load_draft


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_loading_arguments(parser)
    parser.add_argument("prompt")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--draft", default=None,
                        help="a draft folder (curkernels.save_draft) cut from this model")
    parser.add_argument("--num-draft-tokens", type=int, default=4)
    return parser.parse_args()


def load_models(args: argparse.Namespace):
    """(model, tokenizer, draft or None): a draft reads its dense base model's weights, so
    with --draft the checkpoint is that dense model."""
    if args.draft is None:
        return (*load_from_arguments(args), None)
    dtype = parse_dtype(args.dtype) or "auto"
    model = AutoModelForCausalLM.from_pretrained(args.checkpoint, dtype=dtype)
    model = model.to(args.device or default_device()).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.checkpoint)
    return model, tokenizer, load_draft(args.draft, target=model)


def main() -> None:
    args = parse_args()
    model, tokenizer, draft = load_models(args)
    input_ids = tokenizer(args.prompt, return_tensors="pt")["input_ids"]
    generator = StaticCacheGenerator(model, max_seq_len=input_ids.shape[1] + args.max_new_tokens,
                                     compile=args.compile, draft=draft,
                                     num_draft_tokens=args.num_draft_tokens)
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
    steps = ""
    if draft is not None and generator.accepted_per_step:
        per_step = (count - 1) / len(generator.accepted_per_step)
        steps = f"; {per_step:.2f} tokens per verification"
    print(f"\n[{count} tokens; first after {first - start:.2f} s{rate}{steps}]", file=sys.stderr)


if __name__ == "__main__":
    main()
