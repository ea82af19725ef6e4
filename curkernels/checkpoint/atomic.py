"""Replace a folder atomically: readers see the old folder or the new one, never a mix."""

import ctypes
import fcntl
import glob
import os
import shutil
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

_RENAME_EXCHANGE = 2  # linux/fs.h
# Inside each staging folder, beside the new content: marks the folder as a save's staging
# folder; a live save holds an flock on the staging folder, a killed one no longer does.
STAGING_MARKER = ".curkernels-staging"
NEW, OLD = "new", "old"
STAGING_ATTEMPTS = 5


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step with renameat2(RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    result = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE)
    return result == 0


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def staging_folders(target: Path) -> list[Path]:
    """Folders beside `target` named as this module's staging folders (and older versions'
    `.NAME.old-*`), whoever made them."""
    pattern = glob.escape(str(target.parent / f".{target.name}"))
    return sorted(Path(p) for suffix in (".tmp-*", ".old-*") for p in glob.glob(pattern + suffix))


def _lock(folder: Path, wait: bool) -> int | None:
    """A descriptor holding an exclusive flock on `folder`; None when it is gone or (without
    `wait`) when a live process holds the lock."""
    try:
        descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:  # gone, or not a folder (a link to one included)
        return None
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        os.close(descriptor)
        return None
    return descriptor


def _is_leftover(folder: Path, name: str, writes: Callable[[str], bool]) -> bool:
    """Whether an unlocked staging folder is a save's: it holds the marker, or (an older
    version's layout, with the files directly or under NAME/) only files `writes` names."""
    if (folder / STAGING_MARKER).is_file():
        return True
    for root, _, files in os.walk(folder):
        for file in files:
            parts = (Path(root) / file).relative_to(folder).parts
            relative = "/".join(parts[1:] if parts[0] == name and len(parts) > 1 else parts)
            if not writes(relative):
                return False
    return True


def _remove_staging(folder: Path) -> None:
    """Content first, marker last: a kill part-way leaves a folder that is still recognised
    (marker inside, or empty)."""
    for entry in folder.iterdir():
        if entry.name == STAGING_MARKER:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    (folder / STAGING_MARKER).unlink(missing_ok=True)
    folder.rmdir()


def remove_leftover_staging(target: Path, writes: Callable[[str], bool]) -> list[Path]:
    """Remove the staging folders that killed saves of `target` left; ones a live save holds
    and ones holding anything a save does not write stay. Returns the removed folders."""
    removed = []
    for folder in staging_folders(target):
        descriptor = _lock(folder, wait=False)
        if descriptor is None:
            continue
        try:
            if _is_leftover(folder, target.name, writes):
                _remove_staging(folder)
                removed.append(folder)
        finally:
            os.close(descriptor)
    return removed


def _new_staging(target: Path) -> tuple[Path, int]:
    """A fresh locked staging folder with its marker. Another save's cleanup may remove the
    folder between its creation and the lock (it is empty then): make a new one."""
    for _ in range(STAGING_ATTEMPTS):
        folder = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        descriptor = _lock(folder, wait=True)
        if descriptor is None:
            continue
        try:
            still_ours = os.stat(folder).st_ino == os.fstat(descriptor).st_ino
        except FileNotFoundError:
            still_ours = False
        if still_ours:
            (folder / STAGING_MARKER).write_text(
                f"staging folder of a curkernels save of {target} (pid {os.getpid()}); removed "
                f"by the next save once that process has ended\n")
            return folder, descriptor
        os.close(descriptor)
    raise RuntimeError(f"could not create a staging folder beside {target} in "
                       f"{STAGING_ATTEMPTS} attempts: each was removed before it could be locked")


@contextmanager
def atomic_directory(target: str | os.PathLike, writes: Callable[[str], bool] = lambda _: False):
    """Yield a new folder; on success it replaces `target`, on an exception it is removed and
    `target` is untouched. The new folder is staged beside `target` in `.NAME.tmp-*`; staging
    folders of killed runs are removed first (`writes` names the files an older version's
    markerless staging folder may hold to be recognised as one).
    """
    target = Path(target).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"out_dir {target} exists and is not a folder")
    remove_leftover_staging(target, writes)
    staging, lock = _new_staging(target)
    try:
        new = staging / NEW
        new.mkdir()
        yield new
        _fsync_tree(new)
        if not target.exists():
            os.rename(new, target)
        elif not _exchange(new, target):  # no atomic exchange here: move the old one aside
            os.rename(target, staging / OLD)
            os.rename(new, target)
    finally:
        try:
            _remove_staging(staging)
        finally:
            os.close(lock)
