"""End-to-end serving benchmark: dense vs compressed Llama-3.1-8B-shaped models.

    python bench/e2e.py                        # GPU: bf16, writes bench/results/e2e.{json,md,png}
    python bench/e2e.py --paths compiled --batch-sizes 1 --settings dense,curing,keep0.5
    python bench/e2e.py --small                # CPU sanity check, well under a minute

transformers LlamaForCausalLM, random weights (no download), sdpa attention. Settings: dense;
CURing's own (q, k, gate of 10 blocks at r = 256); keep 0.7 and keep 0.5 of every decoder
projection. Paths: eager (static KV cache, no compile) and compiled (the same with
torch.compile fullgraph, CUDA graphs on GPU). Measures prefill latency (2048 tokens, batch 1),
decode tokens/s at batch 1, 8, 32 after a 512-token context, and peak GPU memory. Every
setting is warmed the same way; then the settings are timed in turn, round after round with
the order rotated, and medians reported beside the byte (decode) or FLOP (prefill) bound.
"""

import argparse
import copy
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import e2e_bounds as bounds
import e2e_report as report
import torch
import transformers
from e2e_models import (
    ATTENTION,
    LLAMA_31_8B,
    SMALL,
    Setting,
    compressed_copy,
    dense_model,
    settings_for,
)

