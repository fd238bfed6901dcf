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
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, target)
    except BaseException:
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
