"""Training data given through the API: tensors, a ``(x, y)`` pair, a ``Dataset`` or a ``DataLoader``.

:func:`as_tensors` turns a tensor ``(N, *dims)``, a pair ``(x, y)`` of data and integer class labels, or a
map-style ``torch.utils.data.Dataset`` whose items are ``x`` or ``(x, y)`` into float32 data and int64
labels (a Dataset is read once, item by item, into memory). The trainer then treats them exactly like a
named data set: normalizer, held-out split, loss floor, checksum.

A ``DataLoader`` is streamed instead (:class:`LoaderStream`): its batches are used as they come (no
normalizer, no held-out points, no loss floor: those need the whole data set), epoch after epoch. Its
position is part of the checkpoint: the epoch, the batches taken in it, and the states of the random number
generators at the start of the epoch (torch's global one, from which a shuffling loader without a generator
draws its order, and the loader's and sampler's own generators). Resuming recreates the epoch's iterator from
those states and skips the batches already used, so the batches after a resume are the ones an
uninterrupted run would have drawn, provided the order and content of the batches follow from those
generators: true for ``shuffle=False`` or ``True``, with or without a ``generator``, and for random
transforms in worker processes (seeded from the loader); not for random transforms that draw from torch's
global generator in the main process (``num_workers=0``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, default_collate

from . import data as datasets
from .data import check_class_labels

if TYPE_CHECKING:
    from torch import nn

    from .config import TrainConfig

DATA_KINDS = (
    "a tensor (N, *dims), a pair (x, y) of data and integer class labels, a torch Dataset or a DataLoader"
)


def _as_float(x: object, what: str) -> torch.Tensor:
    """``x`` as a float32 tensor ``(N, *dims)`` with ``N >= 1``, finite; one-line ``ValueError`` otherwise."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{what} must be a tensor, got {type(x).__name__}")
    if x.dtype == torch.bool or x.is_complex():
        raise ValueError(f"{what} must hold real numbers, got dtype {x.dtype}")
    if x.dim() < 2 or x.shape[0] == 0 or x[0].numel() == 0:
        raise ValueError(f"{what} must be shaped (N, *dims) with N >= 1 points, got shape {tuple(x.shape)}")
    x = x.detach().to("cpu", torch.float32).contiguous()
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{what} contains NaN or Inf (or values too large for float32); clean it first")
    return x


def _pair(item: object) -> tuple[object, object | None]:
    """``(x, y)`` of an item or batch that is ``x`` or a pair ``(x, y)``."""
    if isinstance(item, (tuple, list)):
        if len(item) != 2:
            raise ValueError(f"data items must be x or a pair (x, y), got a sequence of {len(item)} elements")
        return item[0], item[1]
    return item, None


def as_tensors(data: object, what: str = "data") -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(x, y)``: float32 data ``(N, *dims)`` and int64 labels ``(N,)`` in ``0..K-1`` (or None).

    ``data``: a tensor (or NumPy array) ``(N, *dims)``; a pair ``(x, y)``; or a map-style ``Dataset`` whose
    items are ``x`` or ``(x, y)`` (read once, in index order, and stacked). Bad labels (not whole numbers,
    negative, NaN, a length other than N) raise a one-line ``ValueError`` (naming ``what``).
    """
    if isinstance(data, (DataLoader, IterableDataset)):
        raise ValueError("as_tensors takes tensors or a map-style Dataset; a DataLoader is streamed instead")
    if isinstance(data, Dataset):
        if not hasattr(data, "__len__"):
            raise ValueError("a Dataset without __len__ cannot be read into memory; wrap it in a DataLoader")
        if len(data) == 0:
            raise ValueError(f"{what}: the Dataset is empty")
        try:
            data = default_collate([data[i] for i in range(len(data))])
        except (TypeError, RuntimeError) as err:
            raise ValueError(
                f"{what}: the Dataset's items cannot be stacked ({' '.join(str(err).split())})"
            ) from None
    x, y = _pair(data)
    x = _as_float(x, what)
    if y is None:
        return x, None
    return x, check_class_labels(y, x.shape[0], f"{what}: labels y")


def _generators(loader: DataLoader) -> list[torch.Generator]:
    """The distinct generators a loader draws its order from: its own and its (batch) sampler's."""
    found: list[torch.Generator] = []
    candidates = [
        getattr(loader, "generator", None),
        getattr(loader.sampler, "generator", None),
        getattr(getattr(loader.batch_sampler, "sampler", None), "generator", None),
    ]
    for gen in candidates:
        if isinstance(gen, torch.Generator) and all(gen is not g for g in found):
            found.append(gen)
    return found


