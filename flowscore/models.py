"""Networks ``model(x, t[, y])`` for flowscore: an MLP for vectors and a small UNet for images.

Every model maps ``x`` ``(B, *dims)`` and ``t`` ``(B,)`` (t = 0 noise, t = 1 data) to a tensor shaped like
``x``: a velocity, score, noise or data prediction, whichever the loss trains it for. Built with
``num_classes=K``, a model also takes integer class labels ``y`` ``(B,)`` in ``0..K-1``, or ``-1`` for "no
label" (the unconditional branch of classifier-free guidance); ``model(x, t)`` then means ``y = -1``. Each
model has a JSON-able ``config()``; :func:`model_from_config` rebuilds it, so a checkpoint needs no pickles.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import _validate
from .conditioning import check_labels

TWO_TIME_SCALE = 30.0
"""Time scale of the sinusoidal embeddings of a two-time (flow-map) model, in place of 1000: the MeanFlow
target contains the network's time derivative, which the highest frequencies of the velocity networks'
embedding make very large at initialisation (docs/theory.md section 18)."""


class SinusoidalEmbedding(nn.Module):
    r"""``(B,)`` times to ``(B, dim)`` features :math:`[\sin(s t f_k), \cos(s t f_k)]`, ``dim`` even.

    ``f_k = max_period^{-k / (dim/2)}``, ``k = 0 .. dim/2 - 1``, and ``s = 1000`` stretches t in [0, 1]
    over the range the frequencies resolve.
    """

    def __init__(self, dim: int, max_period: float = 10_000.0, scale: float = 1000.0):
        super().__init__()
        if _validate.positive_int(dim, "time_embedding") % 2:
            raise ValueError(f"time_embedding must be even, got {dim}")
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
        self.register_buffer("freqs", freqs * scale, persistent=False)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        arg = t.reshape(-1, 1).to(self.freqs.dtype) * self.freqs
        return torch.cat([torch.sin(arg), torch.cos(arg)], dim=1).to(t.dtype)


class ClassEmbedding(nn.Module):
    """Labels ``(B,)`` in ``-1..K-1`` to ``(B, dim)`` learned vectors; ``-1`` ("no label") takes row ``K``.

    An ``nn.Embedding(K + 1, dim)`` whose last row is the null entry that classifier-free guidance uses for
    the unconditional prediction. Rows start at ``N(0, init_std^2)``.
    """

    def __init__(self, num_classes: int, dim: int, init_std: float = 1.0):
        super().__init__()
        self.num_classes = _validate.positive_int(num_classes, "num_classes")
        self.table = nn.Embedding(num_classes + 1, dim)
        nn.init.normal_(self.table.weight, std=init_std)

    def forward(self, y: torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor:
        if y is None:
            return self.table.weight[self.num_classes].expand(batch, -1)
        y = check_labels(y, batch)
        if _validate.value_checks_enabled() and y.numel() and int(y.max()) >= self.num_classes:
            raise ValueError(
                f"y holds label {int(y.max())} but the model was built for num_classes = {self.num_classes} "
                f"(labels 0..{self.num_classes - 1}, -1 = no label)"
            )
        index = torch.where(y < 0, self.num_classes, y).to(device)
        return self.table(index)


def _no_labels(y: torch.Tensor | None, kind: str) -> None:
    if y is not None:
        raise ValueError(
            f"this {kind} has no class embedding, so it cannot take labels y; build it with num_classes=K "
            "to train a class-conditional model"
        )


def _check_input(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``t`` broadcast to ``(B,)`` (a 0-dim or float ``t`` is expanded)."""
    x = _validate.batch(x, "x")
    t = _validate.time(t, like=x)
    return t.expand(x.shape[0]) if t.dim() == 0 else t


