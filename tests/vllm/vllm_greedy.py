"""Greedy token ids from vLLM for a checkpoint: `python vllm_greedy.py CKPT PROMPTS.json TP
NEW_TOKENS EAGER OUT.json [DRAFT]` (EAGER 1 skips vLLM's torch.compile; DRAFT, a checkpoint
vLLM drafts with, 3 tokens a step; run in a process of its own: vLLM's engine owns it)."""

import json
import sys

from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt


def main(checkpoint: str, prompts_file: str, tensor_parallel: str, new_tokens: str,
         eager: str, out_file: str, draft: str | None = None) -> None:
    prompts = json.loads(open(prompts_file).read())
    llm = LLM(model=checkpoint, dtype="float32", tensor_parallel_size=int(tensor_parallel),
              skip_tokenizer_init=True, max_model_len=128, seed=0, enforce_eager=eager == "1",
              kv_cache_memory_bytes=64 << 20,
              speculative_config=None if draft is None else {
                  "method": "draft_model", "model": draft, "num_speculative_tokens": 3})
    params = SamplingParams(temperature=0.0, max_tokens=int(new_tokens), ignore_eos=True)
    results = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompts], params)
    with open(out_file, "w") as out:
        json.dump([list(r.outputs[0].token_ids) for r in results], out)


if __name__ == "__main__":
    main(*sys.argv[1:])
