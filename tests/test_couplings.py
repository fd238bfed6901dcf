"""Minibatch couplings against brute-force assignments (every permutation of <= 7 points, float64)."""

from __future__ import annotations

import itertools
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import PATH_NAMES, make_path, reference_targets

from flowscore import checkpoint
from flowscore.couplings import couple, entropic_plan, pairing
from flowscore.data import toy
from flowscore.losses import cfm, dsm
from flowscore.marginals import EmpiricalMarginal
from flowscore.training import CHECKPOINT_FILE, TrainConfig, Trainer

ROOT = Path(__file__).resolve().parents[1]

DT = torch.float64


def brute_force_assignment(x_data: torch.Tensor, noise: torch.Tensor) -> tuple[list[int], float]:
    """The permutation j minimising sum_i ||x_data_i - noise_j(i)||^2 over all B! of them, and its cost."""
    a, b = x_data.double().flatten(1), noise.double().flatten(1)
    cost = [[float(((a[i] - b[j]) ** 2).sum()) for j in range(len(b))] for i in range(len(a))]
    best = min(itertools.permutations(range(len(a))), key=lambda p: sum(cost[i][p[i]] for i in range(len(a))))
    return list(best), sum(cost[i][best[i]] for i in range(len(a)))


def batch(seed: int, b: int, shape: tuple[int, ...] = (2,), dtype: torch.dtype = DT):
    g = torch.Generator().manual_seed(seed)
    x_data = 1.5 * torch.randn(b, *shape, generator=g, dtype=dtype) + 0.5
    return x_data, torch.randn(b, *shape, generator=g, dtype=dtype)


@pytest.mark.parametrize("b", [2, 3, 5, 7])
@pytest.mark.parametrize("shape", [(2,), (3,), (1, 2, 2)])
def test_ot_pairing_is_the_brute_force_assignment(b, shape):
    for seed in range(4):
        x_data, noise = batch(seed, b, shape)
        want, _ = brute_force_assignment(x_data, noise)
        assert pairing(x_data, noise, "ot").tolist() == want


def test_ot_pairing_in_float32_is_optimal_for_the_float32_points():
    for seed in range(6):
        x_data, noise = batch(seed, 7, (4,), torch.float32)
        got = pairing(x_data, noise, "ot").tolist()
        _, best_cost = brute_force_assignment(x_data, noise)
        cost = sum(float(((x_data[i].double() - noise[j].double()) ** 2).sum()) for i, j in enumerate(got))
        assert cost == pytest.approx(best_cost, rel=1e-12)


@pytest.mark.filterwarnings("ignore:Sinkhorn did not converge")
def test_sinkhorn_with_tiny_regularisation_is_the_ot_assignment():
    for seed in range(5):
        x_data, noise = batch(seed, 7)
        want, _ = brute_force_assignment(x_data, noise)
        got = pairing(x_data, noise, "sinkhorn", reg=1e-3, generator=torch.Generator().manual_seed(seed))
        assert got.tolist() == want


@pytest.mark.filterwarnings("ignore:Sinkhorn did not converge")
def test_sinkhorn_pairs_interpolate_between_ot_and_independent():
    """The mean transport cost of the sampled pairs grows with reg, from the OT cost towards the cost of
    random pairs (the mean over all pairs i, j)."""
    x_data, noise = batch(0, 32)
    cost = torch.cdist(x_data, noise).pow(2)
    ot_cost = float(cost[torch.arange(32), pairing(x_data, noise, "ot")].mean())
    random_cost = float(cost.mean())
    gen = torch.Generator().manual_seed(0)
    means = []
    for reg in (0.005, 0.1, 10.0):
        draws = [pairing(x_data, noise, "sinkhorn", reg=reg, generator=gen) for _ in range(10)]
        means.append(sum(float(cost[torch.arange(32), d].mean()) for d in draws) / len(draws))
    assert ot_cost <= means[0] < means[1] < means[2]
    assert means[0] < ot_cost * 1.1
    assert means[2] == pytest.approx(random_cost, rel=0.1)


