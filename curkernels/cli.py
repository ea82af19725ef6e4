"""`curkernels info | compress | eval | generate | serve`: the command line over the Python API.
python/generate.py and python/serve.py run `generate` and `serve` as programs of their own."""

import functools
import inspect
import json
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Compress transformers by factoring weights; run the factors fast.")
console = Console()
err_console = Console(stderr=True)

DTYPES = {"auto": None, "float32": "float32", "fp32": "float32", "float16": "float16",
          "fp16": "float16", "bfloat16": "bfloat16", "bf16": "bfloat16"}

# the options every command that runs a model for generation takes
ModelReference = Annotated[str, typer.Argument(
    metavar="MODEL", help="curkernels checkpoint, transformers folder, GGUF file or folder "
    "holding one, bundled model name ('smollm2'), or hub name when online")]
DeviceOption = Annotated[str | None, typer.Option(help="default: cuda when available, else cpu")]
DtypeOption = Annotated[str, typer.Option(help="float32 | float16 | bfloat16, or auto (as "
                                          "saved)")]
CompileOption = Annotated[bool, typer.Option("--compile", help="torch.compile the decode step "
                                             "(CUDA graphs on a GPU)")]
ShareShrinksOption = Annotated[bool, typer.Option(
    "--share-shrinks", help="factored q/k/v and gate/up read their stacked shrink factors in "
    "one pass (curkernels.nn.share_input_shrinks)")]
TokenizerOption = Annotated[str | None, typer.Option(help="tokenizer folder or hub name "
                                                     "(default: the model's)")]
DraftOption = Annotated[Path | None, typer.Option(
    help="decode speculatively with this draft (curkernels.save_draft), cut from MODEL: the "
    "output stays MODEL's own")]
NumDraftTokensOption = Annotated[int, typer.Option(min=1, help="tokens drafted per "
                                                   "verification (with --draft)")]


