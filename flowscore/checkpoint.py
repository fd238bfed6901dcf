"""Checkpoints as ONE safetensors file: all tensors, plus a JSON state in the file's metadata.

A checkpoint holds named tensors (model, EMA, optimizer moments, RNG states as uint8, normalizer, ...)
and a JSON-able ``state`` dict (step, config, optimizer scalars) stored under the metadata key
``"flowscore"``. Writes are atomic: the file is written to a temporary file in the same directory,
flushed and fsynced, then moved over the target with ``os.replace``, so a crash leaves either the old
or the new checkpoint, never a half-written one or two files out of sync. Loading never runs code:
it reads the file with ``safetensors`` and the state with ``json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load, load_file, save

from . import _io

_META_KEY = "flowscore"


def _tensor_dict(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU copies, one storage per tensor (safetensors refuses shared storage)."""
    out = {}
    for name, value in tensors.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"checkpoint tensor {name!r} must be a torch.Tensor, got {type(value).__name__}")
        out[name] = value.detach().to("cpu", copy=True).contiguous()
    return out


def save_checkpoint(file: str | Path, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
    """Atomically writes ``tensors`` and the JSON-able ``state`` into the single safetensors ``file``."""
    try:
        meta = json.dumps(state, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise ValueError(f"checkpoint state must be JSON-serialisable without NaN/Inf: {err}") from None
    _io.write_bytes(file, save(_tensor_dict(tensors), metadata={_META_KEY: meta}))


def _readable(file: Path) -> str | None:
    """``file`` as a name safetensors can open, or None when it is not valid UTF-8 (a folder named in
    another encoding): such a file is read through Python instead (:func:`_raw_header`)."""
    try:
        str(file).encode("utf-8")
    except UnicodeEncodeError:
        return None
    return str(file)


_MAX_HEADER = 100 * 2**20


def _raw_header(file: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file, read directly (an 8-byte little-endian length, then JSON)."""
    with open(file, "rb") as handle:
        size = int.from_bytes(handle.read(8), "little")
        if size > _MAX_HEADER:
            raise ValueError(f"a header of {size} bytes")
        header = json.loads(handle.read(size))
    if not isinstance(header, dict):
        raise ValueError("a header that is not a JSON object")
    return header


def _read_metadata(file: Path) -> dict[str, str]:
    """The safetensors header's ``__metadata__`` (read with ``safe_open``; no code runs)."""
    name = _readable(file)
    if name is None:
        return _raw_header(file).get("__metadata__") or {}
    with safe_open(name, framework="pt") as handle:
        return handle.metadata() or {}


def _load_tensors(file: Path) -> dict[str, torch.Tensor]:
    name = _readable(file)
    return load_file(name, device="cpu") if name is not None else load(file.read_bytes())


def load_checkpoint(file: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(tensors, state)`` from a file written by :func:`save_checkpoint`, tensors on the CPU.

    A missing, truncated or foreign file raises ``ValueError`` saying what to do.
    """
    file = Path(file)
    if not file.is_file():
        raise ValueError(
            f"checkpoint {str(file)!r} does not exist; check the run directory or start a new run"
        )
    try:
        tensors = _load_tensors(file)
        meta = _read_metadata(file)
        state = json.loads(meta[_META_KEY])
    except (SafetensorError, OSError, ValueError, KeyError, UnicodeDecodeError, RecursionError) as err:
        raise ValueError(
            f"checkpoint {str(file)!r} is corrupt or not a flowscore checkpoint "
            f"({type(err).__name__}: {err}); delete it and resume from an older copy, or start a new run"
        ) from None
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {str(file)!r} has a malformed state; start a new run")
    return tensors, state


def read_state(file: str | Path) -> dict[str, Any]:
    """The JSON ``state`` of a checkpoint, read from the file's header alone (no tensor is loaded).

    Raises ``ValueError`` like :func:`load_checkpoint`.
    """
    file = Path(file)
    if not file.is_file():
        raise ValueError(
            f"checkpoint {str(file)!r} does not exist; check the run directory or start a new run"
        )
    try:
        state = json.loads(_read_metadata(file)[_META_KEY])
    except (SafetensorError, OSError, ValueError, KeyError, UnicodeDecodeError, RecursionError) as err:
        raise ValueError(
            f"checkpoint {str(file)!r} is corrupt or not a flowscore checkpoint ({type(err).__name__}: {err})"
        ) from None
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {str(file)!r} has a malformed state; start a new run")
    return state


def tensor_shapes(file: str | Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{name: (dtype, shape)}`` of every tensor of a safetensors ``file``, read from its header alone (so
    a damaged file's sizes can be checked before anything is allocated); ``ValueError`` like
    :func:`read_state`."""
    file = Path(file)
    try:
        if _readable(file) is None:
            header = _raw_header(file)
            return {k: (v["dtype"], tuple(v["shape"])) for k, v in header.items() if k != "__metadata__"}
        with safe_open(str(file), framework="pt") as handle:
            return {
                name: (handle.get_slice(name).get_dtype(), tuple(handle.get_slice(name).get_shape()))
                for name in handle.keys()  # noqa: SIM118  (safe_open is not a mapping)
            }
    except (SafetensorError, OSError, ValueError, KeyError, TypeError, RecursionError) as err:
        raise ValueError(
            f"checkpoint {str(file)!r} is corrupt or not a flowscore checkpoint ({type(err).__name__}: {err})"
        ) from None


def prefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{prefix + "." + name: tensor}``."""
    return {f"{prefix}.{name}": value for name, value in tensors.items()}


def unprefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The entries of ``tensors`` under ``prefix + "."``, with the prefix removed."""
    head = prefix + "."
    return {name[len(head) :]: value for name, value in tensors.items() if name.startswith(head)}


def optimizer_to_flat(state_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Splits ``optimizer.state_dict()`` into tensors ``{"<param>.<key>": tensor}`` and JSON scalars.

    Non-tensor per-parameter entries and the ``param_groups`` go to the JSON part.
    """
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, entry in state_dict["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def optimizer_from_flat(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`optimizer_to_flat`: a dict for ``optimizer.load_state_dict``."""
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    for index, entry in meta["scalars"].items():
        state.setdefault(int(index), {}).update(entry)
    return {"state": state, "param_groups": meta["param_groups"]}
