"""Speculative decoding with CUR drafts that share the dense model's weights, on SmolLM2-135M.

Per draft: per-token agreement α with the dense model's greedy continuation (teacher forced),
tokens per verify step τ(k) for k = 1..8 (greedy acceptance simulated exactly from the
teacher-forced predictions), the draft's bytes read per token c relative to the dense model
(head included), the predicted bandwidth-bound speedup τ(k)/(1 + k·c) at the best k, the
draft's own bytes relative to the dense model's, and measured CPU tokens/s of dense and
speculative greedy decoding (batch 1, eager), whose outputs must be identical.

    python bench/speculative.py --prompts 16 --new-tokens 48
Writes bench/results/speculative.json and .md.
"""

import argparse
import json
import time
from pathlib import Path

import torch
from torch import nn

import curkernels as ck
from curkernels.nn import CURLinear
from curkernels.serve import StaticCacheGenerator
from curkernels.speculative.head import FrequentTokenHead

WIKITEXT = Path("/work/shared/data/wikitext-2/valid.txt")
RESULTS = Path(__file__).resolve().parent / "results"
DRAFTS = {
    "keep0.5-head8k": dict(keep=0.5, head_tokens=8192),
    "skip6-keep0.7-head8k": dict(keep=0.7, skip_layers=6, head_tokens=8192),
    "skip10-dense-head4k": dict(keep={}, skip_layers=10, head_tokens=4096),
}


def paragraphs(min_words: int = 60) -> list[str]:
    return [line.strip() for line in WIKITEXT.read_text().splitlines()
            if len(line.split()) >= min_words and not line.strip().startswith("=")]


def read_bytes_per_token(model: nn.Module) -> int:
    """Weight bytes a decode step reads: every Linear (a CURLinear reads its folded C·U and its
    rows), the head (a frequent-token head its rows); the embedding lookup reads one row."""
    total = 0
    for module in model.modules():
        if isinstance(module, CURLinear):
            total += (module.out_features + module.in_features) * module.rank
        elif isinstance(module, FrequentTokenHead):
            total += module.token_ids.numel() * module.in_features
        elif isinstance(module, nn.Linear):
            total += module.weight.numel()
    return total * 4


def own_bytes(draft: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for m in draft.modules() if isinstance(m, CURLinear)
               for t in (m.C, m.U, m.row_indices, m.col_indices))


def tokens_per_step(matches: list[bool], k: int) -> float:
    """Greedy rounds over one continuation: the first token comes from the prefill; each round
    emits the drafted run that matches (at most k) plus the target's own token."""
    position, rounds = 1, 0
    while position < len(matches):
        run = 0
        while run < k and position + run < len(matches) and matches[position + run]:
            run += 1
        position += run + 1
        rounds += 1
    return (len(matches) - 1) / max(rounds, 1)


@torch.no_grad()
def teacher_forced_matches(draft, prompt, continuation) -> list[bool]:
    ids = torch.cat([prompt, continuation], dim=1)
    predicted = draft(ids).logits[0, prompt.shape[1] - 1:-1].argmax(-1)
    return (predicted == continuation[0]).tolist()


def timed_generation(generator, prompts, new_tokens):
    outputs, start = [], time.perf_counter()
    for prompt in prompts:
        outputs.append(generator.generate(prompt, new_tokens))
    return outputs, len(prompts) * new_tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--calib", type=int, default=32, help="calibration paragraphs")
    parser.add_argument("--heal-steps", type=int, default=0)
    parser.add_argument("--timed-prompts", type=int, default=4)
    parser.add_argument("--drafts", default=",".join(DRAFTS), help=f"of {list(DRAFTS)}")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--name", default="speculative")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = ck.load_model("smollm2", dtype=torch.float32)
    texts = paragraphs()
    calib, held_out = texts[:args.calib], texts[args.calib:args.calib + args.prompts]
    prompts = [tokenizer(t, return_tensors="pt")["input_ids"][:, :args.prompt_tokens]
               for t in held_out]
    length = args.prompt_tokens + args.new_tokens
    dense = StaticCacheGenerator(model, max_seq_len=length)
    continuations = [dense.generate(p, args.new_tokens)[:, p.shape[1]:] for p in prompts]
    _, dense_rate = timed_generation(dense, prompts[:args.timed_prompts], args.new_tokens)
    dense_bytes = read_bytes_per_token(model)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    rows = []
    for name in args.drafts.split(","):
        start = time.perf_counter()
        draft = ck.make_draft(model, calib=calib, tokenizer=tokenizer, **DRAFTS[name])
        if args.heal_steps:
            ck.heal_draft(draft, model, calib, tokenizer=tokenizer, steps=args.heal_steps,
                          seq_len=128, batch_size=4)
        build_seconds = time.perf_counter() - start
        per_prompt = [teacher_forced_matches(draft, p, c)
                      for p, c in zip(prompts, continuations, strict=True)]
        matches = [m for prompt_matches in per_prompt for m in prompt_matches]
        tau = {k: sum(tokens_per_step(m, k) for m in per_prompt) / len(per_prompt)
               for k in range(1, 9)}
        c = read_bytes_per_token(draft) / dense_bytes
        speedup = {k: tau[k] / (1 + k * c) for k in tau}
        best_k = max(speedup, key=speedup.get)
        generator = StaticCacheGenerator(model, max_seq_len=length, draft=draft,
                                         num_draft_tokens=best_k)
        outputs, rate = timed_generation(generator, prompts[:args.timed_prompts],
                                         args.new_tokens)
        identical = all(torch.equal(o[:, p.shape[1]:], cont) for o, p, cont in
                        zip(outputs, prompts, continuations, strict=False))
        rows.append(dict(draft=name, options=DRAFTS[name], heal_steps=args.heal_steps,
                         alpha=sum(matches) / len(matches), tokens_per_step=tau,
                         bytes_per_token_ratio=c, predicted_speedup=speedup[best_k],
                         best_k=best_k, memory_overhead=own_bytes(draft) / model_bytes,
                         cpu_tokens_per_s_dense=dense_rate, cpu_tokens_per_s_speculative=rate,
                         output_identical=identical, build_seconds=build_seconds))
        print(json.dumps(rows[-1]), flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(
        dict(model="SmolLM2-135M-Instruct (GGUF Q4_1, dequantized to fp32)", args=vars(args),
             rows=rows), indent=2) + "\n")
    lines = ["| draft | α | τ(1) | τ(4) | τ(8) | c | best k | predicted × | memory | "
             "CPU tok/s dense | CPU tok/s spec | identical |", "|" + "---|" * 12]
    for r in rows:
        t = r["tokens_per_step"]
        lines.append(f"| {r['draft']} | {r['alpha']:.3f} | {t[1]:.2f} | {t[4]:.2f} | "
                     f"{t[8]:.2f} | {r['bytes_per_token_ratio']:.3f} | {r['best_k']} | "
                     f"{r['predicted_speedup']:.2f} | {r['memory_overhead']:.3f} | "
                     f"{r['cpu_tokens_per_s_dense']:.1f} | "
                     f"{r['cpu_tokens_per_s_speculative']:.1f} | {r['output_identical']} |")
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
