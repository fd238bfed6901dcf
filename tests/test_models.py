"""Models: output shapes, time embedding values, config round trip, and a UNet that learns on digits."""

from __future__ import annotations

import math

import pytest
import torch

from flowscore import get_path
from flowscore.data import Normalizer, load
from flowscore.losses import cfm
from flowscore.models import MLP, SinusoidalEmbedding, UNet, build_model, model_from_config


def test_sinusoidal_embedding_closed_form():
    emb = SinusoidalEmbedding(8)
    t = torch.tensor([0.0, 0.3, 1.0])
    out = emb(t)
    for i, ti in enumerate(t.tolist()):
        for k in range(4):
            freq = 1000 * 10_000 ** (-k / 4)
            assert out[i, k].item() == pytest.approx(math.sin(freq * ti), abs=1e-4)
            assert out[i, 4 + k].item() == pytest.approx(math.cos(freq * ti), abs=1e-4)
    with pytest.raises(ValueError, match="even"):
        SinusoidalEmbedding(7)


@pytest.mark.parametrize(
    ("kind", "shape", "cls"),
    [("auto", (2,), MLP), ("auto", (1, 8, 8), UNet), ("auto", (1, 28, 28), UNet), ("mlp", (3, 5, 5), MLP),
     ("unet", (3, 6, 10), UNet)],
)  # fmt: skip
def test_output_shapes_and_rebuild(kind, shape, cls):
    model = build_model(kind, shape, **({"base": 8} if cls is UNet else {"width": 16}))
    assert isinstance(model, cls)
    x, t = torch.randn(3, *shape), torch.rand(3)
    out = model(x, t)
    assert out.shape == x.shape and torch.isfinite(out).all()
    clone = model_from_config(model.config())
    clone.load_state_dict(model.state_dict())
    assert torch.equal(clone(x, t), out)
    assert model(x, 0.5).shape == x.shape  # a float time broadcasts over the batch


def test_unet_levels_follow_image_size():
    assert build_model("auto", (1, 8, 8)).levels == 1
    assert build_model("auto", (1, 28, 28)).levels == 2


