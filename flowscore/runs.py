"""The run folder: the files a training writes, the lock that admits one writer, and reading a run back.

A run folder holds

* ``run.safetensors``: written once; the config, model and path descriptions, data shape, the held-out
  points (data space) and their labels, the normalizer, a checksum of the training data, the number of
  classes and training points per class (labelled runs), the loss floor, the normalisation and, for a
  data source, its held-out points and labels and its description;
* ``checkpoint.safetensors``: rewritten atomically every ``checkpoint_every`` steps and at the end; model,
  EMA, AdamW moments, RNG states and the step (see :mod:`flowscore.checkpoint`);
* ``log.csv``: ``step, loss, loss_ema, lr, steps_per_s, loss_floor`` every ``log_every`` steps (the one file
  that is appended to: a row cut short by a crash is skipped when read and dropped on resume);
* ``config.json``: the config, for people (never read back);
* ``lock``: the writer's lock (``fcntl.flock``, released when the process ends, however it ends): a second
  writer is refused with one line and touches nothing. It holds the writer's process id, for that message.

Reading a run never executes code (safetensors + JSON + CSV) and never trusts a description it reads: the
model, path, data shape and normalizer in the JSON are checked against the stored tensors (shapes, counts,
sane bounds) before anything is built, so a damaged or hostile file is refused quickly without allocating
more than its own size. A run trained on your own model stores its weights and a description (class name,
weight count), never its code: :func:`load_run` loads the weights into a module you pass.

The folder's life while :class:`flowscore.Trainer` writes it is here too: its creation (one process wins),
the checks before a resume (the same config, model, objective and data split) and, after a failure before
the first checkpoint, the removal of this process's own files only.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import math
import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from . import _io, checkpoint, models
from . import data as datasets
from .config import BRIDGES, FLOW_MAPS, PATH_NAMES, RESUMABLE_CHANGES, TrainConfig
from .conversions import KINDS
from .floor import LossFloor
from .models import CUSTOM, check_description
from .objectives import BUILTIN, Objective, objective_from_config, objective_from_dict
from .paths import GaussianPath, get_path
from .tblog import FOLDER as TENSORBOARD_FOLDER

if TYPE_CHECKING:
    from .prepare import _Prepared
    from .source_data import Source

try:
    import fcntl
except ImportError:  # not POSIX: runs are not locked
    fcntl = None  # type: ignore[assignment]

RUN_FILE = "run.safetensors"
CHECKPOINT_FILE = "checkpoint.safetensors"
LOG_FILE = "log.csv"
CONFIG_FILE = "config.json"
LOCK_FILE = "lock"
RUN_FILES = (RUN_FILE, CHECKPOINT_FILE, LOG_FILE, CONFIG_FILE, LOCK_FILE)
"""Every file a training writes into its run folder."""
LOG_FIELDS = ("step", "loss", "loss_ema", "lr", "steps_per_s", "loss_floor")
RUN_FORMAT = 1


def _is_lock_text(content: bytes) -> bool:
    """True for what a flowscore lock file holds: nothing, or a process id and a newline."""
    text = content.strip()
    return len(content) <= 32 and (not text or text.isdigit())


class RunInUse(ValueError):
    """Another process holds the run folder's lock."""


class RunLock:
    """The exclusive writer's lock of a run folder (``run_dir/lock``, ``fcntl.flock``).

    ``acquire()`` raises :class:`RunInUse` (one line, naming the holder's process id) when another process
    holds it, and then changes nothing. The kernel releases the lock when the holder's process ends,
    killed or not, so a stale lock file never blocks a later writer.
    """

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.file = self.run_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        if fcntl is None or self._fd is not None:
            return self
        for _ in range(8):  # retried while a finishing writer removes the lock file we opened
            fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.read(fd, 32).decode(errors="replace").strip()
                os.close(fd)
                who = f" (process {holder})" if holder.isdigit() else ""
                raise RunInUse(
                    f"run {str(self.run_dir)!r} is being written by another process{who}; wait for it to "
                    "end or choose another --out"
                ) from None
            try:
                current = os.stat(self.file, follow_symlinks=False)
            except FileNotFoundError:
                current = None
            if current is None or not os.path.samestat(current, os.fstat(fd)):
                os.close(fd)  # the file was removed (and maybe re-created) by its last holder: open it again
                continue
            if not _is_lock_text(os.pread(fd, 64, 0)):
                os.close(fd)
                raise ValueError(
                    f"{str(self.file)!r} is not a flowscore lock (it holds other data); move that file away "
                    "or choose another --out"
                )
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            self._fd = fd
            return self
        raise RunInUse(f"run {str(self.run_dir)!r} is being created and removed by other processes; retry")

    def _open(self) -> int:
        """The lock file opened for writing (created if missing); a folder, a link or anything but a regular
        file there is refused (``ValueError``: it is not ours to overwrite)."""
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
        try:
            fd = os.open(self.file, flags, 0o644)
        except FileNotFoundError:
            raise ValueError(f"run dir {str(self.run_dir)!r} does not exist (it was removed)") from None
        except OSError as err:
            if err.errno in (errno.EISDIR, errno.ELOOP, errno.ENXIO, errno.EACCES, errno.EPERM, errno.EROFS):
                cause = os.strerror(err.errno).lower()
                raise ValueError(
                    f"{str(self.file)!r} cannot be used as the run's lock ({cause}); move it away or choose "
                    "another --out"
                ) from None
            raise
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise ValueError(
                f"{str(self.file)!r} is not a regular file; move it away or choose another --out"
            )
        return fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor releases the flock
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def remove_temporaries(run_dir: str | Path) -> list[Path]:
    """Deletes the temporary files a killed writer left behind (``.checkpoint.safetensors.*.tmp`` and the
    like, see :func:`flowscore._io.atomic_path`); returns them. Call it only while holding the lock."""
    run_dir = Path(run_dir)
    removed = []
    for name in RUN_FILES:
        for tmp in run_dir.glob(f".{name}.*.tmp"):
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
                removed.append(tmp)
    return removed