def log_domain_sinkhorn(cost: torch.Tensor, eps: float, iterations: int = 2000) -> torch.Tensor:
    """The entropic plan with uniform marginals: plain float64 log-domain Sinkhorn written here (no POT)."""
    b = cost.shape[0]
    log_w = torch.full((b,), -math.log(b), dtype=DT)
    f, g = torch.zeros(b, dtype=DT), torch.zeros(b, dtype=DT)
    for _ in range(iterations):
        f = eps * (log_w - torch.logsumexp((g[None, :] - cost) / eps, 1))
        g = eps * (log_w - torch.logsumexp((f[:, None] - cost) / eps, 0))
    return torch.exp((f[:, None] + g[None, :] - cost) / eps)


def test_entropic_plan_relative_and_absolute_regularisation_against_an_independent_sinkhorn():
    """reg_absolute=True: epsilon = reg; default: epsilon = reg x mean cost. Both plans equal a log-domain
    Sinkhorn written here; scaling the points by c leaves the relative plan unchanged, while the absolute
    plan at (c x, c^2 eps) is the plan at (x, eps) and at (c x, eps) another one."""
    x_data, noise = batch(11, 6)
    cost = ((x_data[:, None] - noise[None]) ** 2).sum(-1)
    absolute = entropic_plan(x_data, noise, 0.8, reg_absolute=True)
    torch.testing.assert_close(absolute, log_domain_sinkhorn(cost, 0.8), rtol=1e-4, atol=1e-7)
    relative = entropic_plan(x_data, noise, 0.1)
    torch.testing.assert_close(
        relative, log_domain_sinkhorn(cost, 0.1 * float(cost.mean())), rtol=1e-4, atol=1e-7
    )
    torch.testing.assert_close(entropic_plan(3 * x_data, 3 * noise, 0.1), relative, rtol=1e-4, atol=1e-7)
    scaled = entropic_plan(2 * x_data, 2 * noise, 0.8 * 4, reg_absolute=True)
    torch.testing.assert_close(scaled, absolute, rtol=1e-4, atol=1e-7)
    assert float((entropic_plan(2 * x_data, 2 * noise, 0.8, reg_absolute=True) - absolute).abs().sum()) > 0.1


@pytest.mark.filterwarnings("ignore:Sinkhorn did not converge")
def test_entropic_plan_below_the_plain_iterations_range_equals_an_independent_sinkhorn():
    """A small absolute epsilon (max cost / epsilon far above the plain iteration's range: SB-CFM's 2 sigma^2
    with a small sigma), where the CPU takes POT's stabilised iteration: the plan equals the log-domain
    Sinkhorn written here, and its marginals are uniform."""
    g = torch.Generator().manual_seed(4)
    x_data = 3 * torch.randn(64, 2, generator=g, dtype=DT)
    noise = torch.randn(64, 2, generator=g, dtype=DT)
    cost = ((x_data[:, None] - noise[None]) ** 2).sum(-1)
    eps = 0.1
    assert float(cost.max()) / eps > 300  # outside the plain iteration
    plan = entropic_plan(x_data, noise, eps, reg_absolute=True)
    # POT stops after 2000 iterations, where at this epsilon the marginals are still off by ~1e-5 of 1/64
    torch.testing.assert_close(plan, log_domain_sinkhorn(cost, eps, 20000), rtol=0, atol=3e-5)
    for axis in (0, 1):
        torch.testing.assert_close(plan.sum(axis), torch.full((64,), 1 / 64, dtype=DT), rtol=0, atol=3e-5)
    assert float((plan - log_domain_sinkhorn(cost, 2 * eps, 2000)).abs().max()) > 1e-3  # eps matters


def test_sinkhorn_pairs_are_reproducible_with_the_generator():
    """Every rank draws the same pairs from the same generator state (torchrun agreement)."""
    x_data, noise = batch(3, 32)
    first = couple(x_data, noise, "sinkhorn", reg=0.1, generator=torch.Generator().manual_seed(7))
    second = couple(x_data, noise, "sinkhorn", reg=0.1, generator=torch.Generator().manual_seed(7))
    assert torch.equal(first, second)