from curkernels.nn import prepare_for_inference
from curkernels.ops.settings import ENV_DECODE_CONFIGS, ENV_DECODE_TABLE, ENV_GROUP_TABLE
from curkernels.serve import StaticCacheGenerator
from curkernels.serve.hf_compat import cache_bytes


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", action="store_true",
                        help="tiny model on the CPU: checks that everything runs")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--device", default=None, help="default: cuda when available")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None,
                        help="default: bfloat16 on GPU, float32 on CPU")
    parser.add_argument("--settings", default=None,
                        help="comma list among dense, curing, keep<fraction> (default: all)")
    parser.add_argument("--keeps", default="0.7,0.5", help="keep fractions for the keep settings")
    parser.add_argument("--paths", default="eager,compiled")
    parser.add_argument("--batch-sizes", default=None, help="default 1,8,32 (small: 1,2)")
    parser.add_argument("--prefill-tokens", type=int, default=None, help="default 2048")
    parser.add_argument("--context", type=int, default=None, help="default 512")
    parser.add_argument("--decode-steps", type=int, default=None, help="default 32")
    parser.add_argument("--prefill-chunk-tokens", type=int, default=None,
                        help="tokens (all rows) per forward when filling a decode job's "
                             "context, as a server's chunked prefill (default 4096; 0, and with --small: "
                             "the whole context at once). Bounds activation memory: batch 32 × 512 in one forward "
                             "put the peak 11–17%% above parameters + KV cache on the H200")
    parser.add_argument("--rounds", type=int, default=None, help="default 5")
    parser.add_argument("--eager-decode-rounds", type=int, default=None,
                        help="rounds of the eager decode jobs (default 15; small: --rounds). "
                             "Eager decode is host-bound and its rounds scattered by ±25%% on "
                             "the H200 (e2e_h200/README.md), where compiled rounds agree "
                             "within 0.5%%; more rounds steady its median")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--compiled-settings", default=None,
                        help="settings timed on the compiled path (default: all); each one "
                             "compiles a graph per job")
    parser.add_argument("--time-budget", type=float, default=float("inf"),
                        help="seconds from the first model build: later jobs that would not "
                             "fit are skipped and listed in the JSON")
    parser.add_argument("--factors", choices=["random", "compress"], default=None,
                        help="random factors at the setting's ranks (default on GPU), or run "
                             "curkernels.compress (default with --small)")
    parser.add_argument("--method", default="svd", help="compress method of the keep settings")
    parser.add_argument("--rank-multiple", type=int, default=None,
                        help="round the keep settings' ranks down to a multiple, as a server "
                             "would for tensor cores (default 64; small: 1). Unaligned ranks "
                             "(1433 at keep 0.7 on 4096×4096) made bf16 cuBLAS prefill slow")
    parser.add_argument("--shared-shrinks", action="store_true",
                        help="also time each compressed setting with its factored q/k/v and "
                             "gate/up sharing one stacked shrink factor (share_input_shrinks: "
                             "one Triton launch a group at decode on a GPU, the shared cuBLAS "
                             "chain at prefill), as '<setting>+shared', a copy of the "
                             "setting's model")
    parser.add_argument("--compile-backend", default=None,
                        help="torch.compile backend; default inductor (small on CPU: eager, "
                             "which traces the same fullgraph without compiling C++)")
    args = parser.parse_args(argv)
    small = args.small
    defaults = {"batch_sizes": "1,2" if small else "1,8,32",
                "prefill_tokens": 64 if small else 2048, "context": 32 if small else 512,
                "decode_steps": 4 if small else 32, "rounds": 2 if small else 5,
                "eager_decode_rounds": None if small else 15,
                "factors": "compress" if small else "random",
                "rank_multiple": 1 if small else 64,
                "prefill_chunk_tokens": 0 if small else 4096,
                "device": "cpu" if small or not torch.cuda.is_available() else "cuda"}
    defaults["compile_backend"] = ("eager" if small and defaults["device"] == "cpu"
                                   else "inductor")
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")
    args.prefill_chunk_tokens = args.prefill_chunk_tokens or None  # 0: the whole context
    args.eager_decode_rounds = args.eager_decode_rounds or args.rounds
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    args.paths = args.paths.split(",")
    unknown = set(args.paths) - {"eager", "compiled"}
    if unknown:
        parser.error(f"--paths takes eager and/or compiled, got {sorted(unknown)}")
    return args


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class MemoryTracker:
    """The most a model's runs added on top of what was resident when they started (zero on
    CPU, where torch keeps no allocator statistics)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_extra: dict[str, int] = {}

    def run(self, name: str, fn: Callable[[], float]) -> float:
        if self.device.type != "cuda":
            return fn()
        torch.cuda.reset_peak_memory_stats(self.device)
        resident = torch.cuda.memory_allocated(self.device)
        elapsed = fn()
        extra = torch.cuda.max_memory_allocated(self.device) - resident
        self.peak_extra[name] = max(self.peak_extra.get(name, 0), extra)
        return elapsed


def alternate(runners: dict[str, Callable[[], float]], warmup: int, rounds: int,
              memory: MemoryTracker) -> dict[str, list[float]]:
    """Warm every runner the same number of times, then time them in turn, rotating the
    order each round so that no setting always runs first (or right after another)."""
    names = list(runners)
    for _ in range(warmup):
        for name in names:
            memory.run(name, runners[name])
    samples = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            samples[name].append(memory.run(name, runners[name]))
    return samples


def prefill_runner(generator: StaticCacheGenerator, prompt: torch.Tensor) -> Callable[[], float]:
    def run() -> float:
        synchronize(generator.device)
        start = time.perf_counter()
        generator.prefill(prompt)
        synchronize(generator.device)
        return time.perf_counter() - start
    return run


def decode_runner(generator: StaticCacheGenerator, context: torch.Tensor,
                  steps: int) -> Callable[[], float]:
    def run() -> float:
        tokens = generator.prefill(context).argmax(-1)  # untimed: every round at one context
        position = torch.tensor([context.shape[1]], device=generator.device)
        synchronize(generator.device)
        start = time.perf_counter()
        for _ in range(steps):
            tokens = generator.decode(tokens, position).argmax(-1)
            position += 1
        synchronize(generator.device)
        return time.perf_counter() - start
    return run


def release(device: torch.device, compiled: bool) -> None:
    """Free generators' caches and, after compiled runs, the compiled graphs and their
    CUDA-graph memory, so that the next measurement starts from the same state."""
    if compiled:
        torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def prefill_job(args, compiled: bool, prompt: torch.Tensor):
    def build(model):
        generator = StaticCacheGenerator(model, max_seq_len=args.prefill_tokens + 1,
                                         compile_prefill=compiled,
                                         compile_backend=args.compile_backend)
        return generator, prefill_runner(generator, prompt)
    return build


def decode_job(args, compiled: bool, context: torch.Tensor):
    def build(model):
        generator = StaticCacheGenerator(model, batch_size=context.shape[0], compile=compiled,
                                         max_seq_len=args.context + args.decode_steps + 1,
                                         compile_backend=args.compile_backend,
                                         prefill_chunk_tokens=args.prefill_chunk_tokens)
        return generator, decode_runner(generator, context, args.decode_steps)
    return build


def planned_jobs(args) -> list[tuple[str, str, int]]:
    """(path, metric, batch) in the order they run: the issue's headline measurements (batch-1
    decode and prefill) first, so that a run cut short by --time-budget still has them; then
    the other batch sizes, eager ones (seconds each) before compiled ones (a compile per
    setting)."""
    first, rest = [], []
    for path in args.paths:
        first += [(path, "prefill_ms", 1)] if path == "eager" else []
        first += [(path, "decode_tokens_per_s", b) for b in args.batch_sizes if b == 1]
        first += [(path, "prefill_ms", 1)] if path == "compiled" else []
        rest += [(path, "decode_tokens_per_s", b) for b in args.batch_sizes if b != 1]
    return first + sorted(rest, key=lambda job: job[0] == "compiled")


def job_builder(args, path: str, metric: str, batch: int, prompt: torch.Tensor,
                contexts: dict[int, torch.Tensor]):
    compiled = path == "compiled"
    if metric == "prefill_ms":
        return prefill_job(args, compiled, prompt)
    return decode_job(args, compiled, contexts[batch])


def measure(models: dict, args, device: torch.device, vocab: int,
            on_result: Callable[[list[dict], list[dict]], None]) -> tuple[list[dict], list[dict]]:
    """One record per path, measurement, batch size and setting, and the jobs skipped to stay
    within --time-budget (a job is skipped when the last job of its path, which includes
    compiling on the compiled path, would not fit in what is left)."""
    rng = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab, (1, args.prefill_tokens), generator=rng).to(device)
    contexts = {b: torch.randint(0, vocab, (b, args.context), generator=rng).to(device)
                for b in args.batch_sizes}
    results, skipped = [], []
    last_duration: dict[str, float] = {}
    for path, metric, batch in planned_jobs(args):
        compiled = path == "compiled"
        names = [n for n in models if not compiled or n in args.compiled_settings]
        left = args.time_budget - (time.perf_counter() - args.started)
        needed = last_duration.get(path, 0.0)
        if left <= needed:
            skipped.append({"path": path, "metric": metric, "batch": batch,
                            "why": f"time budget: {left:.0f} s left, the last {path} job "
                                   f"took {needed:.0f} s"})
            print(f"[{path}] skip {metric} at batch {batch}: {skipped[-1]['why']}",
                  file=sys.stderr, flush=True)
            continue
        print(f"[{path}] {metric} at batch {batch} ({', '.join(names)})", file=sys.stderr,
              flush=True)
        job_start = time.perf_counter()
        build = job_builder(args, path, metric, batch, prompt, contexts)
        generators, runners = {}, {}
        for name in names:
            generators[name], runners[name] = build(models[name])
        memory = MemoryTracker(device)
        rounds = (args.eager_decode_rounds if path == "eager" and metric != "prefill_ms"
                  else args.rounds)
        samples = alternate(runners, args.warmup, rounds, memory)
        for name, times in samples.items():
            median = statistics.median(times)
            parameters = bounds.parameter_bytes(models[name])
            kv_cache = cache_bytes(generators[name].cache)
            results.append({
                "path": path, "setting": name, "metric": metric, "batch": batch,
                "value": (median * 1e3 if metric == "prefill_ms"
                          else batch * args.decode_steps / median),
                "seconds": times, "parameter_bytes": parameters, "kv_cache_bytes": kv_cache,
                "peak_memory_bytes": (parameters + kv_cache + memory.peak_extra[name]
                                      if device.type == "cuda" else None)})
        del generators, runners
        release(device, compiled)
        last_duration[path] = time.perf_counter() - job_start
        print(f"[{path}] done in {last_duration[path]:.1f} s", file=sys.stderr, flush=True)
        on_result(results, skipped)
    return results, skipped


def environment(device: torch.device) -> dict:
    return {"device": (torch.cuda.get_device_name(device) if device.type == "cuda"
                       else f"CPU ({platform.processor() or platform.machine()})"),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(),
            # what the decode dispatch, the Triton tile configs and the group dispatch (shared
            # shrinks) read: a run's own files, or the ones the package ships
            "decode_table": os.environ.get(ENV_DECODE_TABLE) or "shipped",
            "decode_configs": os.environ.get(ENV_DECODE_CONFIGS) or "shipped",
            "group_table": os.environ.get(ENV_GROUP_TABLE) or "shipped"}


def main(argv=None) -> None:
    args = parse_args(argv)
    # one step function, one graph per setting and shape (the default limit is 8; torch 2.5
    # calls it cache_size_limit)
    limit = ("recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit")
             else "cache_size_limit")
    setattr(torch._dynamo.config, limit, 64)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if device.type == "cpu":
        # the CPU run is a sanity check of tiny matrices: extra OpenMP threads only spin-wait,
        # and on a busy machine that makes it many times slower
        torch.set_num_threads(1)
    shape = SMALL if args.small else LLAMA_31_8B
    keeps = tuple(float(k) for k in args.keeps.split(","))
    settings = settings_for(keeps)
    if args.settings:
        wanted = args.settings.split(",")
        unknown = set(wanted) - {s.name for s in settings}
        if unknown or "dense" not in wanted:
            sys.exit(f"--settings must include dense and name only "
                     f"{[s.name for s in settings]}; got {wanted}")
        settings = [s for s in settings if s.name in wanted]
    args.started = time.perf_counter()
    dense = dense_model(shape, max(args.prefill_tokens, args.context + args.decode_steps) + 1,
                        device, dtype)
    models, notes = {}, {}
    for setting in settings:
        print(f"building {setting.name}", file=sys.stderr, flush=True)
        model, notes[setting.name] = compressed_copy(
            dense, setting, shape, factors=args.factors, method=args.method,
            rank_multiple=args.rank_multiple, device=device)
        # as `load_for_inference` serves a checkpoint: frozen, CUR links folded
        models[setting.name] = prepare_for_inference(model)
    if args.shared_shrinks:
        for setting in [s for s in settings if s.name != "dense"]:
            shared = Setting(f"{setting.name}+shared",
                             f"{setting.description}; q/k/v and gate/up share one shrink GEMM")
            models[shared.name] = prepare_for_inference(copy.deepcopy(models[setting.name]),
                                                        share_shrinks=True)
            notes[shared.name] = notes[setting.name]
            settings.append(shared)
    args.compiled_settings = (args.compiled_settings.split(",") if args.compiled_settings
                              else list(models))
    unknown = set(args.compiled_settings) - set(models)
    if unknown or "dense" not in args.compiled_settings:
        sys.exit(f"--compiled-settings must include dense and name only {list(models)}; "
                 f"got {args.compiled_settings}")
    summary = {
        "environment": environment(device), "dtype": args.dtype, "attention": ATTENTION,
        "shape": "small" if args.small else "Llama-3.1-8B", "dimensions": vars(shape),
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                    if k != "started"},
        "settings": {s.name: {"description": s.description, "built_with": notes[s.name],
                              "parameter_bytes": bounds.parameter_bytes(models[s.name]),
                              "decode_bytes": bounds.decode_bytes(models[s.name], args.context),
                              "prefill_flops": bounds.prefill_flops(models[s.name],
                                                                    args.prefill_tokens)}
                     for s in settings},
        # the targets are about Llama-3.1-8B shapes on a GPU, not the sanity check
        "targets_apply": not args.small and device.type == "cuda"}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / ("e2e_small" if args.small else "e2e")

    def save(results: list[dict], skipped: list[dict]) -> str:
        """Write what has been measured so far: a run cut short keeps its finished jobs."""
        summary.update(results=results, skipped=skipped,
                       seconds=time.perf_counter() - args.started)
        summary["comparisons"] = report.comparisons(summary)
        summary["checks"] = report.checks(summary)
        table = report.markdown(summary)
        for suffix, text in ((".json", json.dumps(summary, indent=2)), (".md", table)):
            partial = stem.with_name(stem.name + suffix + ".partial")
            partial.write_text(text)
            partial.replace(stem.with_suffix(suffix))
        if not report.plot(summary, stem.with_suffix(".png")):
            table += "\n(matplotlib is not installed: no PNG)\n"
        return table

    print(save(*measure(models, args, device, shape.vocab, save)))


if __name__ == "__main__":
    main()
