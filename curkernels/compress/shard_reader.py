"""Read a safetensors checkpoint folder one tensor at a time: which shard holds each name."""

import hashlib
import os
from collections.abc import Iterable, Iterator
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

    def _check_names(self, names: list[str]) -> None:
        missing = [name for name in names if name not in self.location]
        if missing:
            raise KeyError(f"{self.folder} holds no tensor {missing[0]!r}"
                           + (f" (and {len(missing) - 1} more missing)" if len(missing) > 1
                              else ""))

    def tensors(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """The named tensors, each shard opened once; a missing name is an error naming it."""
        names = list(names)
        self._check_names(names)
        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.location[name], []).append(name)
        out = {}
        for file, inside in by_file.items():
            with safe_open(file, framework="pt", device="cpu") as handle:
                for name in inside:
                    out[name] = handle.get_tensor(name)
        return {name: out[name] for name in names}

    def shape_and_dtype(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        self._check_names([name])
        with safe_open(self.location[name], framework="pt", device="cpu") as handle:
            view = handle.get_slice(name)
            shape = tuple(view.get_shape())
            return shape, view[:0].dtype if shape else handle.get_tensor(name).dtype

    def row_blocks(self, name: str, block_bytes: int = 64 << 20) -> Iterator[torch.Tensor]:
        """The tensor `name` a block of rows (about `block_bytes`) at a time; the file is
        mapped afresh for each block, so the blocks already read leave no pages resident."""
        shape, dtype = self.shape_and_dtype(name)
        if not shape:
            yield self.tensors([name])[name]
            return
        row_bytes = max(1, torch.Size(shape[1:]).numel() * dtype.itemsize)
        rows = max(1, block_bytes // row_bytes)
        for start in range(0, shape[0], rows):
            with safe_open(self.location[name], framework="pt", device="cpu") as handle:
                yield handle.get_slice(name)[start:start + rows]

    def rows(self, name: str, indices: torch.Tensor) -> torch.Tensor:
        """Rows `indices` (sorted, unique) of the tensor `name`, read alone: each run of
        consecutive indices is one slice, and no other row's pages are touched."""
        self._check_names([name])
        indices = indices.tolist()
        runs, start = [], 0
        for position in range(1, len(indices) + 1):
            if position == len(indices) or indices[position] != indices[position - 1] + 1:
                runs.append((indices[start], indices[position - 1] + 1))
                start = position
        with safe_open(self.location[name], framework="pt", device="cpu") as handle:
            view = handle.get_slice(name)
            return torch.cat([view[first:stop] for first, stop in runs])

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
