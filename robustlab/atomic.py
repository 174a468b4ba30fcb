"""Directories replaced in one step: a complete new copy is built beside the target and swapped in.

A results directory is several files (results.json, samples.csv, examples.npz, report.html,
models/...). Moving them in one by one lets a crash leave an old results.json beside a new
samples.csv. Here the new directory is written in full under a hidden name next to the target
(`.NAME.robustlab-new-PID-RANDOM`, same filesystem), then swapped in:

- target absent (or an empty directory): one rename;
- target present: Linux's renameat2(RENAME_EXCHANGE) swaps the two names in one atomic step, then
  the old copy (now under the hidden name) is removed;
- elsewhere (no renameat2, or a filesystem without it): the target is renamed aside
  (`.NAME.robustlab-old-PID-RANDOM`) and the new copy renamed in; a crash between the two leaves
  no target and the old copy aside, which `interrupted_swap` finds so the caller can say where it is.

Hidden leftovers of a process that died (SIGKILL, power loss) are removed by the next swap of the
same target; those of a live process are left alone. Only the standard library: no torch.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

NEW, OLD = "robustlab-new", "robustlab-old"
_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>robustlab-new|robustlab-old)-(?P<pid>\d+)-[0-9a-f]+$")
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def staging_dir(target: Path) -> Path:
    """A new empty directory beside `target`, with the permissions of any directory the user makes
    (0777 less the umask; mkdtemp's would be 0700)."""
    while True:
        path = target.parent / f".{target.name}.{NEW}-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            os.mkdir(path, 0o777)
            return path
        except FileExistsError:
            continue


def is_staging(directory: Path) -> bool:
    """True for a directory `staging_dir` made (a result being written, not yet swapped in)."""
    match = _LEFTOVER.match(Path(directory).name)
    return bool(match and match["kind"] == NEW)


def swap_in(staging: Path, target: Path) -> None:
    """Make `staging` be `target`; the previous `target` (if any) is removed. At every instant
    `target` is the old complete directory or the new one (see the module docstring for the
    fallback without renameat2)."""
    try:
        os.rename(staging, target)  # target absent, or an empty directory (POSIX rename replaces it)
        return
    except OSError as error:
        if error.errno not in (errno.EEXIST, errno.ENOTEMPTY):
            raise
    if exchange(staging, target):
        shutil.rmtree(staging, ignore_errors=True)  # staging now holds the old directory
        return
    aside = target.parent / f".{target.name}.{OLD}-{os.getpid()}-{secrets.token_hex(4)}"
    os.rename(target, aside)
    os.rename(staging, target)
    shutil.rmtree(aside, ignore_errors=True)


def exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (renameat2 RENAME_EXCHANGE); False where the system cannot."""
    function = getattr(_libc(), "renameat2", None) if _libc() is not None else None
    if function is None:
        return False
    if function(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))


def remove_leftovers(target: Path) -> None:
    """Remove the hidden copies of `target` left by processes that no longer run."""
    try:
        entries = list(target.parent.iterdir())
    except OSError:
        return
    for entry in entries:
        match = _LEFTOVER.match(entry.name)
        if match and match["name"] == target.name and not _alive(int(match["pid"])):
            shutil.rmtree(entry, ignore_errors=True)


def interrupted_swap(target: Path) -> Path | None:
    """The previous copy of a missing `target` that an interrupted fallback swap left aside, if any."""
    try:
        entries = sorted(target.parent.iterdir())
    except OSError:
        return None
    for entry in entries:
        match = _LEFTOVER.match(entry.name)
        if match and match["name"] == target.name and match["kind"] == OLD and entry.is_dir():
            return entry
    return None


def copy_tree(source: Path, destination: Path) -> None:
    """Fill the empty directory `destination` with `source`'s files: hard links where the
    filesystem allows (files are only ever replaced, never changed in place), copies otherwise."""
    for path in files(source):
        relative = path.relative_to(source)
        (destination / relative).parent.mkdir(mode=0o777, parents=True, exist_ok=True)
        try:
            os.link(path, destination / relative)
        except OSError:
            shutil.copy2(path, destination / relative)


def files(directory: Path) -> Iterator[Path]:
    """Every regular file under `directory` (symlinks are not followed), in a stable order."""
    for root, dirs, names in os.walk(directory):
        dirs.sort()
        for name in sorted(names):
            path = Path(root) / name
            if path.is_file() and not path.is_symlink():
                yield path


def sync(directory: Path) -> None:
    """Flush the files under `directory` and the directory itself to disk before it is swapped in,
    so a power cut after the swap finds complete files (a killed process needs no flush)."""
    for path in files(directory):
        _fsync(path)
    _fsync(directory)


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # directories cannot be opened on some systems; nothing to flush then
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_atomically(path: Path, data: "bytes | Callable[[BinaryIO], None]") -> None:
    """One file: written under a hidden name beside it, flushed, renamed over it. `data` is the bytes, or
    a function writing them to the open file (large contents never exist twice in memory)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        with open(tmp, "wb") as handle:
            if callable(data):
                data(handle)
            else:
                handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_LIBC: list[ctypes.CDLL | None] = []


def _libc() -> ctypes.CDLL | None:
    """The C library (None where ctypes cannot open it, e.g. on Windows)."""
    if not _LIBC:
        try:
            _LIBC.append(ctypes.CDLL(None, use_errno=True))
        except (OSError, TypeError):
            _LIBC.append(None)
    return _LIBC[0]
