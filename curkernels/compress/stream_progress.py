"""The durable record of a streaming compression: a work folder beside OUT holding each
finished block's shard and a progress file, written so that a kill at any moment leaves every
recorded block whole and the next run continues after the last one."""

import fcntl
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

PROGRESS_FILE = "progress.json"
MARKER = ".curkernels-stream"
FORMAT = "curkernels-stream"
VERSION = 1
SHARD_PREFIX = "model-"
TEMP_SUFFIX = ".tmp"


def work_folder_for(target: Path) -> Path:
    """`.NAME.stream` beside OUT: on OUT's file system (its shards become OUT's by hard
    link) and not one of the `.NAME.tmp-*` staging folders a save cleans up."""
    return target.parent / f".{target.name}.stream"


def _fsync_folder(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _durable_replace(path: Path, write) -> None:
    """`write(temporary path)`, flushed to disk, then renamed over `path` and the folder
    flushed: readers see the old file or the new one, never part of one."""
    temporary = path.with_name(path.name + TEMP_SUFFIX)
    write(temporary)
    with open(temporary, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    _fsync_folder(path.parent)


def _is_ours(name: str) -> bool:
    return name in (PROGRESS_FILE, MARKER, PROGRESS_FILE + TEMP_SUFFIX) or (
        name.startswith(SHARD_PREFIX) and name.endswith((".safetensors",
                                                         ".safetensors" + TEMP_SUFFIX)))


class StreamProgress:
    """The work folder of one OUT, locked for the life of the run. `record["blocks"]` maps a
    finished step (a block's index as a string, or "base" for the tensors outside the blocks)
    to its shard files and their sizes ("files"), module specs and reports; `record["extra"]`
    holds values a resumed run must reuse (layer scores)."""

    def __init__(self, target: Path, fingerprint: dict, resume: bool):
        self.folder = work_folder_for(target)
        self.fingerprint = fingerprint
        self.resumed = False
        existed = self.folder.exists()
        if existed:
            self._check_only_ours()
        self.folder.mkdir(parents=True, exist_ok=True)
        self._lock = self._take_lock()
        record = self._read() if existed else None
        if record is not None and record.get("fingerprint") == fingerprint:
            self.record = record
            self.resumed = True
        else:
            if resume:
                self._release()
                reason = ("holds no run to resume" if record is None else
                          "holds a run made with other settings (model files, method options, "
                          "calibration data or dtype differ)")
                raise ValueError(f"resume=True, but {self.folder} {reason}: run without "
                                 f"--resume to start over")
            self._clear()
            self.record = {"format": FORMAT, "version": VERSION, "fingerprint": fingerprint,
                           "blocks": {}, "extra": {}}
            self._write_record()

    def _check_only_ours(self) -> None:
        if not self.folder.is_dir() or self.folder.is_symlink():
            raise ValueError(f"{self.folder} exists and is not a streaming work folder: move "
                             f"it away or choose another output folder")
        foreign = sorted(p.name for p in self.folder.iterdir() if not _is_ours(p.name))
        if foreign or not (self.folder / MARKER).exists() and any(self.folder.iterdir()):
            raise ValueError(f"{self.folder} holds files a streaming run does not write "
                             f"({', '.join(foreign[:5]) or 'no marker'}): it is left alone; "
                             f"move it away or choose another output folder")

    def _take_lock(self) -> int:
        descriptor = os.open(self.folder / MARKER, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            raise ValueError(f"another streaming compression is writing {self.folder}: wait "
                             f"for it to end") from None
        os.ftruncate(descriptor, 0)
        os.write(descriptor, f"work folder of a curkernels streaming compression (pid "
                             f"{os.getpid()}); removed once OUT is written\n".encode())
        return descriptor

    def _release(self) -> None:
        os.close(self._lock)

    def _read(self) -> dict | None:
        try:
            record = json.loads((self.folder / PROGRESS_FILE).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return None
        if not isinstance(record, dict) or record.get("format") != FORMAT:
            return None
        for entry in record.get("blocks", {}).values():  # a shard lost since: start over
            for file, size in entry["files"].items():
                path = self.folder / file
                if not path.is_file() or path.stat().st_size != size:
                    return None
        return record

    def _clear(self) -> None:
        """Remove an earlier run's files (only files this module writes)."""
        for path in self.folder.iterdir():
            if path.name != MARKER and _is_ours(path.name):
                path.unlink()

    def _write_record(self) -> None:
        text = json.dumps(self.record, indent=1)
        _durable_replace(self.folder / PROGRESS_FILE, lambda path: path.write_text(text))

    def finished(self, step: str) -> dict | None:
        return self.record["blocks"].get(step)

    def shard_path(self, file: str) -> Path:
        return self.folder / file

    def write_shard(self, file: str, tensors: dict[str, torch.Tensor]) -> int:
        """Write one shard durably; its size in bytes."""
        tensors = {name: t.detach().contiguous() for name, t in tensors.items()}
        return self.write_file(file, lambda path: save_file(tensors, path,
                                                           metadata={"format": "pt"}))

    def write_file(self, file: str, write: Callable[[Path], None]) -> int:
        """`write(path)` writes one shard, made durable here; its size in bytes."""
        _durable_replace(self.folder / file, write)
        return (self.folder / file).stat().st_size

    def record_step(self, step: str, entry: dict) -> None:
        """Mark `step` finished (after its shards are written): from now on a run continues
        after it."""
        self.record["blocks"][step] = entry
        self._write_record()

    def remember(self, key: str, value) -> None:
        self.record["extra"][key] = value
        self._write_record()

    def remove(self) -> None:
        """Delete the work folder once OUT holds the result: the record first (a kill
        part-way leaves no record to resume from), then the shards, the marker last."""
        (self.folder / PROGRESS_FILE).unlink()
        self._clear()
        (self.folder / MARKER).unlink()
        self._release()
        self.folder.rmdir()

    def close(self) -> None:
        """Keep the folder (for a later resume) and let another run take it."""
        self._release()
