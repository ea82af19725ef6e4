"""Read a safetensors checkpoint folder one tensor at a time: which shard holds each name."""

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open

from ..checkpoint.checkpoint_files import check_files_inside, weight_files


class ShardReader:
    """The tensors of a folder's `model.safetensors` or of the shards its
    `model.safetensors.index.json` names, read by name without loading the rest."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise FileNotFoundError(f"model folder {str(folder)!r} does not exist")
        files = weight_files(self.folder)
        if not files:
            raise FileNotFoundError(f"model folder {str(folder)!r} holds no model.safetensors "
                                    f"or model.safetensors.index.json: streaming compression "
                                    f"reads safetensors shards")
        check_files_inside(self.folder, files)
        self.files = [Path(file) for file in files]
        self.location: dict[str, Path] = {}
        for file in self.files:
            if not file.is_file():
                raise FileNotFoundError(f"the shard index of {self.folder} names {file.name}, "
                                        f"which is missing")
            with safe_open(file, framework="pt") as handle:
                for name in handle.keys():
                    self.location[name] = file

    def __contains__(self, name: str) -> bool:
        return name in self.location

    @property
    def names(self) -> list[str]:
        return list(self.location)

    def tensors(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """The named tensors, each shard opened once; a missing name is an error naming it."""
        names = list(names)
        missing = [name for name in names if name not in self.location]
        if missing:
            raise KeyError(f"{self.folder} holds no tensor {missing[0]!r}"
                           + (f" (and {len(missing) - 1} more missing)" if len(missing) > 1
                              else ""))
        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.location[name], []).append(name)
        out = {}
        for file, inside in by_file.items():
            with safe_open(file, framework="pt", device="cpu") as handle:
                for name in inside:
                    out[name] = handle.get_tensor(name)
        return {name: out[name] for name in names}

    def total_bytes(self) -> int:
        return sum(file.stat().st_size for file in self.files)

    def fingerprint(self) -> str:
        """Changes when a weight file or config.json is replaced or edited (names, sizes and
        modification times), without reading the weights."""
        digest = hashlib.sha256()
        for path in sorted([*self.files, self.folder / "config.json"]):
            if path.exists():
                stat = path.stat()
                digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns};".encode())
        return digest.hexdigest()
