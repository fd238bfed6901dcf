"""Bring your own model and data: any nn.Module on tensors, a Dataset or a DataLoader, through the API.

Ground truth: an uninterrupted run (resume must reproduce it bit for bit on the CPU), the same data given
in two forms (same weights), and the samples of a trained labelled model against the known class centres.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import flowscore as fs
from flowscore import checkpoint
from flowscore.conditioning import guided_model
from flowscore.data import labelled_toy
from flowscore.runs import CHECKPOINT_FILE

BASE = dict(
    batch_size=64,
    lr=3e-3,
    warmup=5,
    lr_schedule="constant",
    checkpoint_every=15,
    log_every=5,
    loss_floor=False,
    device="cpu",
)


class Net(nn.Module):
    """A user's conditional network: its own class embedding (row K = no label), t as a feature."""

    def __init__(self, classes: int = 2, width: int = 32):
        super().__init__()
        self.classes = classes
        self.embed = nn.Embedding(classes + 1, 8)
        self.net = nn.Sequential(nn.Linear(2 + 1 + 8, width), nn.SiLU(), nn.Linear(width, 2))

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        y = torch.full((x.shape[0],), -1, device=x.device) if y is None else y
        e = self.embed(torch.where(y < 0, self.classes, y))
        return self.net(torch.cat([x, t[:, None], e], 1))


class Plain(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 32), nn.SiLU(), nn.Linear(32, 2))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([x, t[:, None]], 1))


def fresh(cls: type = Net, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    return cls(**kwargs)


def weights(run_dir, prefix: str = "ema") -> dict[str, torch.Tensor]:
    return checkpoint.unprefixed(prefix, checkpoint.load_checkpoint(run_dir / CHECKPOINT_FILE)[0])


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


DATA = labelled_toy("2gaussians", 600, seed=0)  # class 0 at x = -1.5, class 1 at x = +1.5


def test_own_module_on_labelled_tensors_resumes_bit_identically(tmp_path):
    config = fs.TrainConfig(steps=45, **BASE)
    fs.Trainer(config, tmp_path / "full", model=fresh(), data=DATA, progress=False).train()
    part = fs.TrainConfig(steps=30, **BASE)
    fs.Trainer(part, tmp_path / "part", model=fresh(), data=DATA, progress=False).train()
    torch.manual_seed(1234)  # the global generator differs on resume: the run's own state must win
    resumed = fs.Trainer.resume(tmp_path / "part", steps=45, model=Net(), data=DATA, progress=False)
    resumed.train(resume=True)
    for prefix in ("model", "ema"):
        assert_same(weights(tmp_path / "full", prefix), weights(tmp_path / "part", prefix))
    # the weights moved, and the run stores a description, not code
    assert not torch.equal(weights(tmp_path / "full")["net.0.weight"], fresh().net[0].weight.detach())
    run = fs.load_run(tmp_path / "full", model=Net())
    assert run.labelled and run.num_classes == 2 and sum(run.class_counts) == 540
    assert run.held_out_labels.shape == (60,) and isinstance(run.model, Net) and not run.model.training


def test_own_module_trains_and_samples_each_class(tmp_path):
    torch.manual_seed(0)
    x, y = labelled_toy("2gaussians", 3000, seed=1)
    config = fs.TrainConfig(
        steps=400,
        batch_size=256,
        lr=3e-3,
        warmup=20,
        loss_floor=False,
        checkpoint_every=400,
        log_every=100,
        device="cpu",
    )
    fs.Trainer(config, tmp_path / "r", model=fresh(width=64), data=(x, y), progress=False).train()
    run = fs.load_run(tmp_path / "r", model=Net(width=64))
    gen = torch.Generator().manual_seed(0)
    for label, centre in [(0, -1.5), (1, 1.5)]:
        labels = torch.full((500,), label)
        z = fs.sample(guided_model(run.model, labels), run.path, 500, steps=40, generator=gen)
        points = run.normalizer.decode(z)
        assert abs(points[:, 0].mean().item() - centre) < 0.25
        assert ((points[:, 0] > 0) == (centre > 0)).float().mean().item() > 0.95


def test_a_dataset_trains_exactly_like_its_tensors(tmp_path):
    class Pairs(Dataset):
        def __len__(self) -> int:
            return DATA[0].shape[0]

        def __getitem__(self, i: int):
            return DATA[0][i].numpy(), int(DATA[1][i])  # NumPy points and Python ints are accepted

    config = fs.TrainConfig(steps=10, **BASE)
    fs.Trainer(config, tmp_path / "tensors", model=fresh(), data=DATA, progress=False).train()
    fs.Trainer(config, tmp_path / "dataset", model=fresh(), data=Pairs(), progress=False).train()
    assert_same(weights(tmp_path / "tensors"), weights(tmp_path / "dataset"))


def test_unlabelled_tensor_with_an_unconditional_module(tmp_path):
    x = DATA[0]
    config = fs.TrainConfig(steps=10, **BASE)
    fs.Trainer(config, tmp_path / "r", model=fresh(Plain), data=x, progress=False).train()
    run = fs.load_run(tmp_path / "r", model=Plain())
    assert not run.labelled and run.held_out.shape == (60, 2)
    # the labels of a pair are ignored with labels=False: an unconditional module trains on it
    off = fs.TrainConfig(steps=10, labels=False, **BASE)
    fs.Trainer(off, tmp_path / "off", model=fresh(Plain), data=DATA, progress=False).train()
    assert not fs.load_run(tmp_path / "off", model=Plain()).labelled


@pytest.mark.parametrize("seeded", [False, True])
@pytest.mark.parametrize("n_points", [200, 192])  # 192 / 32 = 6 batches: the checkpoint ends an epoch
def test_dataloader_resume_replays_the_epoch(tmp_path, seeded, n_points):
    x, y = DATA[0][:n_points], DATA[1][:n_points]

    def loader() -> DataLoader:
        gen = torch.Generator().manual_seed(7) if seeded else None
        return DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True, generator=gen)

    base = {**BASE, "checkpoint_every": 18}
    torch.manual_seed(5)
    fs.Trainer(
        fs.TrainConfig(steps=30, **base), tmp_path / "full", model=fresh(), data=loader(), progress=False
    ).train()
    torch.manual_seed(5)
    fs.Trainer(
        fs.TrainConfig(steps=18, **base), tmp_path / "part", model=fresh(), data=loader(), progress=False
    ).train()
    torch.manual_seed(99)  # whatever the global state now, the epoch's order is replayed from the checkpoint
    fs.Trainer.resume(tmp_path / "part", steps=30, model=Net(), data=loader(), progress=False).train(
        resume=True
    )
    assert_same(weights(tmp_path / "full", "model"), weights(tmp_path / "part", "model"))
    run = fs.load_run(tmp_path / "full", model=Net())
    assert run.held_out.shape[0] == 0 and run.labelled  # a stream has no held-out points