class LoaderStream:
    """The batches ``(x, y or None)`` of a ``DataLoader``, epoch after epoch, with a restorable position.

    See the module docstring for what a restored position reproduces. ``state()`` and ``load()`` give and
    take ``(tensors, dict)`` for a checkpoint.
    """

    def __init__(self, loader: DataLoader):
        if not isinstance(loader, DataLoader):
            raise ValueError(f"expected a torch DataLoader, got {type(loader).__name__}")
        self.loader = loader
        self.generators = _generators(loader)
        self.epoch = 0
        self.batch = 0
        self._iterator: Iterator[Any] | None = None
        self._epoch_states: list[torch.Tensor] = []

    def _rng_states(self) -> list[torch.Tensor]:
        return [torch.get_rng_state(), *(g.get_state() for g in self.generators)]

    def _set_rng_states(self, states: list[torch.Tensor]) -> None:
        torch.set_rng_state(states[0])
        for gen, state in zip(self.generators, states[1:], strict=True):
            gen.set_state(state)

    def _start_epoch(self) -> None:
        self._epoch_states = self._rng_states()
        self._iterator = iter(self.loader)
        self.batch = 0

    def peek(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The first batch of a fresh epoch, leaving every generator (and this stream) as it was."""
        saved = self._rng_states()
        try:
            item = next(iter(self.loader))
        except StopIteration:
            raise ValueError("data: the DataLoader yields no batches") from None
        finally:
            self._set_rng_states(saved)
        return self._checked(item)

    def _checked(self, item: object) -> tuple[torch.Tensor, torch.Tensor | None]:
        x, y = _pair(item)
        if not isinstance(x, torch.Tensor) or x.dim() < 2 or x.is_complex() or x.dtype == torch.bool:
            got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(
                f"data: a DataLoader batch must be a real tensor (B, *dims) or a pair (x, y), got {got}"
            )
        if y is not None and (
            not isinstance(y, torch.Tensor) or y.dtype.is_floating_point or y.dtype == torch.bool
            or y.shape != (x.shape[0],)
        ):  # fmt: skip
            got = f"{y.dtype} {tuple(y.shape)}" if isinstance(y, torch.Tensor) else type(y).__name__
            raise ValueError(f"data: a batch's labels y must be an integer tensor ({x.shape[0]},), got {got}")
        return x, y

    def next(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The next batch ``(x, y or None)``; a new epoch starts when the loader is exhausted."""
        if self._iterator is None:
            self._start_epoch()
        try:
            item = next(self._iterator)
        except StopIteration:
            self.epoch += 1
            self._start_epoch()
            try:
                item = next(self._iterator)
            except StopIteration:
                raise ValueError("data: the DataLoader yields no batches") from None
        self.batch += 1
        return self._checked(item)

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        if self._iterator is None:  # no batch taken yet: the epoch starts from the states of now
            return {}, {"epoch": self.epoch, "batch": 0, "started": False}
        tensors = {f"loader.rng.{i}": s for i, s in enumerate(self._epoch_states)}
        return tensors, {"epoch": self.epoch, "batch": self.batch, "started": True}

    def load(self, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
        """Restores the position: the epoch's iterator from its starting generator states, then skips the
        batches already used. Torch's global generator is left at the epoch's start: the caller restores it
        to the checkpoint's state afterwards."""
        self.epoch = int(state["epoch"])
        if not state["started"]:
            self._iterator = None
            self.batch = 0
            return
        states = [tensors[f"loader.rng.{i}"] for i in range(len(self.generators) + 1)]
        self._set_rng_states(states)
        self._start_epoch()
        for _ in range(int(state["batch"])):
            try:
                next(self._iterator)
            except StopIteration:
                raise ValueError(
                    f"the DataLoader now has fewer than {state['batch']} batches per epoch; it is not the "
                    "one this run started with"
                ) from None
            self.batch += 1


# -- the data of a training run ---------------------------------------------------------------------------
def checksum(tensor: torch.Tensor, labels: torch.Tensor | None = None) -> str:
    """SHA-256 of the data (and labels) as stored: a resumed run checks that it trains on the same data."""
    digest = hashlib.sha256(tensor.contiguous().numpy().tobytes())
    if labels is not None:
        digest.update(b"labels")
        digest.update(labels.contiguous().numpy().tobytes())
    return digest.hexdigest()


def read_data(
    config: TrainConfig, data: object
) -> tuple[torch.Tensor, torch.Tensor | None, LoaderStream | None]:
    """``(points, labels or None, stream or None)`` from ``config.data`` or the ``data`` argument (for a
    DataLoader, ``points`` and ``labels`` are its first batch). Labels are dropped when ``config.labels`` is
    false."""
    stream = None
    if data is None:
        if not config.data:
            raise ValueError(
                "no data: set config.data (a toy name, digits, mnist or a .npy/.npz file), or pass data= "
                f"to the Trainer ({DATA_KINDS})"
            )
        raw, labels = datasets.load_labelled(config.data, n=config.data_n, seed=config.seed)
    else:
        if config.data:
            raise ValueError(
                f"data given twice: config.data = {config.data!r} and the data argument; leave config.data "
                "empty when passing data to the Trainer"
            )
        if isinstance(data, torch.utils.data.DataLoader):
            stream = LoaderStream(data)
            raw, labels = stream.peek()
            raw = raw.float()
        else:
            raw, labels = as_tensors(data)
            raw, labels = datasets.subset(raw, labels, config.data_n, config.seed)
    return raw, (labels if config.labels else None), stream


def loader_classes(stream: LoaderStream, model: nn.Module | None) -> int | None:
    """The number of classes of a DataLoader's labels: the model's ``num_classes`` or the dataset's
    ``classes`` (torchvision's convention); None when neither says."""
    count = getattr(model, "num_classes", None)
    if isinstance(count, int) and count > 0:
        return count
    classes = getattr(stream.loader.dataset, "classes", None)
    return len(classes) if classes is not None and len(classes) > 0 else None


def loader_size(stream: LoaderStream) -> int:
    """The number of points of a DataLoader's dataset (1 when it does not say)."""
    try:
        return max(1, len(stream.loader.dataset))
    except TypeError:
        return 1
