"""Threads chosen from the work (and applied by the trainer), memory checks, idle cores from the kernel."""

from __future__ import annotations

import pytest
import torch

from flowscore import TrainConfig, Trainer, checkpoint, resources
from flowscore.models import forward_cost, model_config


def test_threads_follow_the_work_and_the_idle_cores(monkeypatch):
    monkeypatch.setattr(resources, "idle_cores", lambda: 3)
    per_thread = resources.FLOPS_PER_THREAD
    assert resources.choose_threads(0.5 * per_thread) == 1
    assert resources.choose_threads(2.5 * per_thread) == 2
    assert resources.choose_threads(100 * per_thread) == 3  # capped by the idle cores
    assert resources.choose_threads(100 * per_thread, processes=2) == 1  # shared by two ranks
    monkeypatch.setattr(resources, "idle_cores", lambda: 1)
    assert resources.choose_threads(100 * per_thread) == 1


def test_the_default_2d_model_trains_on_one_thread_and_larger_work_on_more(monkeypatch):
    monkeypatch.setattr(resources, "idle_cores", lambda: 8)
    config = model_config("auto", (2,))
    assert 3 * forward_cost(config, (2,))[0] * 512 < resources.FLOPS_PER_THREAD  # from the FLOP count
    assert resources.threads_for(None, config, (2,), 512, 3) == 1
    digits = model_config("auto", (1, 8, 8))
    flops = 3 * forward_cost(digits, (1, 8, 8))[0] * 128
    assert (
        resources.threads_for(None, digits, (1, 8, 8), 128, 3) == int(flops // resources.FLOPS_PER_THREAD) > 1
    )
    assert resources.threads_for(4, config, (2,), 512, 3) == 4  # an explicit count wins


@pytest.mark.parametrize("threads", [None, 2])
def test_the_trainer_runs_on_the_chosen_threads_and_restores_them(tmp_path, monkeypatch, threads):
    seen = []
    save = checkpoint.save_checkpoint

    def recording(file, tensors, state):
        seen.append(torch.get_num_threads())
        save(file, tensors, state)

    monkeypatch.setattr(checkpoint, "save_checkpoint", recording)
    before = torch.get_num_threads()
    config = TrainConfig(data="moons", data_n=300, n_holdout=50, width=16, depth=1, batch_size=32, steps=4,
                         loss_floor=False, device="cpu", threads=threads)  # fmt: skip
    Trainer(config, tmp_path / "r", progress=False).train()
    assert seen and set(seen) == {threads or 1}
    assert torch.get_num_threads() == before


def test_idle_cores_and_memory_are_sane():
    assert 1 <= resources.idle_cores() <= resources.cpu_count()
    free = resources.available_memory()
    assert free is None or free > 0
    resources.check_memory(1.0, "cpu", "a byte", "never")
    with pytest.raises(ValueError, match="needs about .* of memory .* free on cpu; use less"):
        resources.check_memory(2.0**70, "cpu", "the universe", "use less")


def test_the_ot_coupling_runs_on_the_chosen_threads_not_every_core(tmp_path, monkeypatch):
    """The coupling's assignment (POT, numpy's BLAS, their OpenMP) ran on pools of one thread per core
    whatever the model's thread count: inside ``using_threads(n)`` every pool threadpoolctl sees has n
    threads, and they get their counts back after it (issue 17, item 8)."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    pytest.importorskip("ot")
    from flowscore import couplings

    seen = []
    exact = couplings._exact_pairing

    def recording(cost):
        seen.append(
            {(p["internal_api"], p["filepath"]): p["num_threads"] for p in threadpoolctl.threadpool_info()}
        )
        return exact(cost)

    monkeypatch.setattr(couplings, "_exact_pairing", recording)
    before = {(p["internal_api"], p["filepath"]): p["num_threads"] for p in threadpoolctl.threadpool_info()}
    with threadpoolctl.threadpool_limits(limits=2):  # as on a 2-core machine without OMP_NUM_THREADS
        config = TrainConfig(data="8gaussians", data_n=300, n_holdout=50, width=16, depth=1, batch_size=32,
                             steps=3, loss_floor=False, device="cpu", coupling="ot")  # fmt: skip
        Trainer(config, tmp_path / "r", progress=False).train()
        after = {
            (p["internal_api"], p["filepath"]): p["num_threads"] for p in threadpoolctl.threadpool_info()
        }
    assert seen and all(set(pools.values()) == {1} for pools in seen[-3:]), seen[-1]  # the chosen: 1
    assert set(after.values()) == {2}  # restored
    now = {(p["internal_api"], p["filepath"]): p["num_threads"] for p in threadpoolctl.threadpool_info()}
    assert {k: now[k] for k in before} == before
