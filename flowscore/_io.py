"""Atomic file output: every file flowscore writes appears whole or not at all.

The content goes to a temporary file beside the target (same folder, so the rename cannot cross file
systems), is flushed and fsynced, gets the usual permissions (umask applied; ``mkstemp`` would leave 0600),
then ``os.replace`` moves it onto the target. On any error, Ctrl-C included, the temporary file is removed
and the target is untouched.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[str]:
    """Yield a temporary path beside ``target`` (its folder is created if needed); when the block ends
    without error, the file written there replaces ``target``."""
    with atomic_paths(target) as (tmp,):
        yield tmp


@contextlib.contextmanager
def atomic_paths(*targets: str | os.PathLike[str]) -> Iterator[list[str]]:
    """:func:`atomic_path` for several files at once: a temporary path beside each target; when the block
    ends without error all are fsynced, then each replaces its target (renames, which need no space);
    on any error none does, and the temporaries are removed."""
    paths = [Path(target) for target in targets]
    tmps: list[str] = []
    try:
        for target in paths:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
            os.close(fd)
            tmps.append(tmp)
        yield list(tmps)
        umask = os.umask(0)
        os.umask(umask)
        for tmp in tmps:
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
            os.chmod(tmp, 0o666 & ~umask)
        for tmp, target in zip(tmps, paths, strict=True):
            os.replace(tmp, target)
    except BaseException:
        for tmp in tmps:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise


def write_bytes(file: str | os.PathLike[str], payload: bytes) -> None:
    with atomic_path(file) as tmp, open(tmp, "wb") as handle:
        handle.write(payload)


def save_text(file: str | os.PathLike[str], text: str) -> None:
    write_bytes(file, text.encode())


def save_json(file: str | os.PathLike[str], obj: Any) -> None:
    """``obj`` as indented JSON; ``ValueError`` (nothing written) if it holds NaN or Inf, which JSON has no
    value for."""
    try:
        text = json.dumps(obj, indent=2, allow_nan=False)
    except ValueError:
        raise ValueError(
            f"{os.fspath(file)!r}: the values hold NaN or Inf, which JSON cannot store"
        ) from None
    save_text(file, text + "\n")


def save_npy(file: str | os.PathLike[str], array: np.ndarray) -> None:
    with atomic_path(file) as tmp, open(tmp, "wb") as handle:
        np.save(handle, array)


def check_output_file(file: str | os.PathLike[str], name: str, suffix: str | None = None) -> str:
    """``file`` as a path that an output can be written to, checked without creating anything.

    It must end in ``suffix`` (if given), must not be a folder, and its nearest existing parent must be a
    writable folder (missing folders are created when the file is written). ``ValueError`` naming ``name``
    (e.g. the flag) and the fix otherwise.
    """
    file = os.fspath(file)
    if not file:
        raise ValueError(f"{name} is empty; pass a file name")
    if suffix is not None and not file.endswith(suffix):
        raise ValueError(f"{name} {file!r} must end in {suffix}; pass a file name like out{suffix}")
    if os.path.isdir(file):
        raise ValueError(f"{name} {file!r} is a directory; pass a file name inside it")
    parent = os.path.dirname(os.path.abspath(file))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise ValueError(
            f"{name} {file!r} cannot be written ({parent!r} is not a writable folder); choose another path"
        )
    return file


def check_output_dir(folder: str | os.PathLike[str], name: str) -> str:
    """``folder`` as a folder that outputs can be written into, checked without creating anything: a folder
    or nothing (not a file, a broken link or a link loop), whose nearest existing parent (or itself) is a
    writable folder. ``ValueError`` naming ``name`` (e.g. the flag) and the fix otherwise."""
    folder = os.fspath(folder)
    if not folder:
        raise ValueError(f"{name} is empty; pass a folder")
    if os.path.islink(folder) and not os.path.exists(folder):
        raise ValueError(f"{name} {folder!r} is a broken link or a link loop; pass another folder")
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ValueError(f"{name} {folder!r} exists and is not a folder; pass another folder")
    existing = os.path.abspath(folder)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(
            f"{name} {folder!r} cannot be written ({existing!r} is not a writable folder); choose another"
        )
    return folder