def test_a_dataloader_without_labels_and_its_errors(tmp_path):
    stream = DataLoader(TensorDataset(DATA[0]), batch_size=16)  # items are 1-tuples
    with pytest.raises(ValueError, match="pair"):
        fs.Trainer(fs.TrainConfig(steps=4, **BASE), tmp_path / "a", model=fresh(Plain), data=stream).train()
    plain = DataLoader(DATA[0], batch_size=16, shuffle=True)
    fs.Trainer(
        fs.TrainConfig(steps=4, **BASE), tmp_path / "b", model=fresh(Plain), data=plain, progress=False
    ).train()
    with pytest.raises(ValueError, match="number of classes"):  # labels, built-in model, no class count
        fs.Trainer(
            fs.TrainConfig(steps=4, **BASE), tmp_path / "c", data=DataLoader(TensorDataset(*DATA))
        ).train()
    with pytest.raises(ValueError, match="DataLoader"):
        fs.Trainer(
            fs.TrainConfig(steps=4, objective="fm", **BASE), tmp_path / "d", model=fresh(Plain), data=plain
        ).train()
    assert not any((tmp_path / d).exists() for d in "acd")


class Wrong(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 3)

    def forward(self, x, t):
        return self.lin(x)


@pytest.mark.parametrize(
    ("kwargs", "config", "match"),
    [
        ({"model": Wrong(), "data": DATA[0]}, {}, "shaped like x"),
        ({"model": Plain(), "data": DATA}, {}, r"model\(x, t, y\)"),  # labels need model(x, t, y)
        ({"model": Net(), "data": DATA}, {"model": "mlp"}, "leave them"),
        ({"model": Net(), "data": DATA}, {"data": "moons"}, "data given twice"),
        ({"model": Net()}, {}, "no data"),
        ({"model": "Net", "data": DATA}, {}, "nn.Module"),
        ({"data": (DATA[0], DATA[1][:-1])}, {}, r"shaped \(600,\)"),
        ({"data": (DATA[0], DATA[1] - 1)}, {}, "0..K-1"),
        ({"data": (DATA[0], DATA[1] + 0.5)}, {}, "whole numbers"),
        ({"data": (DATA[0], torch.full((600,), float("nan")))}, {}, "NaN"),
        ({"data": torch.full((5, 2), float("nan"))}, {}, "NaN"),
        ({"data": [1, 2, 3]}, {}, "pair|tensor"),
    ],
)
def test_bad_models_and_data_are_refused_before_anything_is_written(tmp_path, kwargs, config, match):
    with pytest.raises(ValueError, match=match) as err:
        fs.Trainer(fs.TrainConfig(steps=4, **{**BASE, **config}), tmp_path / "r", **kwargs).train()
    assert "\n" not in str(err.value)
    assert not (tmp_path / "r").exists()


