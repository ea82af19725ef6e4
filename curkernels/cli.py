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
    table.add_row("CUDA extension", report["extension"])
    table.add_row("GPUs", ", ".join(report["gpus"]) or "none")
    for name, state in report["backends"].items():
        table.add_row(f"backend {name} ({report['device']})", state)
    console.print(table)


@app.command()
def compress(
    model: str = typer.Argument(..., help="model folder (or hub name when online)"),
    out: Path = typer.Argument(..., help="output folder for the compressed checkpoint"),
    method: str = typer.Option("svd", help="compression method"),
    keep: float = typer.Option(0.5, help="fraction of the targeted weights kept, in (0, 1]"),
    targets: list[str] = typer.Option(None, "--target", help="name pattern of Linears to "
                                      "factor (repeatable); method default when omitted"),
    rank_multiple: int = typer.Option(1, help="round ranks down to a multiple"),
    device: str = typer.Option("cpu", help="device to compress on"),
    dtype: str = typer.Option(None, help="dtype to load the model in (default: as saved)"),
):
    """Compress a transformers model and save it as a curkernels checkpoint."""
    from . import compress as run_compress
    from . import save_compressed
    from .models import load_dense_model
    loaded, tokenizer = load_dense_model(model, device=device, dtype=_dtype(dtype))
    report = run_compress(loaded, method=method, keep=keep, targets=targets or None,
                          rank_multiple=rank_multiple)
    console.print(str(report), highlight=False)
    save_compressed(loaded, out, tokenizer=tokenizer)
    console.print(f"saved to {out}")


def main() -> None:
    """Bad input is reported in one line (exit 2), not as a traceback."""
    from .checkpoint import CheckpointError
    try:
        app()
    except (ValueError, TypeError, FileNotFoundError, CheckpointError) as error:
        err_console.print(f"[red]error:[/red] {error}", highlight=False)
        raise SystemExit(2) from None