def test_coupling_on_the_global_batch_then_slicing_agrees_across_process_counts():
    """What the trainer does under torchrun: couple the global batch, then each of R ranks takes a slice;
    the union of the slices is the single-process batch."""
    x_data, noise = batch(4, 12)
    whole = couple(x_data, noise, "ot")
    slices = [couple(x_data, noise, "ot")[r * 6 : (r + 1) * 6] for r in range(2)]
    assert torch.equal(torch.cat(slices), whole)


@pytest.mark.parametrize("coupling", ["ot", "sinkhorn"])
def test_class_aware_pairs_never_cross_labels(coupling):
    x_data, noise = batch(5, 30)
    y = torch.randint(-1, 4, (30,), generator=torch.Generator().manual_seed(1))
    index = pairing(x_data, noise, coupling, reg=0.1, y=y, generator=torch.Generator().manual_seed(0))
    assert torch.equal(y[index], y)
    if coupling == "ot":
        assert sorted(index.tolist()) == list(range(30))


def test_class_aware_ot_is_the_brute_force_assignment_within_each_label():
    x_data, noise = batch(6, 12)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 1])
    index = pairing(x_data, noise, "ot", y=y)
    for label in (0, 1, 2):
        rows = (y == label).nonzero().squeeze(1)
        want, _ = brute_force_assignment(x_data[rows], noise[rows])
        assert index[rows].tolist() == rows[want].tolist()


def test_independent_coupling_is_the_identity():
    x_data, noise = batch(0, 9)
    assert pairing(x_data, noise, "independent").tolist() == list(range(9))
    assert couple(x_data, noise) is noise


class Model:
    def __init__(self, dim: int):
        self.w = torch.randn(dim, dim, generator=torch.Generator().manual_seed(2), dtype=DT)

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x @ self.w) * (1 + t[:, None])


@pytest.mark.parametrize("name", PATH_NAMES)
def test_coupled_losses_equal_plain_losses_with_the_brute_force_permutation(name):
    """cfm/dsm with coupling="ot" are the plain losses on the noise reordered by the brute-force optimum,
    written out here with the reference schedule."""
    x_data, noise = batch(8, 6, (3,))
    t = torch.linspace(0.1, 0.9, 6, dtype=DT)
    want_perm, _ = brute_force_assignment(x_data, noise)
    paired = noise[want_perm]
    ref = reference_targets(name, x_data, paired, t)
    model, path = Model(3), make_path(name)
    want_cfm = ((model(ref["x"], t) - ref["velocity"]) ** 2).sum(1).mean()
    want_dsm = ((model(ref["x"], t) - ref["score"]) ** 2).sum(1).mean()
    assert torch.allclose(cfm(model, x_data, path, t, noise, coupling="ot"), want_cfm, rtol=1e-10)
    assert torch.allclose(dsm(model, x_data, path, t, noise, coupling="ot"), want_dsm, rtol=1e-10)
    assert torch.allclose(
        cfm(model, x_data, path, t, noise, coupling="independent"), cfm(model, x_data, path, t, noise)
    )


def test_coupled_loss_with_labels_pairs_within_labels():
    x_data, noise = batch(9, 8, (2,))
    y = torch.tensor([0, 0, 1, 1, 0, 1, 0, 1])
    t = torch.full((8,), 0.5, dtype=DT)
    seen = {}

    def model(x, t, labels):
        seen["x"] = x
        return torch.zeros_like(x)

    cfm(model, x_data, "linear", t, noise, y=y, coupling="ot")
    paired = noise[pairing(x_data, noise, "ot", y=y)]
    assert torch.allclose(seen["x"], 0.5 * x_data + 0.5 * paired)
    assert torch.equal(y[pairing(x_data, noise, "ot", y=y)], y)


def test_coupling_arguments_are_checked():
    x_data, noise = batch(0, 4)
    model = Model(2)
    with pytest.raises(ValueError, match="coupling"):
        cfm(model, x_data, "linear", coupling="optimal")
    with pytest.raises(ValueError, match="coupling_reg"):
        cfm(model, x_data, "linear", coupling="sinkhorn", coupling_reg=0.0)
    with pytest.raises(ValueError, match="noise"):
        pairing(x_data, noise[:3], "ot")
    with pytest.raises(ValueError, match="y"):
        pairing(x_data, noise, "ot", y=torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="independent coupling"):
        cfm(model, x_data, "linear", coupling="ot", reference=x_data)


