"""A GGUF file as a plain transformers folder (config, safetensors, tokenizer), cached on disk.

transformers reads GGUF (`from_pretrained(folder, gguf_file=...)`, dequantising to float32),
but every later load would dequantise again, and a model loaded that way cannot
`save_pretrained`. So the folder is written once — the model rebuilt from its config on the
meta device and filled with `load_state_dict(assign=True)` — under
`$CURKERNELS_CACHE_DIR/gguf/<name>-<content hash>/`, atomically, and reused after that.
"""

import hashlib
import os
from pathlib import Path

import torch
import transformers

from .atomic import atomic_directory

GGUF_SUFFIX = ".gguf"
_HASH_CHUNK = 1 << 22


def cache_root() -> Path:
    """`$CURKERNELS_CACHE_DIR`, default ~/.cache/curkernels (shared with the Triton tuner)."""
    return Path(os.environ.get("CURKERNELS_CACHE_DIR") or Path.home() / ".cache" / "curkernels")


def find_gguf(path: str | os.PathLike) -> Path | None:
    """The GGUF file `path` names: the file itself, or the one GGUF inside a folder that holds
    no config.json. None when `path` is no GGUF (an ordinary model folder or a hub name)."""
    path = Path(path)
    if path.is_file():
        return path if path.suffix.lower() == GGUF_SUFFIX else None
    if not path.is_dir() or (path / "config.json").is_file():
        return None
    found = sorted(p for p in path.iterdir() if p.suffix.lower() == GGUF_SUFFIX and p.is_file())
    if len(found) > 1:
        raise ValueError(f"{path} holds {len(found)} GGUF files "
                         f"({', '.join(p.name for p in found)}): name the one to load")
    return found[0] if found else None


def _content_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def materialize_gguf(gguf_file: str | os.PathLike, cache_dir: str | os.PathLike | None = None
                     ) -> Path:
    """The transformers folder of `gguf_file` (config.json, model.safetensors in float32,
    tokenizer files), written on the first call and read from the cache after that.

    The cache key is the file's content, so an edited or replaced GGUF is converted anew.
    `cache_dir` defaults to `cache_root() / "gguf"`.
    """
    gguf_file = Path(gguf_file)
    if not gguf_file.is_file():
        raise FileNotFoundError(f"gguf_file {str(gguf_file)!r} does not exist")
    if gguf_file.suffix.lower() != GGUF_SUFFIX:
        raise ValueError(f"gguf_file must be a {GGUF_SUFFIX} file, got {str(gguf_file)!r}")
    root = Path(cache_dir) if cache_dir is not None else cache_root() / "gguf"
    folder = root / f"{gguf_file.stem}-{_content_hash(gguf_file)}"
    if (folder / "config.json").is_file():
        return folder
    source, name = str(gguf_file.parent), gguf_file.name
    try:
        config = transformers.AutoConfig.from_pretrained(source, gguf_file=name)
        tokenizer = transformers.AutoTokenizer.from_pretrained(source, gguf_file=name)
        loaded = transformers.AutoModelForCausalLM.from_pretrained(source, gguf_file=name,
                                                                  dtype=torch.float32)
    except ImportError as error:
        raise ImportError(f"reading {name} needs the gguf package: pip install gguf "
                          f"({error})") from error
    config.dtype = torch.float32
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # a GGUF-loaded model refuses save_pretrained: move its tensors into a plain one
    model.load_state_dict(loaded.state_dict(), assign=True, strict=False)
    model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise ValueError(f"{name} holds no tensor for {missing[:5]} (architecture "
                         f"{type(model).__name__})")
    with atomic_directory(folder) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    return folder