def _split_args(model: nn.Module, args: tuple) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(s, y)`` from the arguments after ``t``: ``(s[, y])`` for a two-time model, ``([y])`` otherwise."""
    limit = 2 if model.two_time else 1
    if len(args) > limit:
        raise ValueError(f"{type(model).__name__} takes at most {2 + limit} arguments, got {2 + len(args)}")
    if not model.two_time:
        return None, (args[0] if args else None)
    if not args or args[0] is None:
        raise ValueError(
            f"this {type(model).__name__} was built with two_time=True: call it as model(x, t, s[, y])"
        )
    return args[0], (args[1] if len(args) > 1 else None)


def _with_two_time(config: dict[str, Any], model: nn.Module) -> dict[str, Any]:
    """``config`` with ``two_time: True`` for a two-time model and ``heads: K`` for a K-head model (both
    absent for a one-output velocity model, as before)."""
    config = {**config, "two_time": True} if model.two_time else config
    return {**config, "heads": model.heads} if model.heads > 1 else config


def _check_heads(heads: int | None) -> int:
    """``heads`` (None: 1) checked to be an integer in ``[1, LIMITS["heads"]]``."""
    return 1 if heads is None else _validate.integer(heads, "heads", minimum=1, maximum=LIMITS["heads"])


class MLP(nn.Module):
    """MLP on ``x`` ``(B, *dims)``, ``prod(dims) == dim``: [flatten(x), emb(t)] -> ``depth`` SiLU layers -> x.

    ``depth`` hidden layers of ``width`` units; ``time_embedding`` sinusoidal features of t. With
    ``num_classes=K`` a learned class vector (:class:`ClassEmbedding`, same size as the time features) is
    added to the time features: through the first linear layer that is a learned class-dependent bias, the
    same as appending a one-hot label to the input, at no extra cost in the linear layers. With ``heads=K >
    1`` the last layer has ``K * dim`` outputs and the model returns ``(B, K, *dims)``: K fields of one
    trunk (SB-CFM's velocity and score term, :mod:`flowscore.sbcfm`).
    """

    def __init__(
        self,
        dim: int,
        width: int = 256,
        depth: int = 4,
        time_embedding: int = 64,
        num_classes: int | None = None,
        two_time: bool | None = False,
        heads: int | None = None,
    ):
        super().__init__()
        self.dim = _validate.positive_int(dim, "dim")
        self.two_time = bool(two_time)
        self.heads = _check_heads(heads)
        self.width = _validate.positive_int(width, "width")
        self.depth = _validate.positive_int(depth, "depth")
        self.time_embedding = time_embedding
        self.num_classes = num_classes
        self.embed = SinusoidalEmbedding(time_embedding, scale=TWO_TIME_SCALE if self.two_time else 1000.0)
        layers: list[nn.Module] = []
        fan_in = dim + time_embedding * (2 if self.two_time else 1)
        for _ in range(depth):
            layers += [nn.Linear(fan_in, width), nn.SiLU()]
            fan_in = width
        layers.append(nn.Linear(width, dim * self.heads))
        self.net = nn.Sequential(*layers)
        # made last, so the other weights start as in the unconditional model of the same seed
        self.classes = None if num_classes is None else ClassEmbedding(num_classes, time_embedding)

    def config(self) -> dict[str, Any]:
        return _with_two_time({"kind": "mlp", "dim": self.dim, "width": self.width, "depth": self.depth,
                "time_embedding": self.time_embedding, "num_classes": self.num_classes}, self)  # fmt: skip

    def forward(self, x: torch.Tensor, t: torch.Tensor, *args: torch.Tensor | None) -> torch.Tensor:
        """``(B, *dims), (B,)[, (B,) labels] -> (B, *dims)`` (``(B, heads, *dims)`` with ``heads > 1``); a
        two-time MLP: ``(x, t, s[, y])``."""
        s, y = _split_args(self, args)
        t = _check_input(x, t)
        if x[0].numel() != self.dim:
            raise ValueError(
                f"x has {x[0].numel()} features per point but the MLP was built for dim = {self.dim}"
            )
        features = self.embed(t)
        if self.classes is None:
            _no_labels(y, "MLP")
        else:
            features = features + self.classes(y, x.shape[0], x.device).to(features.dtype)
        parts = [x.flatten(1), features]
        if self.two_time:
            parts.append(self.embed(_check_input(x, s) - t))
        h = torch.cat(parts, dim=1)
        out = self.net(h)
        return out.reshape(x.shape) if self.heads == 1 else out.reshape(x.shape[0], self.heads, *x.shape[1:])


def _groups(channels: int) -> int:
    return math.gcd(channels, 8)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, the time features added after the first conv, plus a skip connection."""

    def __init__(self, c_in: int, c_out: int, t_dim: int):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(_groups(c_in), c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.time = nn.Linear(t_dim, c_out)
        self.norm2, self.conv2 = nn.GroupNorm(_groups(c_out), c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time(emb)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return h + self.skip(x)


class UNet(nn.Module):
    """A small UNet for ``(B, channels, H, W)`` images, H and W padded up to a multiple of ``2**levels``.

    ``levels`` down/up-samplings (1 for 8x8, 2 for 28x28 padded to 32x32); channels ``base * 2**level``;
    one :class:`ResBlock` per level on the way down and up, two in the middle; GroupNorm; the time
    embedding (sinusoidal -> 2-layer SiLU MLP) is added in every residual block. Output shaped like ``x``.
    With ``num_classes=K`` a learned class vector (:class:`ClassEmbedding`, ``4 * base`` wide, rows started
    small) is added to that time embedding, as in DiT and the class-conditional ADM.
    """

    def __init__(
        self,
        channels: int = 1,
        base: int = 32,
        levels: int = 2,
        time_embedding: int = 128,
        num_classes: int | None = None,
        two_time: bool | None = False,
        heads: int | None = None,
    ):
        super().__init__()
        self.two_time = bool(two_time)
        self.heads = _check_heads(heads)
        self.channels = _validate.positive_int(channels, "channels")
        self.base = _validate.positive_int(base, "base")
        self.levels = _validate.positive_int(levels, "levels")
        self.time_embedding = _validate.positive_int(time_embedding, "time_embedding")
        self.num_classes = num_classes
        t_dim = 4 * base
        scale = TWO_TIME_SCALE if self.two_time else 1000.0
        self.embed = nn.Sequential(
            SinusoidalEmbedding(time_embedding, scale=scale),
            nn.Linear(time_embedding, t_dim),
            nn.SiLU(),
            nn.Linear(t_dim, t_dim),
        )
        widths = [base * 2**i for i in range(levels + 1)]
        self.stem = nn.Conv2d(channels, base, 3, padding=1)
        self.down = nn.ModuleList(ResBlock(widths[i], widths[i], t_dim) for i in range(levels))
        self.downsample = nn.ModuleList(nn.Conv2d(widths[i], widths[i + 1], 3, 2, 1) for i in range(levels))
        self.mid = nn.ModuleList(
            [ResBlock(widths[-1], widths[-1], t_dim), ResBlock(widths[-1], widths[-1], t_dim)]
        )
        self.upsample = nn.ModuleList(
            nn.Conv2d(widths[i + 1], widths[i], 3, padding=1) for i in range(levels)
        )
        self.up = nn.ModuleList(ResBlock(2 * widths[i], widths[i], t_dim) for i in range(levels))
        self.head = nn.Sequential(
            nn.GroupNorm(_groups(base), base), nn.SiLU(), nn.Conv2d(base, channels * self.heads, 3, padding=1)
        )
        # made last, so the other weights start as in the unconditional model of the same seed
        self.classes = None if num_classes is None else ClassEmbedding(num_classes, t_dim, init_std=0.02)
        self.embed_gap = None
        if self.two_time:  # the second time: the gap s - t
            self.embed_gap = nn.Sequential(
                SinusoidalEmbedding(time_embedding, scale=scale),
                nn.Linear(time_embedding, t_dim),
                nn.SiLU(),
                nn.Linear(t_dim, t_dim),
            )

    def config(self) -> dict[str, Any]:
        return _with_two_time({"kind": "unet", "channels": self.channels, "base": self.base,
                "levels": self.levels, "time_embedding": self.time_embedding,
                "num_classes": self.num_classes}, self)  # fmt: skip

    def forward(self, x: torch.Tensor, t: torch.Tensor, *args: torch.Tensor | None) -> torch.Tensor:
        """``(B, C, H, W), (B,)[, (B,) labels] -> (B, C, H, W)`` (``(B, heads, C, H, W)`` with ``heads >
        1``); a two-time UNet: ``(x, t, s[, y])``."""
        s, y = _split_args(self, args)
        t = _check_input(x, t)
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(f"x must be shaped (B, {self.channels}, H, W), got {tuple(x.shape)}")
        height, width = x.shape[-2:]
        multiple = 2**self.levels
        pad_h, pad_w = -height % multiple, -width % multiple
        h = self.stem(F.pad(x, (0, pad_w, 0, pad_h)))
        emb = self.embed(t)
        if self.embed_gap is not None:
            emb = emb + self.embed_gap(_check_input(x, s) - t)
        if self.classes is None:
            _no_labels(y, "UNet")
        else:
            emb = emb + self.classes(y, x.shape[0], x.device).to(emb.dtype)
        skips = []
        for block, down in zip(self.down, self.downsample, strict=True):
            h = block(h, emb)
            skips.append(h)
            h = down(h)
        for block in self.mid:
            h = block(h, emb)
        for i in reversed(range(self.levels)):
            h = self.upsample[i](F.interpolate(h, scale_factor=2.0, mode="nearest"))
            h = self.up[i](torch.cat([h, skips[i]], dim=1), emb)
        out = self.head(h)[..., :height, :width]
        return out if self.heads == 1 else out.reshape(x.shape[0], self.heads, *x.shape[1:])


MODELS = ("auto", "mlp", "unet")
LIMITS: dict[str, int] = {
    "dim": 2**24, "width": 2**16, "depth": 256, "channels": 4096, "base": 2**14, "levels": 8,
    "time_embedding": 2**14, "num_classes": 2**20, "heads": 16,
}  # fmt: skip
"""Upper bounds of each size in a model config: sanity bounds checked before anything is built (a config read
back from a file could otherwise ask for any amount of memory)."""
_OPTIONS = {
    "mlp": ("dim", "width", "depth", "time_embedding", "num_classes", "two_time", "heads"),
    "unet": ("channels", "base", "levels", "time_embedding", "num_classes", "two_time", "heads"),
}
_OPTIONAL = ("num_classes", "two_time", "heads")
"""Options that may be None (and may be missing from a config stored before they existed)."""


def _constructor_defaults(cls: type) -> dict[str, Any]:
    parameters = inspect.signature(cls.__init__).parameters.values()
    return {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}


def model_config(kind: str, data_shape: tuple[int, ...] | torch.Size, **opts: Any) -> dict[str, Any]:
    """The ``config()`` that :func:`build_model` gives for these arguments, without building anything.

    ``kind``: ``"mlp"`` (any shape, flattened; opts ``width``, ``depth``, ``time_embedding``),
    ``"unet"`` (images; opts ``base``, ``levels`` (default 1 for H, W <= 8, else 2), ``time_embedding``),
    or ``"auto"`` (MLP for vectors, UNet for images). Both take ``num_classes`` (a class-conditional model,
    ``model(x, t, y)``) and ``two_time`` (a flow-map model ``model(x, t, s[, y])`` with a second time
    embedding, of the gap ``s - t``, see :mod:`flowscore.flowmaps`) and ``heads`` (K outputs shaped like x,
    returned as ``(B, K, *dims)``, see :mod:`flowscore.sbcfm`). Options set to ``None`` take their
    defaults. The result is checked by :func:`check_config`.
    """
    _validate.choice(kind, MODELS, "model")
    data_shape = tuple(data_shape)
    if len(data_shape) not in (1, 3) or not all(
        isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in data_shape
    ):
        raise ValueError(f"data_shape must be (D,) or (C, H, W) with positive sizes, got {data_shape}")
    opts = {k: v for k, v in opts.items() if v is not None}
    if kind == "auto":
        kind = "unet" if len(data_shape) == 3 else "mlp"
    if kind == "unet" and len(data_shape) != 3:
        raise ValueError(f"model 'unet' needs image data (C, H, W), got data shape {data_shape}")
    unknown = sorted(set(opts) - set(_OPTIONS[kind]) - {"dim", "channels"})
    if unknown or {"dim", "channels"} & set(opts):
        bad = unknown or sorted({"dim", "channels"} & set(opts))
        raise ValueError(f"bad options for model {kind!r}: unexpected {', '.join(bad)}")
    if kind == "mlp":
        config = {"kind": "mlp", **_constructor_defaults(MLP), "dim": math.prod(data_shape), **opts}
    else:
        levels = 1 if max(data_shape[1:]) <= 8 else 2
        config = {"kind": "unet", **_constructor_defaults(UNet), "levels": levels, **opts}
        config["channels"] = data_shape[0]
    return check_config(config)


def check_config(config: object) -> dict[str, Any]:
    """``config`` (a model's ``config()``) if it is well formed, within :data:`LIMITS`; ``ValueError`` else.

    Cheap: nothing is built. Use :func:`parameter_count` to compare it with stored weights.
    """
    if not isinstance(config, dict) or config.get("kind") not in _OPTIONS:
        raise ValueError(f"model config must be a dict with kind 'mlp' or 'unet', got {_short(config)}")
    names = _OPTIONS[config["kind"]]
    config = {**dict.fromkeys(_OPTIONAL), **config}
    if set(config) != {"kind", *names}:
        raise ValueError(
            f"model config of kind {config['kind']!r} must have exactly the keys kind, {', '.join(names)}; "
            f"got {', '.join(sorted(map(str, config)))}"
        )
    if config["two_time"] not in (None, False, True):
        raise ValueError(f"model config: two_time must be true or false, got {_short(config['two_time'])}")
    for name in names:
        value = config[name]
        if (value is None and name in _OPTIONAL) or name == "two_time":
            continue
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= LIMITS[name]:
            raise ValueError(
                f"model config: {name} must be an integer in [1, {LIMITS[name]}], got {_short(value)}"
            )
    if config["time_embedding"] % 2:
        raise ValueError(f"model config: time_embedding must be even, got {config['time_embedding']}")
    if not config["two_time"]:  # a velocity model's config has no two_time entry (as before flow maps)
        del config["two_time"]
    if config["heads"] in (None, 1):  # nor a heads entry (as before SB-CFM)
        del config["heads"]
    return dict(config)


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def parameter_count(config: dict[str, Any]) -> int:
    """The number of weights of the model ``model_from_config(config)`` (its state dict), computed from the
    config alone (nothing is built)."""
    c = check_config(config)

    def linear(n_in: int, n_out: int) -> int:
        return n_in * n_out + n_out

    def conv(n_in: int, n_out: int, k: int = 3) -> int:
        return n_in * n_out * k * k + n_out

    classes = 0 if c["num_classes"] is None else c["num_classes"] + 1  # rows of the class embedding
    heads = c.get("heads", 1)
    if c["kind"] == "mlp":
        dim, width, depth, te = c["dim"], c["width"], c["depth"], c["time_embedding"]
        hidden = (depth - 1) * linear(width, width)
        te_in = 2 * te if c.get("two_time") else te
        return linear(dim + te_in, width) + hidden + linear(width, dim * heads) + classes * te
    channels, base, levels, te = c["channels"], c["base"], c["levels"], c["time_embedding"]
    t_dim = 4 * base
    widths = [base * 2**i for i in range(levels + 1)]

    def resblock(n_in: int, n_out: int) -> int:
        skip = conv(n_in, n_out, 1) if n_in != n_out else 0
        return 2 * n_in + conv(n_in, n_out) + linear(t_dim, n_out) + 2 * n_out + conv(n_out, n_out) + skip

    total = (2 if c.get("two_time") else 1) * (linear(te, t_dim) + linear(t_dim, t_dim))
    total += conv(channels, base) + classes * t_dim
    total += sum(resblock(widths[i], widths[i]) + conv(widths[i], widths[i + 1]) for i in range(levels))
    total += 2 * resblock(widths[-1], widths[-1])
    total += sum(conv(widths[i + 1], widths[i]) + resblock(2 * widths[i], widths[i]) for i in range(levels))
    return total + 2 * base + conv(base, channels * heads)


def forward_cost(config: dict[str, Any], data_shape: tuple[int, ...]) -> tuple[float, float]:
    """``(flops, bytes)`` of one forward pass of ``model_from_config(config)`` per sample of ``data_shape``,
    from the config alone: ``flops`` counts the multiply-adds of the linear and convolution layers twice,
    ``bytes`` the float32 activations (about what a backward pass keeps alive)."""
    c = check_config(config)
    if c["kind"] == "mlp":
        dim, width, depth, te = c["dim"], c["width"], c["depth"], c["time_embedding"]
        te = 2 * te if c.get("two_time") else te
        macs = (dim + te) * width + (depth - 1) * width * width + width * dim * c.get("heads", 1)
        floats = 2 * te + dim + te + 2 * depth * width + dim
        return 2.0 * macs, 4.0 * floats
    channels, base, levels, te = c["channels"], c["base"], c["levels"], c["time_embedding"]
    if len(data_shape) != 3:
        raise ValueError(f"a UNet needs data_shape (C, H, W), got {tuple(data_shape)}")
    multiple = 2**levels
    height, width = (-(-size // multiple) * multiple for size in data_shape[1:])
    area = [height * width // 4**i for i in range(levels + 1)]
    widths = [base * 2**i for i in range(levels + 1)]
    t_dim = 4 * base
    macs, floats = te * t_dim + t_dim * t_dim, 2 * te + 3 * t_dim
    if c.get("two_time"):  # the second time embedding
        macs, floats = 2 * macs, 2 * floats

    def resblock(n_in: int, n_out: int, pixels: int) -> tuple[int, int]:
        skip = n_in * n_out if n_in != n_out else 0
        return (9 * n_in * n_out + 9 * n_out * n_out + skip) * pixels, (2 * n_in + 7 * n_out) * pixels

    blocks = [resblock(widths[i], widths[i], area[i]) for i in range(levels)]
    blocks += [resblock(widths[-1], widths[-1], area[-1])] * 2
    blocks += [resblock(2 * widths[i], widths[i], area[i]) for i in range(levels)]
    convs = [(channels, base, area[0]), (base, channels, area[0])]
    convs += [(widths[i], widths[i + 1], area[i + 1]) for i in range(levels)]
    convs += [(widths[i + 1], widths[i], area[i]) for i in range(levels)]
    macs += sum(m for m, _ in blocks) + sum(9 * a * b * p for a, b, p in convs)
    floats += sum(f for _, f in blocks) + sum(b * p for _, b, p in convs)
    floats += sum(widths[i + 1] * area[i] + 2 * widths[i] * area[i] for i in range(levels))  # upsample, cat
    floats += 3 * base * area[0]  # the head's norm and activation
    return 2.0 * macs, 4.0 * floats


CUSTOM = "custom"
"""The ``kind`` of the description of a model that is not flowscore's own (see :func:`describe`)."""


def builtin_config(model: object) -> dict[str, Any] | None:
    """``model.config()`` for flowscore's :class:`MLP` and :class:`UNet` (preconditioning, DDP and compiled
    wrappers looked through), None for any other model."""
    inner = getattr(model, "wrapped_network", model)  # flowscore.Preconditioned
    inner = getattr(inner, "_orig_mod", inner)  # torch.compile
    inner = (
        getattr(inner, "module", inner) if isinstance(inner, nn.parallel.DistributedDataParallel) else inner
    )
    return inner.config() if isinstance(inner, (MLP, UNet)) else None


def describe(model: nn.Module) -> dict[str, Any]:
    """What a run stores about its model: a built-in model's ``config()`` (enough to rebuild it), or for any
    other ``nn.Module`` ``{"kind": "custom", "class": "module.QualName", "parameters": N}``, a description for
    people and for checks only: the class is never imported, so a checkpoint never runs code."""
    config = builtin_config(model)
    if config is not None:
        return config
    cls = type(model)
    count = sum(v.numel() for v in model.state_dict().values())
    return {"kind": CUSTOM, "class": f"{cls.__module__}.{cls.__qualname__}", "parameters": count}


def check_description(description: object) -> dict[str, Any]:
    """A stored model description: :func:`check_config` of a built-in model's, or a checked custom one."""
    if isinstance(description, dict) and description.get("kind") == CUSTOM:
        ok = set(description) == {"kind", "class", "parameters"} and isinstance(description["class"], str)
        count = description.get("parameters")
        if not ok or not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise ValueError(f"a custom model description must hold a class name and a parameter count, got "
                             f"{_short(description)}")  # fmt: skip
        return dict(description)
    return check_config(description)


def build_model(kind: str, data_shape: tuple[int, ...] | torch.Size, **opts: Any) -> nn.Module:
    """A model for points of shape ``data_shape`` (``(D,)`` or ``(C, H, W)``): ``model_from_config`` of
    :func:`model_config` (see there for ``kind`` and ``opts``)."""
    return model_from_config(model_config(kind, data_shape, **opts))


def model_from_config(config: dict[str, Any]) -> nn.Module:
    """Rebuilds a model from its ``config()`` (``{"kind": "mlp"|"unet", ...constructor options}``), after
    :func:`check_config`."""
    config = check_config(config)
    opts = {k: v for k, v in config.items() if k != "kind"}
    return (MLP if config["kind"] == "mlp" else UNet)(**opts)
