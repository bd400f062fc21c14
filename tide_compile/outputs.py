"""Output files: checked before any work, written atomically, never over an input.

:func:`check_output_file` (and :func:`check_output_dir` for a folder of results) run
before a command starts its work, so that a bad ``--out`` costs nothing: the parent
folder exists and is writable, the target is not a folder (or a device, or a pipe), it
is not one of the inputs (calibration text, model files), and an existing file is
replaced only when asked (``--force``, API ``overwrite=True``).

:func:`atomic_write` writes through a temporary file in the target's folder and
``os.replace``: an interrupted write (Ctrl-C, a full disk, an exception) leaves the old
file as it was and no partial file behind. The new file's mode follows the umask, as a
plain ``open(path, "w")`` would.
"""

from __future__ import annotations

import os
import stat
import tempfile
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

from .validation import TIDEError

__all__ = ["check_output_file", "check_output_dir", "atomic_write", "model_input_files"]

PathLike = str | os.PathLike[str]

_UMASK_LOCK = threading.Lock()


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (b.exists() and a.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def _check_parent(parent: Path, what: str) -> None:
    if not parent.exists():
        raise TIDEError(f"{what}: the folder {str(parent)!r} does not exist: create it first "
                        f"(mkdir -p {parent}) or choose another path")
    if not parent.is_dir():
        raise TIDEError(f"{what}: {str(parent)!r} is not a folder: choose another path")
    try:  # really try: permission bits do not tell for root, read-only mounts or /proc
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as exc:
        raise TIDEError(f"{what}: cannot write to the folder {str(parent)!r} "
                        f"({(exc.strerror or str(exc)).lower()}): choose another path") from None


def check_output_file(
    path: PathLike,
    *,
    overwrite: bool = False,
    inputs: Iterable[PathLike] = (),
    what: str = "output file",
    force_hint: str = "overwrite=True",
) -> Path:
    """Check that ``path`` can be written without losing anything; returns it as a Path.

    Args:
        path: the file to write.
        overwrite: replace an existing file (refused otherwise).
        inputs: files the work reads (calibration text, model files); the output may
            never be one of them, even with ``overwrite``.
        what: how the message names the path (``"--out"``, ``"save_path"``).
        force_hint: how the message says to allow overwriting (``"--force"``).

    Raises:
        TIDEError: naming the fix.
    """
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        raise TIDEError(f"{what} must be a file path, got {path!r}")
    target = Path(os.path.expanduser(os.fspath(path)))
    if target.is_dir():
        raise TIDEError(f"{what}: {str(target)!r} is a folder: pass a file path inside it, "
                        f"e.g. {target / 'router.tide'}")
    exists = target.exists() or target.is_symlink()
    if exists and not (stat.S_ISREG(os.lstat(target).st_mode) or target.is_symlink()):
        raise TIDEError(f"{what}: {str(target)!r} is not a regular file: choose another path")
    _check_parent(target.parent if str(target.parent) else Path("."), what)
    for item in inputs:
        if _same_file(target, Path(os.fspath(item))):
            raise TIDEError(f"{what}: {str(target)!r} is an input of this run ({item}): writing "
                            "there would destroy it; choose another path")
    if exists:
        if not overwrite:
            raise TIDEError(f"{what}: {str(target)!r} exists: pass {force_hint} to replace it, "
                            "or choose another path")
    return target


def check_output_dir(
    path: PathLike,
    names: Iterable[str],
    *,
    overwrite: bool = False,
    inputs: Iterable[PathLike] = (),
    what: str = "output folder",
    force_hint: str = "overwrite=True",
) -> Path:
    """Check that the files ``names`` can be written into the folder ``path`` (which may
    not exist yet: then its parent must); returns the folder as a Path."""
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        raise TIDEError(f"{what} must be a folder path, got {path!r}")
    folder = Path(os.path.expanduser(os.fspath(path)))
    if folder.exists():
        if not folder.is_dir():
            raise TIDEError(f"{what}: {str(folder)!r} is a file, not a folder: pass a folder "
                            "(it is created if missing)")
        _check_parent(folder, what)
    else:
        _check_parent(folder.parent if str(folder.parent) else Path("."), what)
    inputs = list(inputs)
    if folder.exists():
        for name in names:
            check_output_file(folder / name, overwrite=overwrite, inputs=inputs, what=what,
                              force_hint=force_hint)
    return folder


def _umask() -> int:
    with _UMASK_LOCK:  # os.umask can only be read by setting it
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def atomic_write(path: PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then ``os.replace`` it onto
    ``path``; on any failure (or Ctrl-C) the temporary file is removed and ``path`` is as
    it was. The file gets mode ``0o666 & ~umask``."""
    target = Path(os.fspath(path))
    folder = target.parent if str(target.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return target


def model_input_files(model_dir: PathLike) -> list[Path]:
    """The files of a model folder an output must not replace (everything in it except
    router files, ``*.tide``)."""
    folder = Path(os.fspath(model_dir))
    if not folder.is_dir():
        return []
    return [f for f in folder.rglob("*") if f.is_file() and f.suffix != ".tide"]
