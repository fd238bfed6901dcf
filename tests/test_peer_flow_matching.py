"""Cross-check against a peer library: Meta's ``flow_matching`` (its X_0 is noise, X_1 is data; its
``target`` is our ``data``, its ``epsilon`` our ``noise``). Same x_t, same velocity target dx_t, same
conversions, on ``linear`` (CondOTScheduler), ``vp`` (CosineScheduler) and ``vp-linear`` (VPScheduler)."""

from __future__ import annotations

import pytest
import torch
from conftest import make_path

fm_path = pytest.importorskip("flow_matching.path")
fm_scheduler = pytest.importorskip("flow_matching.path.scheduler")

F64 = torch.float64

PEERS = {
    "linear": lambda: fm_scheduler.CondOTScheduler(),
    "vp": lambda: fm_scheduler.CosineScheduler(),
    "vp-linear": lambda: fm_scheduler.VPScheduler(beta_min=0.1, beta_max=20.0),
}

# (peer method, our src kind, our dst kind)
PEER_CONVERSIONS = [
    ("velocity_to_epsilon", "velocity", "noise"),
    ("epsilon_to_velocity", "noise", "velocity"),
    ("velocity_to_target", "velocity", "data"),
    ("target_to_velocity", "data", "velocity"),
    ("epsilon_to_target", "noise", "data"),
    ("target_to_epsilon", "data", "noise"),
]


def batch(n: int = 64, dims: tuple[int, ...] = (2, 3)) -> tuple[torch.Tensor, ...]:
    """Times in [0.01, 0.99] (the peer divides at the endpoints and does not clamp vp-linear's beta')."""
    gen = torch.Generator().manual_seed(0)
    t = 0.01 + 0.98 * torch.rand(n, generator=gen, dtype=F64)
    x_data = torch.randn(n, *dims, generator=gen, dtype=F64)
    noise = torch.randn(n, *dims, generator=gen, dtype=F64)
    return t, x_data, noise


@pytest.mark.parametrize("name", list(PEERS))
def test_same_sample_and_velocity_target(name: str) -> None:
    path, peer = make_path(name), fm_path.AffineProbPath(PEERS[name]())
    t, x_data, noise = batch()
    peer_sample = peer.sample(noise, x_data, t)  # positional: (source = noise, target = data, t)
    torch.testing.assert_close(path.sample(x_data, t, noise), peer_sample.x_t, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        path.target(x_data, t, noise, "velocity"), peer_sample.dx_t, rtol=1e-10, atol=1e-10
    )
    x = peer_sample.x_t
    torch.testing.assert_close(
        path.conditional_velocity(x, x_data, t), peer_sample.dx_t, rtol=1e-9, atol=1e-9
    )


@pytest.mark.parametrize("name", list(PEERS))
@pytest.mark.parametrize(("method", "src", "dst"), PEER_CONVERSIONS)
def test_same_conversions(name: str, method: str, src: str, dst: str) -> None:
    """On arbitrary values (the maps are linear, so this covers marginal fields as well as targets)."""
    path, peer = make_path(name), fm_path.AffineProbPath(PEERS[name]())
    t, x, value = batch()
    t_peer = t.reshape(-1, 1, 1)  # the peer's conversions do not expand t over the trailing dims
    expected = getattr(peer, method)(value, x, t_peer)
    torch.testing.assert_close(path.convert(value, x, t, src, dst), expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", list(PEERS))
def test_same_schedule(name: str) -> None:
    path, scheduler = make_path(name), PEERS[name]()
    t = torch.linspace(0.001, 0.999, 201, dtype=F64)
    out = scheduler(t)
    for ours, theirs in (
        (path.alpha(t), out.alpha_t),
        (path.beta(t), out.sigma_t),
        (path.d_alpha(t), out.d_alpha_t),
        (path.d_beta(t), out.d_sigma_t),
    ):
        torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-12)