def holds_nothing(run_dir: str | Path) -> bool:
    """True when ``run_dir`` is a folder holding at most a lock file and writers' temporaries (what a writer
    killed before writing anything leaves): a new run may start there."""
    run_dir = Path(run_dir)
    temporaries = {p.name for name in RUN_FILES for p in run_dir.glob(f".{name}.*.tmp")}
    return run_dir.is_dir() and all(p.name in ({LOCK_FILE} | temporaries) for p in run_dir.iterdir())


def checkpoint_step(run_dir: str | Path) -> int | None:
    """The step of the run's checkpoint (read from its header only), or None when there is no readable one."""
    file = Path(run_dir) / CHECKPOINT_FILE
    if not file.is_file():
        return None
    try:
        step = checkpoint.read_state(file).get("step")
    except ValueError:
        return None
    return step if isinstance(step, int) and not isinstance(step, bool) and step >= 0 else None


# -- log.csv -----------------------------------------------------------------------------------------------
LOG_ROWS_READ = 100_000
""":func:`load_run` reads at most the last this many rows of ``log.csv`` (from the file's tail: a huge log
costs no more time or memory than this)."""
_LOG_ROW_BYTES = 160
"""Bytes per row assumed when reading a log's tail (a row of flowscore's holds well under this)."""


def read_log(file: str | Path, last: int | None = None) -> list[dict[str, Any]]:
    """The rows of a ``log.csv`` as dicts of numbers (None for an empty cell); ``last``: at most the last
    ``last`` rows, read from the end of the file (about ``160 * last`` bytes, whatever its size).

    Every complete row ends with a newline; a last row without one (a write cut short by a crash or a full
    disk) is skipped, and so is any row that does not parse. A missing file gives ``[]``.
    """
    file = Path(file)
    if not file.is_file():
        return []
    with open(file, "rb") as handle:
        header = next(csv.reader([handle.readline().decode("utf-8", "replace")]), None)
        if last is not None:
            start = handle.seek(0, os.SEEK_END) - _LOG_ROW_BYTES * last
            if start > handle.seek(0) + len(handle.readline()):
                handle.seek(start - 1)
                handle.readline()  # the rest of a row cut by the seek (or the newline before a whole one)
        rows = [row for line in handle if (row := _log_row(header, line)) is not None]
    return rows if last is None else rows[-last:]


def _log_row(header: list[str] | None, line: bytes) -> dict[str, Any] | None:
    """One row of ``log.csv`` as a dict, or None when it is torn (no newline) or does not parse."""
    if not header or not line.endswith(b"\n"):
        return None
    values = next(csv.reader([line.decode("utf-8", "replace")]), [])
    if len(values) != len(header):
        return None
    try:
        row = {k: _log_value(k, v) for k, v in zip(header, values, strict=True)}
    except ValueError:
        return None
    return row if isinstance(row.get("step"), int) else None


def _log_value(key: str, value: str) -> int | float | None:
    if value == "":
        return None
    return int(value) if key == "step" else float(value)


def truncate_log(file: str | Path, step: int) -> None:
    """Rewrites ``log.csv`` (atomically, streaming: memory does not grow with the log) with its header and
    the readable rows of ``step <= step`` (rows past the checkpoint are redone on resume; a torn last row is
    dropped)."""
    file = Path(file)
    with _io.atomic_path(file) as tmp, open(tmp, "w", newline="") as out:
        writer = csv.DictWriter(out, LOG_FIELDS, lineterminator="\n", extrasaction="ignore")
        writer.writeheader()
        if not file.is_file():
            return
        with open(file, "rb") as handle:
            header = next(csv.reader([handle.readline().decode("utf-8", "replace")]), None)
            for line in handle:
                row = _log_row(header, line)
                if row is not None and row["step"] <= step:
                    writer.writerow({k: ("" if v is None else v) for k, v in row.items()})