def test_load_run_into_a_model_that_does_not_fit(tmp_path):
    fs.Trainer(
        fs.TrainConfig(steps=4, **BASE), tmp_path / "r", model=fresh(), data=DATA, progress=False
    ).train()
    with pytest.raises(ValueError, match=r"your own model \(.*Net, \d+ weights\)"):
        fs.load_run(tmp_path / "r")
    with pytest.raises(ValueError, match=r"do not fit.*embed.weight \(3, 8\) vs \(4, 8\)"):
        fs.load_run(tmp_path / "r", model=Net(classes=3))
    with pytest.raises(ValueError, match="not in the model: embed.weight"):
        fs.load_run(tmp_path / "r", model=Plain())
    with pytest.raises(ValueError, match="your own model"):  # resuming needs the model again
        fs.Trainer.resume(tmp_path / "r", steps=8, data=DATA, progress=False).train(resume=True)
    # a built-in run loads into a module built by hand as well
    fs.Trainer(
        fs.TrainConfig(steps=4, width=16, depth=2, **BASE), tmp_path / "b", data=DATA, progress=False
    ).train()
    own = fs.load_run(tmp_path / "b", model=fs.models.MLP(2, width=16, depth=2, num_classes=2)).model
    assert_same(own.state_dict(), fs.load_run(tmp_path / "b").model.state_dict())


def test_precision_and_compile(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="bf16.*CUDA"):
        fs.Trainer(fs.TrainConfig(steps=4, precision="bf16", **BASE), tmp_path / "bf16", data=DATA).train()
    assert not (tmp_path / "bf16").exists()
    # compile: the module is compiled once (a backend without code generation keeps this fast and
    # bit-identical to the plain run), and the checkpoint holds the plain module's names
    calls = []
    real_compile = torch.compile

    def recording(module, **kwargs):
        calls.append(module)
        return real_compile(module, backend="eager")

    config = fs.TrainConfig(steps=10, **BASE)
    fs.Trainer(config, tmp_path / "plain", model=fresh(), data=DATA, progress=False).train()
    monkeypatch.setattr(torch, "compile", recording)
    compile_config = fs.TrainConfig(steps=10, compile=True, **BASE)
    fs.Trainer(compile_config, tmp_path / "compiled", model=fresh(), data=DATA, progress=False).train()
    assert len(calls) == 1 and isinstance(calls[0], Net)
    assert_same(weights(tmp_path / "plain", "model"), weights(tmp_path / "compiled", "model"))


def test_a_tensor_trains_exactly_like_the_named_data_set_it_holds(tmp_path):
    """data=tensor goes through the same split, normalizer, loss floor and model as data=name."""
    config = dict(steps=6, batch_size=32, width=16, depth=2, checkpoint_every=6, log_every=3, device="cpu")
    fs.Trainer(fs.TrainConfig(data="moons", data_n=400, **config), tmp_path / "named", progress=False).train()
    tensor = fs.data.load("moons", n=400, seed=0)
    fs.Trainer(fs.TrainConfig(**config), tmp_path / "tensor", data=tensor, progress=False).train()
    named, given = fs.load_run(tmp_path / "named"), fs.load_run(tmp_path / "tensor")
    assert torch.equal(named.held_out, given.held_out)
    assert named.loss_floor is not None and named.loss_floor == given.loss_floor
    assert_same(named.model.state_dict(), given.model.state_dict())
    assert [r["loss"] for r in named.log] == [r["loss"] for r in given.log]


def test_labels_with_a_coupling_and_reference_targets(tmp_path, monkeypatch):
    """The coupling pairs within each label after the dropout (-1 among themselves), and the references
    come with their labels."""
    from flowscore import couplings, objectives

    seen_couple, seen_loss = [], []
    real_couple, real_per_sample = couplings.couple, objectives.CFM.per_sample

    def couple(x_data, noise, coupling, **kwargs):
        seen_couple.append(kwargs.get("y"))
        return real_couple(x_data, noise, coupling, **kwargs)

    def per_sample(self, model, batch, generator=None):
        seen_loss.append((batch.y, batch.reference_y))
        return real_per_sample(self, model, batch, generator)

    monkeypatch.setattr(couplings, "couple", couple)
    monkeypatch.setattr(objectives.CFM, "per_sample", per_sample)
    config = fs.TrainConfig(steps=6, coupling="ot", p_uncond=0.5, **BASE)
    fs.Trainer(config, tmp_path / "ot", model=fresh(), data=DATA, progress=False).train()
    seen_couple = seen_couple[1:]  # seen_couple[0]: the dry run
    labels = torch.cat(seen_couple)
    assert labels.shape == (6 * 64,) and set(labels.tolist()) == {-1, 0, 1}
    assert 0.35 < (labels == -1).float().mean().item() < 0.65  # p_uncond = 0.5: dropped before pairing
    for (y, _), paired in zip(seen_loss[1:], seen_couple, strict=True):  # seen_loss[0]: the dry run
        assert torch.equal(y, paired)
    seen_loss.clear()
    config = fs.TrainConfig(steps=6, reference_size=50, p_uncond=0.5, **BASE)
    fs.Trainer(config, tmp_path / "reference", model=fresh(), data=DATA, progress=False).train()
    for y, reference_y in seen_loss[1:]:
        assert (y == -1).any() and reference_y.shape == (50,) and set(reference_y.tolist()) == {0, 1}