def _dtype(name: str | None):
    import torch
    if name is None:
        return None
    if name not in DTYPES:
        raise typer.BadParameter(f"--dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return None if DTYPES[name] is None else getattr(torch, DTYPES[name])


def _device(name: str) -> str:
    """`name` if this machine can place tensors there, else a clear error (torch's own is
    about drivers or build flags)."""
    import torch
    try:
        device = torch.device(name)
    except RuntimeError:
        raise typer.BadParameter(f"--device must be a torch device such as 'cpu', 'cuda' or "
                                 f"'cuda:1', got {name!r}") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise typer.BadParameter(f"--device {name}: no CUDA GPU is usable here; use "
                                     f"--device cpu")
        if device.index is not None and device.index >= count:
            raise typer.BadParameter(f"--device {name}: this machine has {count} CUDA "
                                     f"GPU{'s' * (count > 1)} (cuda:0..cuda:{count - 1})")
    elif device.type != "cpu":
        try:
            torch.empty(0, device=device)
        except (RuntimeError, AssertionError) as error:
            raise typer.BadParameter(f"--device {name} is not usable here: {error}") from None
    return name


@app.command()
def info(as_json: bool = typer.Option(False, "--json", help="machine-readable output")):
    """Versions, whether curkernels._C was built and imports, GPUs, and live backends."""
    from .environment import environment_report
    report = environment_report()
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    table = Table(title="curkernels", show_header=False)
    for key in ("curkernels", "python", "torch", "torch_cuda", "triton", "transformers"):
        table.add_row(key, str(report[key]))
    table.add_row("Triton decode kernel", report["triton_features"])
    table.add_row("CUDA extension", report["extension"])
    table.add_row("GPUs", ", ".join(report["gpus"]) or "none")
    for name, state in report["backends"].items():
        table.add_row(f"backend {name} ({report['device']})", state)
    for gpu, state in report["graph_decode"].items():
        table.add_row(f"CUDA-graph decode on {gpu}", state)
    table.add_row("decode tables", ", ".join(report["decode_tables"]) or "none")
    table.add_row("Triton decode configs", ", ".join(report["decode_configs"]) or "none")
    console.print(table)


@app.command()
def compress(
    model: str = typer.Argument(..., help="dense model: transformers folder, GGUF file or "
                                "folder holding one, bundled model name ('smollm2'), or hub name "
                                "when online"),
    out: Path = typer.Argument(..., help="output folder for the compressed checkpoint"),
    method: str = typer.Option(None, help="svd | asvd | svdllm | curing | rom | lpaf | pairwise "
                               "(default: pairwise for decoder LMs, svd otherwise)"),
    keep: float = typer.Option(None, help="fraction of the targeted weights kept, in (0, 1] "
                               "(default 0.5)"),
    preset: str = typer.Option(None, help="ROM paper setting '90%', '80%' or '50%' (sets keep "
                               "and layers; method rom)"),
    targets: list[str] = typer.Option(None, "--target", help="name pattern of Linears to "
                                      "factor (repeatable); method default when omitted"),
    layers: str = typer.Option(None, help="block indices '3,5,7', or a count N to pick the N "
                               "blocks of smallest angular distance; method default when omitted"),
    calib: str = typer.Option(None, help="calibration text file or datasets name "
                              "('name' or 'name:config'); offline default text when omitted"),
    calib_split: str = typer.Option("train", help="split of a datasets calibration source"),
    num_samples: int = typer.Option(128, min=1, help="calibration texts (or sentences)"),
    calib_unit: str = typer.Option("text", help="'text': each line / row is one sample; "
                                   "'sentence': each of their sentences is (suits sentence "
                                   "encoders)"),
    seq_len: int = typer.Option(256, min=1, help="calibration tokens per text (truncated)"),
    batch_size: int = typer.Option(8, min=1, help="calibration batch size"),
    rank_multiple: int = typer.Option(1, min=1, help="round ranks down to a multiple"),
    option: list[str] = typer.Option(None, "--option", help="method option KEY=VALUE, e.g. "
                                     "selection=qdeim, max_rank=256, alpha=0.5 (repeatable); "
                                     "the fields of the method's config class, type-checked"),
    device: str = typer.Option("cpu", help="device to compress on"),
    dtype: str = typer.Option(None, help="dtype to load the model in (default: as saved)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace OUT when it holds a "
                                   "curkernels checkpoint (any other non-empty OUT is refused)"),
    stream: bool = typer.Option(False, "--stream", help="compress block by block from the "
                                "safetensors shards: memory holds one block and the calibration "
                                "activations (chosen by itself when the model would not fit)"),
    resume: bool = typer.Option(False, "--resume", help="continue a killed --stream run into "
                                "OUT (a matching unfinished run is continued anyway; with "
                                "--resume one must exist)"),
):
    """Compress a transformers model and save it as a curkernels checkpoint."""
    from . import compress as run_compress
    from . import save_compressed
    from .checkpoint import load_model
    from .checkpoint.checkpoint_files import weight_files
    from .checkpoint.model_reference import tokenizer_if_shipped
    from .checkpoint.output_folder import check_output_folder, is_curkernels_checkpoint
    from .compress import METHODS
    from .compress.api import default_method
    from .compress.calibration_sources import calibration_texts
    from .compress.configs import config_class, option_from_text
    from .compress.shard_reader import ShardReader
    from .compress.skeleton import empty_model
    from .compress.streaming import compress_streaming, fits_in_memory, return_freed_memory

    def parse_layers(text: str | None):
        if text is None:
            return None
        try:
            values = [int(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise typer.BadParameter(f"--layers must be integers ('3,5,7' or a count), got "
                                     f"{text!r}") from None
        return values if "," in text else values[0]

    def parse_options(method: str, pairs: list[str]) -> dict:
        """KEY=VALUE strings, each value parsed by the type of the method's config field."""
        options = {}
        for pair in pairs:
            key, sep, value = pair.partition("=")
            if not sep or not key.strip():
                raise typer.BadParameter(f"--option must be KEY=VALUE, got {pair!r}")
            try:
                options[key.strip()] = option_from_text(method, key.strip(), value)
            except ValueError as error:
                raise typer.BadParameter(f"--option {pair!r}: {error}") from None
        return options

    def method_config(method: str):
        return config_class(method)(keep=keep, targets=targets or None,
                                    layers=parse_layers(layers), preset=preset,
                                    rank_multiple=rank_multiple,
                                    **parse_options(method, option or []))

    # every argument (the config, OUT) is checked before the model is read; without --method
    # the config waits for the model, whose kind picks the method
    config = None if method is None else method_config(method)
    check_output_folder(out, overwrite=overwrite, source=model)
    if is_curkernels_checkpoint(Path(model)):
        raise ValueError(f"{model} is already a curkernels checkpoint: compress the dense model "
                         f"it was made from")
    streaming = stream or resume
    if not streaming and weight_files(Path(model)) and not fits_in_memory(model, _dtype(dtype)):
        console.print(f"{model} would not fit in the memory available: compressing it block by "
                      f"block (as --stream)")
        streaming = True
    if streaming:
        if _device(device) != "cpu":
            raise typer.BadParameter("--stream compresses on the CPU: leave --device out")
        return_freed_memory()  # this process only streams: its allocator may be tuned for it
        loaded = empty_model(model, ShardReader(model), _dtype(dtype))
        tokenizer = tokenizer_if_shipped(model)
    else:
        loaded, tokenizer = load_model(model, device=_device(device), dtype=_dtype(dtype))
    if config is None:
        config = method_config(default_method(loaded))
    needs_calibration = METHODS[config.method][1]
    picks_layers = layers is not None and "," not in layers
    texts = None
    if needs_calibration or calib is not None or picks_layers:
        if tokenizer is None:
            raise ValueError(f"{model} ships no tokenizer: calibration needs one")
        texts = calibration_texts(calib, num_samples, split=calib_split, unit=calib_unit,
                                  tokenizer=tokenizer)
    calibration = {"calib": texts, "tokenizer": tokenizer, "seq_len": seq_len,
                   "batch_size": batch_size}
    if streaming:
        report = compress_streaming(model, out, config, **calibration, dtype=_dtype(dtype),
                                    overwrite=overwrite, resume=resume, log=console.print)
        console.print(str(report), highlight=False)
    else:
        report = run_compress(loaded, config, **calibration)
        console.print(str(report), highlight=False)
        save_compressed(loaded, out, tokenizer=tokenizer, overwrite=overwrite)
    console.print(f"saved to {out}")


@app.command("eval")
def evaluate(
    model: str = typer.Argument(..., help="compressed checkpoint or dense model folder"),
    text: Path = typer.Option(None, help="text file: perplexity (causal LMs)"),
    sts: Path = typer.Option(None, help="STS TSV (genre, file, year, id, score, s1, s2): "
                             "Spearman×100 of mean-pooled embeddings (encoders)"),
    reference: str = typer.Option(None, help="dense model folder: also report the embedding "
                                  "cosine to it (with --sts)"),
    window: int = typer.Option(1024, help="perplexity window (tokens)"),
    stride: int = typer.Option(512, help="perplexity stride (tokens)"),
    max_tokens: int = typer.Option(None, help="score at most this many tokens of --text"),
    device: str = typer.Option("cpu", help="device to evaluate on"),
    dtype: str = typer.Option(None, help="dtype to load the model in (default: as saved)"),
    out: Path = typer.Option(None, help="folder to write eval.json into"),
):
    """Fidelity of a (compressed) model: perplexity on a text, or STS correlation."""
    from .checkpoint import load_model
    from .compress.calibration import is_causal_lm
    from .eval import embedding_cosine, encode, pair_spearman, perplexity, read_sts_pairs
    if (text is None) == (sts is None):
        raise typer.BadParameter("give exactly one of --text (perplexity) or --sts")
    if reference is not None and sts is None:
        raise typer.BadParameter("--reference compares embeddings: it goes with --sts")
    device = _device(device)
    loaded, tokenizer = load_model(model, device=device, dtype=_dtype(dtype))
    if tokenizer is None:
        raise ValueError(f"{model} ships no tokenizer: evaluation needs one")
    kind = type(loaded).__name__
    if text is not None and not is_causal_lm(loaded):
        raise typer.BadParameter(f"--text scores perplexity, which needs a causal LM; {model} "
                                 f"is a {kind}: use --sts for a sentence encoder")
    if sts is not None and is_causal_lm(loaded):
        raise typer.BadParameter(f"--sts scores mean-pooled sentence embeddings of an encoder; "
                                 f"{model} is a causal LM ({kind}): use --text")
    results = {"model": model}
    if text is not None:
        results["perplexity"] = perplexity(loaded, tokenizer, text, window=window,
                                           stride=stride, max_tokens=max_tokens)
    else:
        left, right, scores = read_sts_pairs(sts)
        embeddings = encode(loaded, tokenizer, left + right)
        results["sts_spearman"] = pair_spearman(embeddings[:len(left)],
                                                embeddings[len(left):], scores)
        if reference is not None:
            dense, dense_tokenizer = load_model(reference, device=device)
            results["embedding_cosine"] = embedding_cosine(
                encode(dense, dense_tokenizer, left + right), embeddings)
    for key, value in results.items():
        console.print(f"{key}: {value if isinstance(value, str) else f'{value:.4f}'}")
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "eval.json").write_text(json.dumps(results, indent=2))


@dataclass(frozen=True)
class GenerationOptions:
    """The options of every command that runs a model for generation (`generate`, `serve`),
    declared once: `takes_generation_options` gives a command each field as an option."""
    draft: DraftOption = None
    num_draft_tokens: NumDraftTokensOption = 4
    device: DeviceOption = None
    dtype: DtypeOption = "auto"
    compile: CompileOption = False
    share_shrinks: ShareShrinksOption = False
    tokenizer: TokenizerOption = None

    def load(self, model: str):
        """(MODEL frozen for inference, its tokenizer, the draft or None)."""
        from .serve import load_for_inference
        from .speculative import load_draft
        loaded, tokenizer = load_for_inference(
            model, None if self.device is None else _device(self.device), _dtype(self.dtype),
            self.tokenizer, share_shrinks=self.share_shrinks)
        draft = None if self.draft is None else load_draft(self.draft, target=loaded)
        return loaded, tokenizer, draft


def takes_generation_options(command):
    """`command(..., options: GenerationOptions)` as typer sees it: every field of
    GenerationOptions an option of its own, after the command's, gathered into `options`."""
    names = [field.name for field in fields(GenerationOptions)]
    signature = inspect.signature(command)
    shared = [inspect.Parameter(field.name, inspect.Parameter.KEYWORD_ONLY, default=field.default,
                                annotation=field.type) for field in fields(GenerationOptions)]

    @functools.wraps(command)
    def run(*args, **kwargs):
        options = GenerationOptions(**{name: kwargs.pop(name) for name in names})
        return command(*args, options=options, **kwargs)

    run.__signature__ = signature.replace(parameters=[
        *(p for p in signature.parameters.values() if p.name != "options"), *shared])
    return run


@app.command()
@takes_generation_options
def generate(
    model: ModelReference,
    prompt: Annotated[str, typer.Argument(metavar="PROMPT", help="text to continue")],
    max_new_tokens: Annotated[int, typer.Option(min=1, help="tokens to generate")] = 64,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 is greedy")] = 0.0,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0, help="nucleus sampling mass")] = 1.0,
    seed: Annotated[int | None, typer.Option(help="sampling seed")] = None,
    *, options: GenerationOptions,
):
    """Continue PROMPT with MODEL, streaming the text to stdout (timings to stderr)."""
    import torch

    from .serve import IncrementalDetokenizer, StaticCacheGenerator, end_of_sequence_ids
    loaded, loaded_tokenizer, draft_model = options.load(model)
    input_ids = loaded_tokenizer(prompt, return_tensors="pt")["input_ids"]
    generator = StaticCacheGenerator(loaded, max_seq_len=input_ids.shape[1] + max_new_tokens,
                                     compile=options.compile, draft=draft_model,
                                     num_draft_tokens=options.num_draft_tokens)
    stops = end_of_sequence_ids(loaded, loaded_tokenizer)
    detokenizer = IncrementalDetokenizer(loaded_tokenizer)
    typer.echo(prompt, nl=False)
    start, first, count = time.perf_counter(), None, 0
    for tokens in generator.stream(input_ids, max_new_tokens, temperature=temperature,
                                   top_p=top_p, eos_token_ids=stops, seed=seed):
        first = first or time.perf_counter()
        count += 1
        if int(tokens[0]) in stops:
            break
        typer.echo(detokenizer.push(int(tokens[0])), nl=False)
    typer.echo(detokenizer.finish(), nl=False)
    if loaded.device.type == "cuda":
        torch.cuda.synchronize()
    end = time.perf_counter()
    rate = f", then {(count - 1) / (end - first):.1f} tokens/s" if count > 1 else ""
    steps = ""
    if draft_model is not None and generator.accepted_per_step:
        steps = f"; {(count - 1) / len(generator.accepted_per_step):.2f} tokens per verification"
    typer.echo(f"\n[{count} tokens; first after {first - start:.2f} s{rate}{steps}]", err=True)


@app.command()
@takes_generation_options
def serve(
    model: ModelReference,
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="port to listen on")] = 8000,
    model_name: Annotated[str | None, typer.Option(help="the name requests give (default: the "
                                                   "model folder's name)")] = None,
    max_seq_len: Annotated[int, typer.Option(min=2, help="prompt + completion tokens (the KV "
                                             "cache length)")] = 2048,
    max_queued: Annotated[int, typer.Option(min=1, help="requests admitted at once; more get "
                                            "429")] = 32,
    max_body_bytes: Annotated[int | None, typer.Option(
        min=1, help="larger request bodies get 413 without being read (default 1 MiB)")] = None,
    graceful_seconds: Annotated[int, typer.Option(min=0, help="on SIGTERM, how long the running "
                                                  "request may take to finish")] = 30,
    prefill_chunk_tokens: Annotated[int | None, typer.Option(
        min=1, help="run long prompts through prefill in chunks of this many tokens (bounds "
        "activation memory); default: one forward")] = None,
    *, options: GenerationOptions,
):
    """Serve MODEL over an OpenAI-style HTTP API (/v1/completions; needs the serve extra).

    Requests run one at a time in arrival order. Ctrl-C or SIGTERM stops taking requests (503),
    answers the queued ones 503 at once, gives the running one up to --graceful-seconds, and
    exits."""
    import uvicorn

    from .serve import StaticCacheGenerator
    from .serve.draining import DrainingServer
    from .serve.engine import CompletionEngine
    from .serve.server import DEFAULT_MAX_BODY_BYTES, create_app
    loaded, loaded_tokenizer, draft_model = options.load(model)
    generator = StaticCacheGenerator(loaded, max_seq_len=max_seq_len, compile=options.compile,
                                     prefill_chunk_tokens=prefill_chunk_tokens, draft=draft_model,
                                     num_draft_tokens=options.num_draft_tokens)
    engine = CompletionEngine(generator, loaded_tokenizer, max_queued=max_queued)
    engine.warm_up()  # compile before the first request rather than during it
    served = create_app(engine, model_name or Path(model).resolve().name,
                        max_body_bytes=max_body_bytes or DEFAULT_MAX_BODY_BYTES)
    DrainingServer(uvicorn.Config(served, host=host, port=port,
                                  timeout_graceful_shutdown=graceful_seconds), engine).run()


def run_program(command) -> None:
    """Run one command of this CLI as a program of its own (python/generate.py, serve.py):
    its arguments at top level, bad input reported as `main` reports it."""
    program = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    program.command()(command)
    _report_bad_input(program)


def main() -> None:
    _report_bad_input(app)


def _report_bad_input(program: typer.Typer) -> None:
    """Run `program`; bad input is reported in one line (exit 2), not as a traceback."""
    from .checkpoint import CheckpointError
    try:
        program()
    except (ValueError, TypeError, FileNotFoundError, CheckpointError) as error:
        err_console.print(f"[red]error:[/red] {error}", highlight=False)
        raise SystemExit(2) from None
