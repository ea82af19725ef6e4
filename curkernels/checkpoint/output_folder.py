"""Where a save may write: never over a user's files, the input model, or a checkpoint unasked."""

import json
import os
from fnmatch import fnmatchcase
from pathlib import Path

from transformers.tokenization_utils_base import (
    ADDED_TOKENS_FILE,
    CHAT_TEMPLATE_DIR,
    CHAT_TEMPLATE_FILE,
    FULL_TOKENIZER_FILE,
    SPECIAL_TOKENS_MAP_FILE,
    TOKENIZER_CONFIG_FILE,
)

from .module_specs import FORMAT_NAME

# Every file a curkernels save writes (model, generation config, report, README, tokenizer):
# replacing a folder that holds anything else would delete a user's file.
SAVED_FILE_PATTERNS = (
    "config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json",
    "compression_report.json", "README.md",
    TOKENIZER_CONFIG_FILE, FULL_TOKENIZER_FILE, SPECIAL_TOKENS_MAP_FILE, ADDED_TOKENS_FILE,
    CHAT_TEMPLATE_FILE, "chat_template.json", f"{CHAT_TEMPLATE_DIR}/*.jinja",
    "vocab.txt", "vocab.json", "merges.txt", "*.model", "*.tiktoken",
)
SHOWN_ENTRIES = 8


def is_saved_file(relative: str) -> bool:
    """Whether a save writes a file at this folder-relative posix path."""
    return any(relative.count("/") == pattern.count("/") and fnmatchcase(relative, pattern)
               for pattern in SAVED_FILE_PATTERNS)


def foreign_entries(folder: Path) -> list[str]:
    """Files and folders under `folder` (relative, sorted) that a save would not write."""
    foreign = []
    for root, folders, files in os.walk(folder):
        base = Path(root).relative_to(folder)
        for name in folders:
            if (base / name).as_posix() != CHAT_TEMPLATE_DIR:
                foreign.append(f"{(base / name).as_posix()}/")
        folders[:] = [name for name in folders if (base / name).as_posix() == CHAT_TEMPLATE_DIR]
        foreign += [(base / name).as_posix() for name in files
                    if not is_saved_file((base / name).as_posix())]
    return sorted(foreign)


def is_curkernels_checkpoint(folder: Path) -> bool:
    """config.json holds a `compression_config` block of the curkernels format."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    block = config.get("compression_config") if isinstance(config, dict) else None
    return isinstance(block, dict) and block.get("format") == FORMAT_NAME


def _listing(entries: list[str]) -> str:
    shown = ", ".join(entries[:SHOWN_ENTRIES])
    more = len(entries) - SHOWN_ENTRIES
    return shown + (f" and {more} more" if more > 0 else "")


def check_output_folder(out: str | os.PathLike, *, overwrite: bool = False,
                        source: str | os.PathLike | None = None) -> Path:
    """The real folder (symlinks resolved) a save of `out` may replace; raises ValueError
    naming `out` when it may not: `out` is, holds or lies inside the `source` model folder, is
    a folder that is not a curkernels checkpoint (an empty folder is fine), is a checkpoint
    holding files a save would not write, or is a checkpoint and `overwrite` is False.
    Writes nothing, so the command line runs it before a long compression.
    """
    real = Path(out).expanduser().resolve()
    shown = f"out {str(out)!r}" + (f" (a link to {real})" if Path(out).is_symlink() else "")
    if source is not None and Path(source).is_dir():
        model_folder = Path(source).resolve()
        relation = ("is" if real == model_folder else "is inside" if model_folder in real.parents
                    else "holds" if real in model_folder.parents else None)
        if relation:
            raise ValueError(f"{shown} {relation} the input model folder {model_folder}: saving "
                             f"there would replace the model being compressed; choose another "
                             f"output folder")
    if not real.exists():
        return real
    if not real.is_dir():
        raise ValueError(f"{shown} exists and is not a folder")
    entries = sorted(p.name + ("/" if p.is_dir() else "") for p in real.iterdir())
    if not entries:
        return real
    if not is_curkernels_checkpoint(real):
        raise ValueError(f"{shown} exists and is not a curkernels checkpoint (it holds "
                         f"{_listing(entries)}): saving replaces the whole folder, so choose a "
                         f"new or empty folder")
    foreign = foreign_entries(real)
    if foreign:
        raise ValueError(f"{shown} holds a curkernels checkpoint and also "
                         f"{_listing(foreign)}, which a save does not write: replacing the folder "
                         f"would delete them, and overwrite=True does not allow that; move them "
                         f"out or choose another folder")
    if not overwrite:
        raise ValueError(f"{shown} already holds a curkernels checkpoint: pass overwrite=True "
                         f"(--overwrite on the command line) to replace it")
    return real