def test_ot_coupling_changes_the_marginal_velocity():
    """docs/theory.md: under the independent coupling the regression's minimiser is the posterior average
    EmpiricalMarginal.velocity, so the residual u - m.velocity(x) is orthogonal to every function of x:
    E<x, u - m.velocity(x)> = 0 (within 4 standard errors). Under minibatch OT the minimiser E_pi[u | x] is
    another field: the same statistic is many standard errors away from 0."""
    data = toy("8gaussians", 256).double()
    path = make_path("linear")
    marginal = EmpiricalMarginal(data, path)
    gen = torch.Generator().manual_seed(1)
    t = torch.full((64,), 0.5, dtype=DT)
    stats = {"independent": [], "ot": []}
    for _ in range(100):
        x_data = data[torch.randint(256, (64,), generator=gen)]
        noise = torch.randn(64, 2, generator=gen, dtype=DT)
        for coupling, values in stats.items():
            paired = couple(x_data, noise, coupling)
            x = path.sample(x_data, t, paired)
            residual = path.target(x_data, t, paired, "velocity") - marginal.velocity(x, t)
            values.append((residual * x).sum(1))
    for coupling, values in stats.items():
        v = torch.cat(values)
        z = float(v.mean() / (v.std() / len(v) ** 0.5))
        assert (abs(z) < 4) if coupling == "independent" else (abs(z) > 20), (coupling, z)


# -- the trainer ---------------------------------------------------------------------------------------------
TINY = dict(
    data="moons", data_n=600, n_holdout=100, width=16, depth=2, batch_size=32, warmup=5, steps=20,
    checkpoint_every=10, log_every=10, device="cpu",
)  # fmt: skip


def test_trainer_with_a_coupling_trains_and_logs_no_loss_floor(tmp_path):
    """The floor of the independent coupling is not the floor of a coupled loss (docs/theory.md)."""
    result = Trainer(TrainConfig(**TINY, coupling="ot"), tmp_path / "run", progress=False).train()
    assert result["step"] == 20 and math.isfinite(result["loss_ema"])
    assert result["loss_floor"] is None
    plain = Trainer(TrainConfig(**TINY), tmp_path / "plain", progress=False).train()
    assert plain["loss_floor"] is not None


@pytest.mark.parametrize(
    "options, match",
    [
        ({"coupling": "ot", "objective": "fm"}, "cfm and dsm only"),
        ({"coupling": "sinkhorn", "objective": "sm", "prediction": "score"}, "cfm and dsm only"),
        ({"coupling": "ot", "reference_size": 10}, "independent"),
        ({"coupling": "exact"}, "coupling"),
        ({"coupling_reg": 0.0}, "coupling_reg"),
    ],
)
def test_train_config_refuses_couplings_where_they_do_not_apply(options, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**{**TINY, **options})


@pytest.mark.slow
def test_torchrun_two_processes_with_sinkhorn_coupling_match_one_process(tmp_path):
    """The coupling is computed on the global batch (drawing the Sinkhorn pairs from the shared generator),
    so 2 processes train on the same pairs as 1: the same weights."""
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    values = {**TINY, "coupling": "sinkhorn", "coupling_reg": 0.1, "loss_floor": False}
    config_file = tmp_path / "tiny.toml"
    toml = {
        k: str(v).lower() if isinstance(v, bool) else f'"{v}"' if isinstance(v, str) else v
        for k, v in values.items()
    }
    config_file.write_text("".join(f"{k} = {v}\n" for k, v in toml.items()))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "flowscore", "train", "--config", str(config_file), "--out", str(tmp_path / "ddp"),
        "--no-progress",
    ]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    Trainer(TrainConfig(**values), tmp_path / "single", progress=False).train()
    ddp, _ = checkpoint.load_checkpoint(tmp_path / "ddp" / CHECKPOINT_FILE)
    single, _ = checkpoint.load_checkpoint(tmp_path / "single" / CHECKPOINT_FILE)
    a, b = checkpoint.unprefixed("model", ddp), checkpoint.unprefixed("model", single)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)