# -- run.safetensors ---------------------------------------------------------------------------------------
def write_run_file(
    run_dir: str | Path,
    *,
    config: TrainConfig,
    model: nn.Module,
    path: GaussianPath,
    held_out: torch.Tensor,
    normalizer: datasets.Normalizer,
    n_train: int,
    data_sha256: str,
    loss_floor: dict[str, Any] | None,
    labels: dict[str, Any] | None = None,
    held_out_labels: torch.Tensor | None = None,
    objective: dict[str, Any] | None = None,
    loss_floor_absent: str | None = None,
    source: Source | None = None,
    normalisation: dict[str, Any] | None = None,
) -> None:
    """Writes ``run.safetensors`` and ``config.json`` (atomically). ``labels``: None, or ``{"num_classes": K
    (None when unknown), "class_counts": [training points per class] or None}`` with ``held_out_labels``.
    ``objective``: the objective's ``to_dict()``; ``loss_floor_absent``: why there is no floor.
    ``source``: a data source (its held-out points and labels as tensors, :meth:`Source.info` in the JSON);
    ``normalisation``: ``{"data_std", "sigma_data", "shared_with_source"}``."""
    run_dir = Path(run_dir)
    state = {
        "format": RUN_FORMAT, "config": config.to_dict(), "model": models.describe(model),
        "path": path.config(), "data_shape": list(held_out.shape[1:]), "n_train": n_train,
        "data_sha256": data_sha256, "loss_floor": loss_floor, "labels": labels,
    }  # fmt: skip
    if objective is not None:
        state["objective"] = objective
    if loss_floor_absent is not None:
        state["loss_floor_absent"] = loss_floor_absent
    if normalisation is not None:
        state["normalisation"] = normalisation
    tensors = {"held_out": held_out, **checkpoint.prefixed("normalizer", normalizer.state_dict())}
    if labels is not None and held_out_labels is not None:
        tensors["held_out_labels"] = held_out_labels
    if source is not None:
        state["source"] = source.info()
        tensors["held_out_source"] = source.held_out
        if source.held_out_labels is not None:
            tensors["held_out_source_labels"] = source.held_out_labels
    checkpoint.save_checkpoint(run_dir / RUN_FILE, tensors, state)
    _io.save_json(run_dir / CONFIG_FILE, config.to_dict())


@dataclass
class RunFile:
    """The checked contents of ``run.safetensors``."""

    config: TrainConfig
    path: GaussianPath
    model_config: dict[str, Any]
    data_shape: tuple[int, ...]
    n_train: int
    data_sha256: str
    loss_floor: dict[str, Any] | None
    held_out: torch.Tensor
    normalizer: datasets.Normalizer
    labels: dict[str, Any] | None = None
    held_out_labels: torch.Tensor | None = None
    objective: dict[str, Any] | None = None
    loss_floor_absent: str | None = None
    source: dict[str, Any] | None = None
    held_out_source: torch.Tensor | None = None
    held_out_source_labels: torch.Tensor | None = None
    normalisation: dict[str, Any] | None = None


class _Damaged(ValueError):
    pass


def _require(ok: bool, what: str) -> None:
    if not ok:
        raise _Damaged(what)


