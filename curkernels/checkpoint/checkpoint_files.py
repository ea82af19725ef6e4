"""Which files a local checkpoint folder loads from, and that every one of them (config.json,
the shard index, the weights) resolves inside the folder: a symlink or a shard name leading
elsewhere is refused."""

import json
import os
from pathlib import Path

from huggingface_hub.constants import HF_HUB_CACHE
from transformers.utils import CONFIG_NAME, SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

from .errors import CheckpointError


def allowed_root(folder: Path) -> Path:
    """What files in `folder` may resolve into: the folder itself, or for a snapshot in the
    Hugging Face hub cache its repository folder (snapshot files link to ../../blobs)."""
    folder = folder.resolve()
    cache = Path(HF_HUB_CACHE).resolve()
    if folder.is_relative_to(cache) and folder.parent.name == "snapshots":
        return folder.parent.parent
    return folder


def check_inside(folder: str | os.PathLike, paths) -> None:
    """Refuse files (e.g. symlinks, or shard names holding '..') resolving outside `folder`."""
    root = allowed_root(Path(folder))
    for path in paths:
        resolved = Path(path).resolve()
        if not resolved.is_relative_to(root):
            raise CheckpointError(f"{Path(path).name} resolves to {resolved}, outside the "
                                  f"checkpoint folder {root}: refusing to read it")


def _shards_of(index: Path) -> list[str]:
    try:
        shards = set(json.loads(index.read_text())["weight_map"].values())
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{index}: not a safetensors index (a JSON object whose "
                              f"'weight_map' maps tensor names to files): {exc!r}") from exc
    if not all(isinstance(shard, str) and shard for shard in shards):
        raise CheckpointError(f"{index}: 'weight_map' must map tensor names to file names")
    return sorted(str(index.parent / shard) for shard in shards)


def weight_files(folder: Path) -> list[str] | None:
    """The safetensors files of a local folder, as transformers picks them: those its shard
    index names, else its single file; None where it has neither."""
    index = folder / SAFE_WEIGHTS_INDEX_NAME
    if index.is_file():
        return _shards_of(index)
    single = folder / SAFE_WEIGHTS_NAME
    return [str(single)] if single.is_file() else None


def check_files_inside(folder: Path, files=None) -> None:
    """config.json, the shard index and the weight files (`files`, else the folder's own)
    all resolve inside `folder`."""
    metadata = [folder / name for name in (CONFIG_NAME, SAFE_WEIGHTS_INDEX_NAME)]
    check_inside(folder, [path for path in metadata if path.exists()]
                 + list(files if files is not None else weight_files(folder) or []))