def test_outputs_depend_on_time_and_each_point_independently():
    torch.manual_seed(0)
    for model, shape in [(MLP(2, width=32), (2,)), (UNet(1, base=8, levels=1), (1, 8, 8))]:
        x = torch.randn(4, *shape)
        a, b = model(x, torch.full((4,), 0.2)), model(x, torch.full((4,), 0.8))
        assert not torch.allclose(a, b)
        # no mixing across the batch (GroupNorm normalizes per sample)
        torch.testing.assert_close(model(x[:1], torch.full((1,), 0.2)), a[:1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: build_model("cnn", (2,)), "model"),
        (lambda: build_model("unet", (2,)), "image"),
        (lambda: build_model("mlp", (2,), bogus=1), "bogus"),
        (lambda: build_model("mlp", (2, 3)), "data_shape"),
        (lambda: MLP(0), "dim"),
        (lambda: MLP(2)(torch.randn(3, 4), torch.rand(3)), "dim"),
        (lambda: MLP(2)(torch.randn(3, 2), torch.rand(4)), "t"),
        (lambda: model_from_config({"kind": "rnn"}), "kind"),
    ],
)
def test_bad_model_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_unet_learns_on_digits():
    torch.manual_seed(0)
    digits = load("digits")
    x_data = Normalizer.fit(digits).encode(digits)
    model = build_model("auto", x_data.shape[1:], base=16)
    path = get_path("linear")
    gen = torch.Generator().manual_seed(1)
    probe = x_data[:256]
    t_probe = torch.rand(256, generator=gen) * 0.98 + 0.01
    noise_probe = torch.randn(probe.shape, generator=gen)

    def probe_loss() -> float:
        with torch.no_grad():
            return cfm(model, probe, path, t_probe, noise_probe).item()

    before = probe_loss()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(40):
        idx = torch.randint(x_data.shape[0], (64,), generator=gen)
        loss = cfm(model, x_data[idx], path, generator=gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = probe_loss()
    assert after < 0.7 * before, (before, after)


CONFIGS = [
    ("auto", (2,), {}), ("auto", (1, 8, 8), {}), ("auto", (1, 28, 28), {}),
    ("unet", (3, 6, 10), {"base": 8, "levels": 3}), ("mlp", (3, 5, 5), {"width": 16, "depth": 1}),
    ("mlp", (7,), {"width": 40, "depth": 6, "time_embedding": 8}),
]  # fmt: skip


@pytest.mark.parametrize(("kind", "shape", "opts"), CONFIGS)
def test_parameter_count_and_forward_cost_from_the_config_alone(kind, shape, opts):
    """Against the built model: its state dict's size, and torch's FLOP counter on a real forward pass;
    the activation bytes against the bytes of every non-view tensor the forward pass creates."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import FlopCounterMode

    from flowscore import validation
    from flowscore.models import forward_cost, model_config, parameter_count

    config = model_config(kind, shape, **opts)
    model = model_from_config(config)
    assert model.config() == config
    assert parameter_count(config) == sum(v.numel() for v in model.state_dict().values())

    class Bytes(TorchDispatchMode):
        total = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if not func.is_view:
                for value in out if isinstance(out, (tuple, list)) else (out,):
                    if isinstance(value, torch.Tensor):
                        Bytes.total += value.numel() * value.element_size()
            return out

    x, t = torch.randn(2, *shape), torch.rand(2)
    flops = FlopCounterMode(display=False)
    with validation(False), torch.no_grad(), flops, Bytes():
        model(x, t)
    expected_flops, expected_bytes = forward_cost(config, shape)
    assert flops.get_total_flops() / 2 == pytest.approx(expected_flops, rel=0.01)  # biases are not counted
    assert Bytes.total / 2 == pytest.approx(expected_bytes, rel=0.5)


@pytest.mark.parametrize(
    ("change", "match"),
    [({"width": 10**7}, "width"), ({"depth": 10**7}, "depth"), ({"depth": 0}, "depth"),
     ({"width": True}, "width"), ({"time_embedding": 7}, "even"), ({"layers": 4}, "keys"),
     ({"heads": 0}, "heads"), ({"heads": 17}, "heads"), ({"kind": "rnn"}, "kind")],
)  # fmt: skip
def test_model_configs_are_checked_before_anything_is_built(change, match):
    import time

    from flowscore.models import check_config, model_config

    config = {**model_config("mlp", (2,)), **change}
    start = time.perf_counter()
    with pytest.raises(ValueError, match=match):
        check_config(config)
    with pytest.raises(ValueError, match=match):
        model_from_config(config)
    assert time.perf_counter() - start < 0.1


@pytest.mark.parametrize(("kind", "shape"), [("mlp", (3,)), ("unet", (1, 6, 6))])
def test_a_two_head_model_stacks_two_fields_and_counts_its_weights(kind, shape):
    """``heads=2``: the output is ``(B, 2, *dims)``; its stored config rebuilds it (same weights, same
    output) and parameter_count equals the weights built; without heads the config has no heads entry."""
    from flowscore.models import build_model, model_from_config, parameter_count

    model = build_model(kind, shape, heads=2, **({"base": 8} if kind == "unet" else {"width": 16}))
    x, t = torch.randn(4, *shape), torch.rand(4)
    out = model(x, t)
    assert out.shape == (4, 2, *shape)
    assert model.config()["heads"] == 2
    assert parameter_count(model.config()) == sum(v.numel() for v in model.state_dict().values())
    again = model_from_config(model.config())
    again.load_state_dict(model.state_dict())
    assert torch.equal(again(x, t), out)
    one = build_model(kind, shape, **({"base": 8} if kind == "unet" else {"width": 16}))
    assert "heads" not in one.config() and one(x, t).shape == x.shape
