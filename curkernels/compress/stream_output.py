"""Publish a streaming run's shards as a curkernels checkpoint — the shard index, config.json
with its compression_config, the tokenizer and the report — through the atomic save, so OUT
holds its old content or the whole new checkpoint, never part of one."""

import json
import os
import shutil
from pathlib import Path

from torch import nn
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME

from ..checkpoint.atomic import atomic_directory
from ..checkpoint.module_specs import compression_config_of
from ..checkpoint.output_folder import check_output_folder, is_saved_file
from ..checkpoint.plain_guard import mark_checkpoint
from ..checkpoint.save import REPORT_FILE
from ..checkpoint.transformers_integration import CurkernelsConfig
from .report import CompressionReport
from .stream_progress import StreamProgress


def shard_name(position: int, count: int) -> str:
    """transformers' shard naming, `model-00001-of-00018.safetensors` (1-based)."""
    return f"model-{position:05d}-of-{count:05d}.safetensors"


def _link_or_copy(source: Path, destination: Path) -> None:
    """A hard link (OUT's staging folder is beside the work folder, on its file system);
    a copy where the file system has no links."""
    try:
        os.link(source, destination)
    except OSError:
        shutil.copyfile(source, destination)


def publish(target: Path, progress: StreamProgress, model: nn.Module, metadata: dict,
            modules: dict[str, dict], report: CompressionReport, *, overwrite: bool,
            source: str, tokenizer=None, generation_config=None) -> None:
    """Write OUT from the finished steps `progress` records. OUT is checked again first (the
    run may have been long): a folder that is not a curkernels checkpoint is never replaced."""
    check_output_folder(target, overwrite=overwrite, source=source)
    weight_map, total_size = {}, 0
    for entry in progress.record["blocks"].values():
        weight_map.update(entry["weight_map"])
        total_size += entry["tensor_bytes"]
    config = model.config
    config.architectures = [type(model).__name__]
    config.compression_config = {**metadata, **compression_config_of(modules,
                                                                     metadata["method"])}
    config.quantization_config = CurkernelsConfig()
    with atomic_directory(target, writes=is_saved_file) as staging:
        for file in sorted(set(weight_map.values())):
            _link_or_copy(progress.shard_path(file), staging / file)
        index = {"metadata": {"total_size": total_size},
                 "weight_map": dict(sorted(weight_map.items()))}
        (staging / SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        config.save_pretrained(staging)
        if generation_config is not None:
            generation_config.save_pretrained(staging)
        mark_checkpoint(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        (staging / REPORT_FILE).write_text(json.dumps(report.to_dict(), indent=2))
