"""`save_compressed`: a compressed model as a folder transformers can load."""

import json
import os

from torch import nn

from .atomic import atomic_directory
from .module_specs import compression_config
from .output_folder import check_output_folder, is_saved_file
from .plain_guard import mark_checkpoint
from .transformers_integration import CurkernelsConfig

REPORT_FILE = "compression_report.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


def save_compressed(model: nn.Module, out_dir: str | os.PathLike, tokenizer=None, *,
                    overwrite: bool = False, max_shard_size: str | int = "5GB") -> None:
    """Write config.json (with `compression_config` and a `quantization_config` that routes
    `from_pretrained` to curkernels), safetensors weights, the compression report and, when
    given, the tokenizer — atomically: a crash leaves the old folder or the new one.

    `out_dir` may be new, an empty folder, or (with `overwrite=True`) a curkernels checkpoint
    holding only files a save writes; a symlink is followed to its target. Any other folder,
    and the folder the model was loaded from (or one inside it), is refused before anything
    is written (`check_output_folder`).
    """
    config = getattr(model, "config", None)
    if not hasattr(model, "save_pretrained") or config is None:
        raise TypeError(f"model must be a transformers PreTrainedModel, got "
                        f"{type(model).__name__}")
    target = check_output_folder(out_dir, overwrite=overwrite,
                                 source=getattr(config, "_name_or_path", None) or None)
    previous = getattr(config, "compression_config", None) or {}
    block = {**previous, **compression_config(model, previous.get("method"))}
    config.compression_config = block
    config.quantization_config = CurkernelsConfig()
    with atomic_directory(target, writes=is_saved_file) as staging:
        model.save_pretrained(staging, max_shard_size=max_shard_size)
        mark_checkpoint(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        report = getattr(model, "compression_report", None)
        if report is not None:
            (staging / REPORT_FILE).write_text(json.dumps(report.to_dict(), indent=2))
        pickles = [p.name for p in staging.iterdir() if p.suffix in PICKLE_SUFFIXES]
        if pickles:
            raise RuntimeError(f"refusing to write pickle files {pickles}: curkernels "
                               f"checkpoints are safetensors only")
