"""vLLM generation throughput of one checkpoint at several batch sizes (greedy, fixed lengths).

    python bench/vllm_throughput.py CHECKPOINT [--batch 1 16] [--new-tokens 64] [--dtype float32]

Prints one JSON line per batch size: generated tokens per second over a timed run that follows
an untimed warm-up of the same shape (which also triggers vLLM's compilation). Run it once per
checkpoint (a vLLM engine owns its process), on an otherwise idle machine.
"""

import argparse
import json
import time

import torch
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt

PROMPT_TOKENS = 16


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    llm = LLM(model=args.checkpoint, dtype=args.dtype, max_model_len=256, seed=0,
              kv_cache_memory_bytes=512 << 20)
    vocab = llm.llm_engine.model_config.get_vocab_size()
    params = SamplingParams(temperature=0.0, max_tokens=args.new_tokens, ignore_eos=True)
    generator = torch.Generator().manual_seed(0)
    for batch in args.batch:
        prompts = [TokensPrompt(prompt_token_ids=torch.randint(
            0, vocab, (PROMPT_TOKENS,), generator=generator).tolist()) for _ in range(batch)]
        llm.generate(prompts, params, use_tqdm=False)
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - start
        tokens = sum(len(out.outputs[0].token_ids) for out in outputs)
        print(json.dumps({"checkpoint": args.checkpoint, "batch": batch, "new_tokens": tokens,
                          "seconds": round(seconds, 3),
                          "tokens_per_second": round(tokens / seconds, 1)}), flush=True)


if __name__ == "__main__":
    main()
