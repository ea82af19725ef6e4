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
# folder; a live save holds an flock on it, a killed one no longer does.
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


def process_umask() -> int:
    """This process's umask, read without changing it where Linux reports it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: the only way to read it is to set it
    os.umask(mask)
    return mask


def _give_default_modes(folder: Path) -> None:
    """Give every file the mode a plain open() would have: safetensors ≥ 0.8 writes through a
    temporary file that is always 0600 (safetensors issue #782), which leaves weights that
    another user — a serving container, a shared cache — cannot read beside a readable
    config.json."""
    mode = 0o666 & ~process_umask()
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            path.chmod(mode)


def staging_folders(target: Path) -> list[Path]:
    """Folders beside `target` named as this module's staging folders (and older versions'
    `.NAME.old-*`), whoever made them."""
    pattern = glob.escape(str(target.parent / f".{target.name}"))
    return sorted(Path(p) for suffix in (".tmp-*", ".old-*") for p in glob.glob(pattern + suffix))


def _lock_marker(folder: Path, create: bool) -> int | None:
    """A descriptor holding an exclusive flock on the folder's marker file (opened for writing,
    which NFS's flock emulation needs); None when the marker or the folder is missing, when
    `create` finds one already there, or when a live process holds the lock."""
    flags = os.O_RDWR | os.O_NOFOLLOW | (os.O_CREAT | os.O_EXCL if create else 0)
    try:
        descriptor = os.open(folder / STAGING_MARKER, flags, 0o644)
    except OSError:
        return None
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(descriptor)
        return None
    try:  # another save's cleanup may have removed the folder before the lock was taken
        if os.stat(folder / STAGING_MARKER).st_ino == os.fstat(descriptor).st_ino:
            return descriptor
    except FileNotFoundError:
        pass
    os.close(descriptor)
    return None


def _holds_only_saved_files(folder: Path, name: str, writes: Callable[[str], bool]) -> bool:
    """An older version's markerless staging folder: the files directly inside, or (for
    `.NAME.old-*`) under NAME/, all of them files a save writes. True for an empty folder."""
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
    (folder / STAGING_MARKER).unlink()
    try:
        folder.rmdir()
    except FileNotFoundError:  # another cleanup took the empty folder meanwhile
        pass


def _remove_markerless(folder: Path, name: str, writes: Callable[[str], bool]) -> bool:
    """Remove an empty folder (a save that had not yet written its marker, or had removed it),
    or an older version's staging folder; whether it was removed."""
    try:
        folder.rmdir()
        return True
    except OSError:
        pass
    # A new save's marker appearing meanwhile is not a file a save writes: the folder stays.
    if not _holds_only_saved_files(folder, name, writes):
        return False
    shutil.rmtree(folder)
    return True


def remove_leftover_staging(target: Path, writes: Callable[[str], bool]) -> list[Path]:
    """Remove the staging folders that killed saves of `target` left: with an unlocked marker
    (its save has ended), empty, or markerless holding only files `writes` names. A live
    save's, and one holding anything else, stay. Returns the removed folders."""
    removed = []
    for folder in staging_folders(target):
        if folder.is_symlink() or not folder.is_dir():
            continue
        if not (folder / STAGING_MARKER).exists():
            if _remove_markerless(folder, target.name, writes):
                removed.append(folder)
            continue
        descriptor = _lock_marker(folder, create=False)
        if descriptor is None:
            continue
        try:
            _remove_staging(folder)
        finally:
            os.close(descriptor)
        removed.append(folder)
    return removed


def _new_staging(target: Path) -> tuple[Path, int]:
    """A fresh staging folder holding its marker, locked. Another save's cleanup may remove the
    folder before the marker is in or locked (it holds nothing yet): make a new one."""
    for _ in range(STAGING_ATTEMPTS):
        folder = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        descriptor = _lock_marker(folder, create=True)
        if descriptor is not None:
            os.write(descriptor, f"staging folder of a curkernels save of {target} (pid "
                     f"{os.getpid()}); the next save removes it once that process has "
                     f"ended\n".encode())
            return folder, descriptor
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
        _give_default_modes(new)
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
