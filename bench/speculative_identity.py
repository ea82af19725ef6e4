"""Greedy identity on SmolLM2-135M: speculative output equals the dense model's own greedy output.

Protocol (also in the JSON): the last `--prompts` WikiText-2 valid paragraphs (the prompts of
bench/speculative.py, each cut to `--prompt-tokens` tokens) are each decoded greedily for
`--new-tokens` tokens at batch 1 by the dense model alone and by the dense model with a CUR
draft (`--keep` on every block Linear, read through the gather form, a frequent-token head of
`--head-tokens` tokens counted on the first `--head-calib` paragraphs, selection calibrated on
the first `--calib` paragraphs) drafting `--k` tokens per verification. Both run eagerly, or both compiled
(`--compile`, torch.compile with inductor, fullgraph). Each prompt's two outputs must be equal
token for token; a mismatch is recorded with its position and the dense model's top-2 logit
margin there. Tokens per verification are those the generator actually accepted. `--draft DIR`
uses a draft saved by `ck.save_draft` (e.g. a healed one from bench/speculative.py
--save-drafts) instead of building one.

    python bench/speculative_identity.py [--prompts 32] [--new-tokens 64] [--compile]
        [--device cuda] [--draft DIR] [--out DIR]
Writes <--out, default bench/results>/speculative_identity_smollm2[_draft][_compiled][_cuda]
.json and .md.
"""

import argparse
import json
import time
from pathlib import Path

import torch
from speculative import RESULTS, paragraphs, prompt_ids, split_texts, timed_generation

import curkernels as ck
from curkernels.compress.calibration_sources import as_batches
from curkernels.serve import StaticCacheGenerator
from curkernels.speculative.head import most_frequent_tokens


def markdown(result: dict) -> str:
    r = result
    device = "CPU" if r["device"] == "cpu" else r["device"]
    mode = ("compiled (torch.compile, inductor, fullgraph)" if r["protocol"]["compile"] == "True"
            else "eager")
    lines = ["# Greedy identity of speculative decoding on SmolLM2-135M", "",
             f"Device: {device}; {mode}.",
             "", "| prompts run | tokens each | identical prompts | mismatches | "
             "tokens per verification | tok/s dense | tok/s speculative | complete |",
             "|---|---|---|---|---|---|---|---|",
             f"| {r['prompts_run']} | {r['protocol']['new_tokens']} | {r['identical_prompts']} | "
             f"{r['mismatches'] or 'none'} | {r['tokens_per_verification']:.2f} | "
             f"{r['tokens_per_s_dense']:.2f} | {r['tokens_per_s_speculative']:.2f} | "
             f"{r['complete']} |", "", "Protocol (bench/speculative_identity.py):"]
    lines += [f"- {key}: {value}" for key, value in r["protocol"].items()]
    if r["protocol"].get("draft", "None") != "None":
        lines += ["- the draft is the one saved in --draft: keep, head_tokens, calib and "
                  "head_calib above are unused"]
    lines += [f"- draft_build_seconds: {r['draft_build_seconds']:.1f}"]
    return "\n".join(lines) + "\n"


@torch.no_grad()
def top2_margin(model, ids: torch.Tensor, position: int) -> float:
    """The dense model's gap between its two largest logits predicting token `position`."""
    top = model(ids[:, :position]).logits[0, -1].topk(2).values
    return float(top[0] - top[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--keep", type=float, default=0.5)
    parser.add_argument("--head-tokens", type=int, default=8192)
    parser.add_argument("--calib", type=int, default=8)
    parser.add_argument("--head-calib", type=int, default=400)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--compile", action="store_true", help="both generators compiled")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--draft", type=Path, default=None,
                        help="a saved draft folder (ck.save_draft) instead of building one")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = ck.load_model("smollm2", device=args.device, dtype=torch.float32)
    calib, held_out = split_texts(paragraphs(), args.prompts, max(args.calib, args.head_calib))
    prompts = prompt_ids(tokenizer, held_out, args.prompt_tokens)
    head = most_frequent_tokens(as_batches(calib[:args.head_calib], tokenizer, seq_len=1024),
                                model.config.vocab_size, args.head_tokens)
    start = time.perf_counter()
    draft = (ck.load_draft(args.draft, target=model) if args.draft is not None else
             ck.make_draft(model, keep=args.keep, calib=calib[:args.calib], tokenizer=tokenizer,
                           head_tokens=head))
    build_seconds = time.perf_counter() - start
    length = args.prompt_tokens + args.new_tokens
    dense = StaticCacheGenerator(model, max_seq_len=length, compile=args.compile)
    speculative = StaticCacheGenerator(model, max_seq_len=length, draft=draft,
                                       num_draft_tokens=args.k, compile=args.compile)
    name = "speculative_identity_smollm2" + ("" if args.draft is None else "_draft")
    name += "_compiled" if args.compile else ""
    name += "" if args.device == "cpu" else "_" + torch.device(args.device).type
    args.out.mkdir(parents=True, exist_ok=True)
    if args.compile:  # compile both generators' graphs outside the timed prompts
        timed_generation(dense, prompts[:1], args.new_tokens)
        timed_generation(speculative, prompts[:1], args.new_tokens)
    mismatches, accepted, dense_seconds, speculative_seconds = [], [], 0.0, 0.0
    for index, prompt in enumerate(prompts):
        [expected], dense_rate = timed_generation(dense, [prompt], args.new_tokens)
        [output], speculative_rate = timed_generation(speculative, [prompt], args.new_tokens)
        dense_seconds += args.new_tokens / dense_rate
        speculative_seconds += args.new_tokens / speculative_rate
        accepted += speculative.accepted_per_step
        if not torch.equal(output, expected):
            position = int((output != expected).nonzero()[0, 1])
            mismatches.append(dict(prompt=index, position=position - args.prompt_tokens,
                                   dense_top2_margin=top2_margin(model, expected, position)))
        print(f"prompt {index}: identical {torch.equal(output, expected)}", flush=True)
        tokens = (index + 1) * args.new_tokens
        result = dict(
            protocol=dict(model="SmolLM2-135M-Instruct (fp32)", prompt_source="the last --prompts "
                          "WikiText-2 valid paragraphs of >= 60 words, headings excluded",
                          timing="batch 1, fp32 (on the CPU: shared, under load); with "
                                 "--compile one untimed warm-up generation per generator first",
                          **{key: str(value) for key, value in vars(args).items()}),
            complete=index + 1 == len(prompts), prompts_run=index + 1,
            identical_prompts=index + 1 - len(mismatches), mismatches=mismatches,
            draft_build_seconds=build_seconds,
            tokens_per_verification=(sum(accepted) + len(accepted)) / max(len(accepted), 1),
            device=str(model.device), tokens_per_s_dense=tokens / dense_seconds,
            tokens_per_s_speculative=tokens / speculative_seconds)
        # written after every prompt: a run cut short by its time limit keeps what it checked
        (args.out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
        (args.out / f"{name}.md").write_text(markdown(result))
    print(json.dumps(result, indent=2))
    if mismatches:
        raise SystemExit(f"{len(mismatches)} of {len(prompts)} prompts differ from the dense "
                         f"greedy output")


if __name__ == "__main__":
    main()
