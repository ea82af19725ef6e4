"""`curkernels info | compress`: the command line over the Python API."""

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Compress transformers by factoring weights; run the factors fast.")
console = Console()
err_console = Console(stderr=True)

DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
          "bfloat16": "bfloat16", "bf16": "bfloat16"}


def _dtype(name: str | None):
    import torch
    if name is None:
        return None
    if name not in DTYPES:
        raise typer.BadParameter(f"--dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return getattr(torch, DTYPES[name])


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
    model: str = typer.Argument(..., help="model folder, GGUF file or folder holding one (or "
                                "hub name when online)"),
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
    from .checkpoint.checkpoint_files import weight_files
    from .checkpoint.output_folder import check_output_folder
    from .compress import METHODS
    from .compress.api import default_method
    from .compress.calibration_sources import calibration_texts
    from .compress.configs import config_class, option_from_text
    from .compress.shard_reader import ShardReader
    from .compress.skeleton import empty_model
    from .compress.streaming import compress_streaming, fits_in_memory
    from .models import load_dense_model, tokenizer_if_shipped

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
    streaming = stream or resume
    if not streaming and weight_files(Path(model)) and not fits_in_memory(model, _dtype(dtype)):
        console.print(f"{model} would not fit in the memory available: compressing it block by "
                      f"block (as --stream)")
        streaming = True
    if streaming:
        if _device(device) != "cpu":
            raise typer.BadParameter("--stream compresses on the CPU: leave --device out")
        loaded = empty_model(model, ShardReader(model), _dtype(dtype))
        tokenizer = tokenizer_if_shipped(model)
    else:
        loaded, tokenizer = load_dense_model(model, device=_device(device), dtype=_dtype(dtype))
    if config is None:
        config = method_config(default_method(loaded))
    needs_calibration = METHODS[config.method][1]
    picks_layers = layers is not None and "," not in layers
    texts = None
    if needs_calibration or calib is not None or picks_layers:
        if tokenizer is None:
            raise ValueError(f"{model} ships no tokenizer: calibration needs one")
        texts = calibration_texts(calib, num_samples, split=calib_split, unit=calib_unit)
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
    import transformers

    from .checkpoint import load_compressed
    from .compress.calibration import is_causal_lm
    from .eval import embedding_cosine, encode, pair_spearman, perplexity, read_sts_pairs
    from .models import load_dense_model, read_model_config
    if (text is None) == (sts is None):
        raise typer.BadParameter("give exactly one of --text (perplexity) or --sts")
    if reference is not None and sts is None:
        raise typer.BadParameter("--reference compares embeddings: it goes with --sts")
    device = _device(device)
    config = read_model_config(model)
    if getattr(config, "compression_config", None):
        loaded = load_compressed(model, device=device, dtype=_dtype(dtype))
        tokenizer = transformers.AutoTokenizer.from_pretrained(model)
    else:
        loaded, tokenizer = load_dense_model(model, device=device, dtype=_dtype(dtype))
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
            dense, dense_tokenizer = load_dense_model(reference, device=device)
            results["embedding_cosine"] = embedding_cosine(
                encode(dense, dense_tokenizer, left + right), embeddings)
    for key, value in results.items():
        console.print(f"{key}: {value if isinstance(value, str) else f'{value:.4f}'}")
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "eval.json").write_text(json.dumps(results, indent=2))


def main() -> None:
    """Bad input is reported in one line (exit 2), not as a traceback."""
    from .checkpoint import CheckpointError
    try:
        app()
    except (ValueError, TypeError, FileNotFoundError, CheckpointError) as error:
        err_console.print(f"[red]error:[/red] {error}", highlight=False)
        raise SystemExit(2) from None