def _is_int(value: object, low: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def read_run_file(run_dir: str | Path) -> RunFile:
    """``run.safetensors`` of ``run_dir``, every description checked against its tensors (``ValueError``)."""
    run_dir = Path(run_dir)
    if not (run_dir / RUN_FILE).is_file():
        raise ValueError(
            f"{str(run_dir)!r} is not a flowscore run (no {RUN_FILE}); pass the run_dir of a training"
        )
    try:
        _check_run_file_sizes(
            checkpoint.read_state(run_dir / RUN_FILE), checkpoint.tensor_shapes(run_dir / RUN_FILE)
        )
        tensors, state = checkpoint.load_checkpoint(run_dir / RUN_FILE)
        return _check_run_file(state, tensors)
    except _Damaged as err:
        raise ValueError(
            f"{RUN_FILE} of {str(run_dir)!r} is damaged or was not written by flowscore ({err}); train again"
        ) from None


def _check_run_file_sizes(state: dict[str, Any], shapes: dict[str, tuple[str, tuple[int, ...]]]) -> None:
    """The sizes in the header of ``run.safetensors`` within what its config allows, before any tensor is
    read: at most ``n_holdout`` (else 2000) held-out points, each and every other tensor at most one point."""
    config = state.get("config")
    n_holdout = config.get("n_holdout") if isinstance(config, dict) else None
    most = n_holdout if _is_int(n_holdout) else 2000
    for name, (_, shape) in shapes.items():
        held = name.startswith("held_out")
        rows, size = (shape[0] if shape else 1, math.prod(shape[1:])) if held else (0, math.prod(shape))
        _require(
            rows <= most and size <= models.LIMITS["dim"],
            f"{name} has shape {shape}, more than the run's {most} held-out points of at most "
            f"{models.LIMITS['dim']} values",
        )


def _check_run_file(state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> RunFile:
    _require(state.get("format") == RUN_FORMAT, f"format {state.get('format')!r}, expected {RUN_FORMAT}")
    try:
        config = _stored_config(state.get("config"))
    except ValueError as err:
        raise _Damaged(f"config: {err}") from None
    shape = state.get("data_shape")
    _require(
        isinstance(shape, list) and len(shape) in (1, 3) and all(_is_int(s, 1) for s in shape),
        f"data_shape must be a list of 1 or 3 positive integers, got {models._short(shape)}",
    )
    shape = tuple(shape)
    _require(math.prod(shape) <= models.LIMITS["dim"], f"data_shape {shape} is too large")
    held_out = tensors.get("held_out")
    _require(
        isinstance(held_out, torch.Tensor)
        and held_out.is_floating_point()
        and held_out.dim() == 1 + len(shape),
        "held_out must be a float tensor of shape (M, *data_shape)",
    )
    _require(tuple(held_out.shape[1:]) == shape, f"held_out has shape {tuple(held_out.shape)}, data {shape}")
    norm = checkpoint.unprefixed("normalizer", tensors)
    _require(set(norm) == {"shift", "scale"}, "the normalizer must hold shift and scale")
    _require(
        all(v.is_floating_point() and v.shape == norm["shift"].shape for v in norm.values()),
        "the normalizer's shift and scale must be float tensors of one shape",
    )
    small = tuple(norm["shift"].shape)
    aligned = zip(reversed(small), reversed(shape[len(shape) - len(small) :]), strict=True)
    fits = len(small) <= len(shape) and all(s in (1, d) for s, d in aligned)
    _require(fits, f"the normalizer's shape {tuple(norm['shift'].shape)} does not fit data of shape {shape}")
    try:
        normalizer = datasets.Normalizer.from_state_dict(norm)
    except ValueError as err:
        raise _Damaged(f"normalizer: {err}") from None
    path_config = state.get("path")
    _require(
        isinstance(path_config, dict) and path_config.get("name") in PATH_NAMES,
        f"path must be a dict naming one of {', '.join(PATH_NAMES)}",
    )
    try:
        path = get_path(path_config["name"], **{k: v for k, v in path_config.items() if k != "name"})
    except (ValueError, TypeError) as err:
        raise _Damaged(f"path: {err}") from None
    trained = get_path(config.path, **config.path_options).config()
    _require(path.config() == trained, f"the stored path {path.config()} is not the config's path {trained}")
    try:
        model_config = models.check_description(state.get("model"))
    except ValueError as err:
        raise _Damaged(str(err)) from None
    if model_config["kind"] == "mlp":
        fits = model_config["dim"] == math.prod(shape)
    elif model_config["kind"] == "unet":
        fits = len(shape) == 3 and model_config["channels"] == shape[0]
    else:
        fits = True
    _require(fits, f"the model description {model_config} does not fit data of shape {shape}")
    labels, held_labels = _check_labels(state.get("labels"), tensors.get("held_out_labels"), held_out)
    if labels is not None and model_config.get("num_classes") is not None:
        _require(
            labels["num_classes"] == model_config["num_classes"],
            f"the model has {model_config['num_classes']} classes but the labels {labels['num_classes']}",
        )
    _require(_is_int(state.get("n_train"), 1), "n_train must be a positive integer")
    _require(isinstance(state.get("data_sha256"), str), "data_sha256 must be a string")
    floor = state.get("loss_floor")
    _require(
        floor is None or (isinstance(floor, dict) and isinstance(floor.get("value"), (int, float))),
        "loss_floor must be null or a dict with a numeric value",
    )
    objective = state.get("objective")
    _require(
        objective is None or (isinstance(objective, dict) and isinstance(objective.get("name"), str)
                              and objective.get("prediction", "velocity") in KINDS),
        "objective must be null or a dict with a name and a prediction",
    )  # fmt: skip
    absent = state.get("loss_floor_absent")
    _require(absent is None or isinstance(absent, str), "loss_floor_absent must be null or a string")
    source, source_held, source_labels = _check_source(state.get("source"), tensors, shape, config)
    normalisation = state.get("normalisation")
    _require(
        normalisation is None or (isinstance(normalisation, dict)
                                  and _is_number(normalisation.get("sigma_data"))
                                  and 0 < normalisation["sigma_data"] < math.inf),
        "normalisation must be null or a dict with a positive finite sigma_data",
    )  # fmt: skip
    return RunFile(
        config,
        path,
        model_config,
        shape,
        state["n_train"],
        state["data_sha256"],
        floor,
        held_out,
        normalizer,
        labels,
        held_labels,
        objective,
        absent,
        source,
        source_held,
        source_labels,
        normalisation,
    )


def _check_source(
    source: object, tensors: dict[str, torch.Tensor], shape: tuple[int, ...], config: TrainConfig
) -> tuple[dict[str, Any] | None, torch.Tensor | None, torch.Tensor | None]:
    """The stored data source (its description, held-out points and labels), checked; all None for a run
    from N(0, I)."""
    held, labels = tensors.get("held_out_source"), tensors.get("held_out_source_labels")
    if source is None:
        _require(
            held is None and labels is None and not config.source, "a source is stored but not described"
        )
        return None, None, None
    _require(
        isinstance(source, dict) and isinstance(source.get("name"), str)
        and isinstance(source.get("sha256"), str)
        and _is_int(source.get("n_train"), 1),
        "source must be a dict with a name, sha256 and n_train",
    )  # fmt: skip
    _require(
        isinstance(held, torch.Tensor) and held.is_floating_point() and tuple(held.shape[1:]) == shape,
        f"held_out_source must be a float tensor of shape (M, {', '.join(map(str, shape))})",
    )  # fmt: skip
    _require(
        labels is None or (labels.dtype == torch.int64 and tuple(labels.shape) == (held.shape[0],)
                           and (labels.numel() == 0 or int(labels.min()) >= 0)),
        "held_out_source_labels must be int64 labels >= 0, one per held-out source point",
    )  # fmt: skip
    return dict(source), held, labels


def _check_labels(
    labels: object, held_labels: object, held_out: torch.Tensor
) -> tuple[dict[str, Any] | None, torch.Tensor | None]:
    """The stored label description and held-out labels, checked (both None for an unlabelled run)."""
    if labels is None:
        _require(held_labels is None, "held_out_labels are stored but the run has no labels")
        return None, None
    _require(isinstance(labels, dict) and set(labels) == {"num_classes", "class_counts"}, "labels malformed")
    k, counts = labels["num_classes"], labels["class_counts"]
    _require(k is None or (_is_int(k, 1) and k <= models.LIMITS["num_classes"]), "num_classes malformed")
    _require(
        counts is None or (k is not None and isinstance(counts, list) and len(counts) == k
                           and all(_is_int(c) for c in counts)),
        "class_counts must be one count per class",
    )  # fmt: skip
    _require(
        isinstance(held_labels, torch.Tensor) and held_labels.dtype == torch.int64
        and tuple(held_labels.shape) == (held_out.shape[0],),
        "held_out_labels must be int64, one per held-out point",
    )  # fmt: skip
    if held_labels.numel():
        top = k if k is not None else models.LIMITS["num_classes"]
        _require(int(held_labels.min()) >= 0 and int(held_labels.max()) < top, "held_out_labels out of range")
    return dict(labels), held_labels


def _stored_config(values: object) -> TrainConfig:
    """The ``TrainConfig`` of a stored dict. A run stored before class labels, preconditioning,
    ``data_std`` or ``network_path`` existed has no such key and was trained without them (unit-variance
    data, the path's own scalings): it keeps ``labels=False``, ``precondition=False``, ``data_std=1``,
    ``network_path="own"``, so that it loads and resumes as it was. One stored before presets had the sizes
    of the "default" preset (its ``width`` None: the model's default)."""
    if isinstance(values, dict):
        old = {
            "labels": False,
            "precondition": False,
            "data_std": 1.0,
            "network_path": "own",
            "preset": "default",
        }
        values = {**old, **values}
    return TrainConfig.from_dict(values)


def stored_config(run_dir: str | Path) -> TrainConfig:
    """The config of the run in ``run_dir`` (read from the header of ``run.safetensors`` alone)."""
    file = Path(run_dir) / RUN_FILE
    if not file.is_file():
        raise ValueError(f"{str(run_dir)!r} is not a flowscore run (no {RUN_FILE})")
    try:
        return _stored_config(checkpoint.read_state(file).get("config"))
    except ValueError as err:
        raise ValueError(f"the config stored in {str(file)!r} is not valid ({err}); train again") from None


# -- a trained run -----------------------------------------------------------------------------------------
@dataclass
class Run:
    """A trained run: ``model`` holds the EMA weights in eval mode; ``held_out`` is in data space.

    The model works in the normalizer's space: ``normalizer.decode(sample)`` maps its samples to data.
    Labelled runs: ``num_classes`` (None when a DataLoader's run could not tell), ``class_counts`` (training
    points per class, or None) and ``held_out_labels``; the model is then called as ``model(x, t, y)``.
    A run trained from a data source (:mod:`flowscore.source_data`): ``source`` (its name, size and
    checksum), ``held_out_source`` (data units) and ``held_out_source_labels``; ``model.x_source`` holds
    those points encoded, from which :func:`flowscore.sample` starts. ``normalisation``: ``{"data_std",
    "sigma_data", "shared_with_source"}`` (None for runs stored before it was recorded).
    """

    config: TrainConfig
    path: GaussianPath
    model: nn.Module
    prediction: str
    normalizer: datasets.Normalizer
    held_out: torch.Tensor
    data_shape: tuple[int, ...]
    log: list[dict[str, Any]]
    loss_floor: LossFloor | None
    step: int
    run_dir: Path
    num_classes: int | None = None
    class_counts: list[int] | None = None
    held_out_labels: torch.Tensor | None = None
    labelled: bool = False
    objective: dict[str, Any] | None = None
    loss_floor_absent: str | None = None
    source: dict[str, Any] | None = None
    held_out_source: torch.Tensor | None = None
    held_out_source_labels: torch.Tensor | None = None
    normalisation: dict[str, Any] | None = None


def _fit_weights(model: nn.Module, weights: dict[str, torch.Tensor], run_dir: Path) -> None:
    """Loads ``weights`` into ``model``, or one ``ValueError`` naming what does not fit."""
    own = model.state_dict()
    missing = sorted(set(own) - set(weights))
    unexpected = sorted(set(weights) - set(own))
    wrong = [f"{k} {tuple(weights[k].shape)} vs {tuple(own[k].shape)}" for k in own
             if k in weights and weights[k].shape != own[k].shape]  # fmt: skip
    if missing or unexpected or wrong:
        parts = [f"{what}: {', '.join(names[:4])}{' ...' if len(names) > 4 else ''}"
                 for what, names in (("missing in the checkpoint", missing), ("not in the model", unexpected),
                                     ("shape (stored vs model)", wrong)) if names]  # fmt: skip
        raise ValueError(
            f"the weights of run {str(run_dir)!r} do not fit this model ({'; '.join(parts)}); build the "
            "model the run was trained with"
        )
    with torch.no_grad():
        for name, value in own.items():
            value.copy_(weights[name])


def load_run(run_dir: str | Path, model: nn.Module | None = None, objective: Any = None) -> Run:
    """Reads a run folder written by :class:`flowscore.training.Trainer` (no code is executed).

    Every description is checked against the stored tensors before the model is built (the number of
    weights its config asks for must equal the number stored), so a damaged or hostile folder raises
    ``ValueError`` quickly and allocates no more than its files' size. ``model``: load the EMA weights into
    this module instead (required for a run trained on your own model; its weights are copied in where it
    lives, and it is put in eval mode without gradients); a clear ``ValueError`` when they do not fit.
    ``objective``: the :class:`flowscore.Objective` of a run trained on your own objective whose ``wrap``
    changes the network (its prediction is read from the run either way); built-in objectives are rebuilt
    from the config. ``run.loss_floor`` is a :class:`flowscore.LossFloor` (None with ``loss_floor_absent``
    saying why, where the run says).
    """
    run_dir = Path(run_dir)
    run_file = read_run_file(run_dir)
    if not (run_dir / CHECKPOINT_FILE).is_file():
        raise ValueError(f"run {str(run_dir)!r} has no checkpoint yet; resume its training first")
    description = run_file.model_config
    if model is None and description["kind"] == models.CUSTOM:
        raise ValueError(
            f"run {str(run_dir)!r} was trained with your own model ({description['class']}, "
            f"{description['parameters']} weights); build it and pass it: load_run(run_dir, model=...)"
        )
    if model is not None and not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch nn.Module, got {type(model).__name__}")
    tensors, state = checkpoint.load_checkpoint(run_dir / CHECKPOINT_FILE)
    step = state.get("step")
    if not _is_int(step):
        raise ValueError(f"checkpoint of {str(run_dir)!r} has no valid step; train again")
    ema = checkpoint.unprefixed("ema", tensors)
    if model is None:
        stored = sum(v.numel() for v in ema.values())
        expected = models.parameter_count(description)
        if stored != expected or not all(v.is_floating_point() for v in ema.values()):
            raise ValueError(
                f"checkpoint of {str(run_dir)!r} holds {stored} weights but its model description asks for "
                f"{expected}; the run is damaged, train again"
            )
        model = models.model_from_config(description)
        try:
            model.load_state_dict(ema)
        except RuntimeError as err:
            cause = " ".join(str(err).split())[:300]
            raise ValueError(
                f"checkpoint of {str(run_dir)!r} does not fit its model ({cause}); train again"
            ) from None
    else:
        _fit_weights(model, ema, run_dir)
    labels = run_file.labels or {}
    stored = run_file.objective or {}
    name = stored.get("name", run_file.config.objective)
    if objective is None and (name in BRIDGES or (name in FLOW_MAPS and "share_equal" in stored)):
        # these objectives store all their options (an SB run its sigma, a flow map the guidance trained into
        # its target), and may have been given to the Trainer as objective= with the config's left at cfm
        objective = objective_from_dict(stored)
    elif objective is None and name in (*BUILTIN, *FLOW_MAPS):
        sigma_data = (run_file.normalisation or {}).get("sigma_data")
        objective = objective_from_config(run_file.config, run_file.path, model, sigma_data)
    wrapped = model if objective is None else objective.wrap(model)
    if run_file.held_out_source is not None:  # flowscore.sample starts from them (samplers._from_source)
        wrapped.x_source = run_file.normalizer.encode(run_file.held_out_source.float())
        wrapped.x_source_labels = run_file.held_out_source_labels
    try:
        floor = None if run_file.loss_floor is None else LossFloor.from_dict(run_file.loss_floor)
    except ValueError as err:
        raise ValueError(f"{RUN_FILE} of {str(run_dir)!r} is damaged ({err}); train again") from None
    return Run(
        config=run_file.config,
        path=run_file.path,
        model=wrapped.eval().requires_grad_(False),
        prediction=stored.get("prediction", run_file.config.prediction),
        normalizer=run_file.normalizer,
        held_out=run_file.held_out,
        data_shape=run_file.data_shape,
        log=read_log(run_dir / LOG_FILE, last=LOG_ROWS_READ),
        loss_floor=floor,
        step=step,
        run_dir=run_dir,
        num_classes=labels.get("num_classes"),
        class_counts=labels.get("class_counts"),
        held_out_labels=run_file.held_out_labels,
        labelled=run_file.labels is not None,
        objective=run_file.objective,
        loss_floor_absent=run_file.loss_floor_absent,
        source=run_file.source,
        held_out_source=run_file.held_out_source,
        held_out_source_labels=run_file.held_out_source_labels,
        normalisation=run_file.normalisation,
    )


# -- resuming ----------------------------------------------------------------------------------------------
def read_resume_state(run_dir: str | Path) -> tuple[RunFile, dict[str, torch.Tensor], dict[str, Any]]:
    """Everything ``train --resume`` continues from, checked before anything is written: the run file as
    :func:`load_run` checks it, and the checkpoint's training state (:func:`check_training_state`).
    Returns ``(run file, checkpoint tensors, checkpoint state)``; one-line ``ValueError`` otherwise."""
    run_dir = Path(run_dir)
    run_file = read_run_file(run_dir)
    file = run_dir / CHECKPOINT_FILE
    _require_regular(file)
    model = run_file.model_config
    weights = models.parameter_count(model) if model["kind"] != models.CUSTOM else model.get("parameters")
    try:
        shapes = checkpoint.tensor_shapes(file)
        for prefix in ("model", "ema"):
            stored = sum(
                math.prod(shape) for name, (_, shape) in shapes.items() if name.startswith(prefix + ".")
            )
            _require(stored == weights, f"{prefix} holds {stored} values but its model has {weights} weights")
        _require(
            sum(math.prod(shape) for _, shape in shapes.values()) <= 4 * weights + 2**24,
            "it holds more values than a model, its EMA and its optimizer state",
        )
        tensors, state = checkpoint.load_checkpoint(file)
        check_training_state(tensors, state, float32=model["kind"] != models.CUSTOM)
    except _Damaged as err:
        raise ValueError(
            f"the checkpoint of {str(run_dir)!r} is damaged or was not written by flowscore ({err}); it "
            "cannot be resumed: restore a good copy of the run folder, or start a new run"
        ) from None
    return run_file, tensors, state


def _require_regular(file: Path) -> None:
    if not file.is_file() or file.is_symlink():
        raise ValueError(
            f"{str(file)!r} is not a regular file; move it away (or restore the run) before resuming"
        )


def check_training_state(
    tensors: dict[str, torch.Tensor], state: dict[str, Any], float32: bool = True
) -> None:
    """The loop state of a checkpoint is one a training can continue (raises ``_Damaged``, a ValueError):
    a non-negative integer step; finite loss statistics; AdamW hyper-parameters a training sets (betas
    in [0, 1), eps > 0, a finite non-negative lr and weight decay, maximize false); model, EMA and optimizer
    tensors finite and float32 (``float32=False``, your own model: its floating tensors finite, of any
    dtype), second moments >= 0; the generators' states as bytes."""
    _require(_is_int(state.get("step")), f"step {models._short(state.get('step'))} is not an integer >= 0")
    _require(_is_int(state.get("window_count")), "window_count is not an integer >= 0")
    for name in ("window_sum", "loss_ema"):
        value = state.get(name)
        finite = _is_number(value) and math.isfinite(value)
        _require(
            finite or (name == "loss_ema" and value is None), f"{name} {models._short(value)} is not finite"
        )
    optimizer = state.get("optimizer")
    _require(
        isinstance(optimizer, dict) and isinstance(optimizer.get("param_groups"), list)
        and isinstance(optimizer.get("scalars"), dict) and len(optimizer["param_groups"]) >= 1,
        "optimizer state malformed",
    )  # fmt: skip
    for group in optimizer["param_groups"]:
        _require(isinstance(group, dict), "optimizer group malformed")
        betas = group.get("betas")
        _require(
            isinstance(betas, list) and len(betas) == 2 and all(_is_number(b) and 0 <= b < 1 for b in betas),
            f"optimizer betas {models._short(betas)} are not two numbers in [0, 1)",
        )
        eps, lr, decay = group.get("eps"), group.get("lr"), group.get("weight_decay")
        _require(_is_number(eps) and 0 < eps < math.inf, f"optimizer eps {models._short(eps)} is not > 0")
        for name, value in (("lr", lr), ("weight_decay", decay)):
            _require(_is_number(value) and 0 <= value < math.inf, f"optimizer {name} {models._short(value)}")
        for flag in ("maximize", "capturable", "differentiable"):
            _require(group.get(flag, False) is False, f"optimizer {flag} must be false")
        _require(group.get("amsgrad", False) in (False, True), "optimizer amsgrad must be true or false")
    for name, value in tensors.items():
        if name.startswith(("model.", "ema.", "optim.")):
            if float32:
                _require(value.dtype == torch.float32, f"{name} is {value.dtype}, not float32")
            if not value.is_floating_point():
                continue
            _require(bool(torch.isfinite(value).all()), f"{name} is not finite")
            if name.endswith((".exp_avg_sq", ".step")):
                _require(bool((value >= 0).all()), f"{name} is negative")
        elif name.startswith("rng."):
            _require(value.dtype == torch.uint8 and value.dim() == 1, f"{name} is not a byte state")


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# -- the run folder's life while training (used by flowscore.training) -------------------------------------
def _check_run_dir(run_dir: Path, resume: bool) -> None:
    """Refuses a run_dir that is a file, or a non-empty one without ``resume`` (reads only)."""
    d = run_dir
    if d.exists() and not d.is_dir():
        raise ValueError(f"run_dir {str(d)!r} exists and is not a directory; choose another run_dir")
    odd = [n for n in RUN_FILES if os.path.islink(d / n) or os.path.lexists(d / n)
           and not os.path.isfile(d / n)]  # fmt: skip
    if resume and odd:
        raise ValueError(
            f"{', '.join(odd)} in {str(d)!r} is not a regular file; move it away (a run folder holds "
            "only its own files)"
        )
    if not resume and d.is_dir() and not holds_nothing(d):
        raise ValueError(
            f"run_dir {str(d)!r} is not empty; pass resume=True to continue it or pick a new one"
        )


def _restore(
    run_dir: Path, config: TrainConfig, resume: bool
) -> tuple[RunFile, dict[str, torch.Tensor], dict[str, Any]] | None:
    """The run file and checkpoint to continue from (checked: :func:`read_resume_state`), or None when
    there is no checkpoint; refuses a changed config (only ``RESUMABLE_CHANGES`` may change)."""
    d = run_dir
    if not resume or not os.path.lexists(d / CHECKPOINT_FILE):
        return None
    stored = stored_config(d)
    changed = [k for k, v in config.to_dict().items() if stored.to_dict()[k] != v]
    bad = [k for k in changed if k not in RESUMABLE_CHANGES]
    if bad:
        raise ValueError(
            f"cannot resume {str(d)!r} with a different {', '.join(bad)}; only "
            f"{', '.join(RESUMABLE_CHANGES)} may change (or start a new run)"
        )
    return read_resume_state(d)


def _check_resumable(
    run_dir: Path, run_file: RunFile, prepared: _Prepared
) -> tuple[LossFloor | None, str | None]:
    """Refuses to resume ``run_dir`` with other data, model or objective than it was trained with, or with
    an altered run file; returns the run's stored loss floor (and why it is absent)."""
    if run_file.data_sha256 != prepared.data_sha256:
        raise ValueError(f"the data of {str(run_dir)!r} changed since the run started; start a new run")
    given = None if prepared.source is None else prepared.source.sha256
    if (run_file.source or {}).get("sha256") != given:
        what = "its source was N(0, I)" if run_file.source is None else "pass the same source again"
        raise ValueError(f"the source of {str(run_dir)!r} is not the one it was trained with; {what}")
    run_state = checkpoint.read_state(run_dir / RUN_FILE)
    _check_same_model(run_dir, run_state.get("model"), prepared.description)
    _check_same_objective(run_dir, run_state.get("objective"), prepared.objective)
    _check_same_split(run_dir, run_file, prepared)
    return _stored_floor(run_state)


def _make_dir(run_dir: Path) -> bool:
    """Creates ``run_dir`` (and its parents); True if this call created it (atomic: one process wins).
    A folder that cannot be created (no permission, a read-only disk, a link loop) is a ``ValueError``."""
    try:
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        run_dir.mkdir()
    except FileExistsError:
        if not run_dir.is_dir():
            raise ValueError(
                f"run_dir {str(run_dir)!r} exists and is not a directory; choose another"
            ) from None
        return False
    except OSError as err:
        cause = os.strerror(err.errno).lower() if err.errno else str(err)
        raise ValueError(f"run_dir {str(run_dir)!r} cannot be created ({cause}); choose another") from None
    return True


def _remove_own_files(run_dir: Path, created: bool, written: bool = True) -> None:
    """After a failure before the first checkpoint, while holding the lock: deletes what this process
    wrote, never another process's files. ``written``: this process started writing the run's files
    (which it does only into a folder that held nothing but a lock and temporaries, checked under the
    lock), so every run file there is its own; otherwise it wrote only its lock. The folder itself goes
    too when this process created it and nothing else is in it."""
    if written:
        remove_temporaries(run_dir)
        shutil.rmtree(run_dir / TENSORBOARD_FOLDER, ignore_errors=True)
        for name in RUN_FILES:
            if name != LOCK_FILE:
                with contextlib.suppress(FileNotFoundError):
                    (run_dir / name).unlink()
    with contextlib.suppress(OSError):
        if written or (created and [p.name for p in run_dir.iterdir()] == [LOCK_FILE]):
            (run_dir / LOCK_FILE).unlink()  # a later writer that opened it re-opens (RunLock.acquire)
    if created:
        with contextlib.suppress(OSError):
            run_dir.rmdir()  # only when empty


def _check_same_model(run_dir: Path, stored: object, given: dict[str, Any]) -> None:
    """``ValueError`` when a resumed run is given another model than the one it was trained with."""
    try:
        stored = check_description(stored)  # fills options a run stored before they existed
    except ValueError:
        pass
    if stored == given:
        return
    if isinstance(stored, dict) and stored.get("kind") == CUSTOM and given.get("kind") != CUSTOM:
        raise ValueError(
            f"run {str(run_dir)!r} was trained with your own model ({stored.get('class')}, "
            f"{stored.get('parameters')} weights); pass it again: Trainer(..., model=...)"
        )
    raise ValueError(
        f"run {str(run_dir)!r} was trained with the model {stored}, not {given}; pass the same model to "
        "resume"
    )


def _check_same_objective(run_dir: Path, stored: object, given: Objective) -> None:
    """``ValueError`` when a resumed run is given another objective than the one it was trained with (a run
    trained on your own objective needs it again). Runs stored before objectives were stored: not checked."""
    if not isinstance(stored, dict):
        return
    mine = given.to_dict()
    if stored.get("name") == mine["name"] and stored.get("class") == mine["class"]:
        return
    if stored.get("name") not in BUILTIN and mine["name"] in BUILTIN:
        raise ValueError(
            f"run {str(run_dir)!r} was trained with your own objective ({stored.get('class')}); pass it "
            "again: Trainer(..., objective=...)"
        )
    raise ValueError(
        f"run {str(run_dir)!r} was trained with the objective {stored.get('class')} ({stored.get('name')}), "
        f"not {mine['class']} ({mine['name']}); pass the same objective to resume"
    )


def _check_same_split(run_dir: Path, run_file: RunFile, prepared: _Prepared) -> None:
    """``ValueError`` when what the run file stores about the data (training points, held-out points and
    labels, normalizer, classes) is not what the same data gives again: the file was altered."""
    if prepared.stream is not None:
        return
    source = prepared.source
    stored = (run_file.n_train, run_file.held_out, run_file.normalizer.state_dict(), run_file.labels,
              run_file.held_out_labels, run_file.held_out_source,
              run_file.held_out_source_labels)  # fmt: skip
    given = (prepared.n_train, prepared.held_out, prepared.normalizer.state_dict(), prepared.label_info(),
             prepared.held_out_labels, None if source is None else source.held_out,
             None if source is None else source.held_out_labels)  # fmt: skip
    if not _same(stored, given):
        raise ValueError(
            f"{RUN_FILE} of {str(run_dir)!r} does not match its data (its training or held-out points, "
            "normalizer or labels were altered); restore a good copy of the run folder, or start a new run"
        )


def _same(a: object, b: object) -> bool:
    """Equality of nested tuples, dicts, lists and tensors (tensors: same dtype, shape and values)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
            and a.shape == b.shape and torch.equal(a.cpu(), b.cpu())
        )  # fmt: skip
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def _stored_floor(run_state: dict[str, Any]) -> tuple[LossFloor | None, str | None]:
    """The loss floor a run stored (and why it is absent), as when it started."""
    stored = run_state.get("loss_floor")
    floor = None if stored is None else LossFloor.from_dict(stored)
    absent = run_state.get("loss_floor_absent")
    return floor, absent if isinstance(absent, str) else None
