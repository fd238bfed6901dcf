"""Training: :class:`Trainer` (AdamW, warm-up, EMA, checkpoints, exact resume, torchrun DDP) and its loop.

The run folder it writes (and :func:`load_run`) is described in :mod:`flowscore.runs`; the settings in
:mod:`flowscore.config` (both re-exported here).

The loop knows nothing about noise levels: the :class:`~flowscore.objectives.Objective` (the built-in one
of ``config.objective``, or your own ``objective=``) draws a batch's times, noise, coupling and references,
wraps the network (preconditioning) and returns the per-sample loss; the loop averages it and steps AdamW.

Each step draws its randomness (batch indices, label dropout, then the objective's draws) from one
``torch.Generator`` seeded by ``seed`` whose state is in the checkpoint, so ``train(resume=True)`` after a
crash ends with weights bit-identical (on the CPU) to an uninterrupted run. Under ``torchrun`` every rank
draws the same global batch; a built-in objective draws on the whole of it and each rank trains on its
slice, so with DDP averaging the gradients the update equals the one-process update. Your own objective
gets its rank's slice and a generator of that rank's own.

Bring your own model, data (:mod:`flowscore.sources`) or objective: see :class:`Trainer`. With class labels
each training label is replaced by -1 with probability ``p_uncond`` (classifier-free guidance).

Around the loop: :mod:`flowscore.prepare` loads and checks everything before a file is written,
:mod:`flowscore.runs` creates, checks and cleans the run folder, :mod:`flowscore.schedules` holds the
learning rate and the EMA, :mod:`flowscore.distributed` the torchrun process group,
:mod:`flowscore.runlog` the reports (``log.csv``, progress bar, TensorBoard) and
:func:`flowscore.floor._loss_floor` the run's loss floor.

Nothing is lost: every input is checked and the memory a step needs is estimated before the run folder is
touched; once a checkpoint exists nothing removes the folder. A failure (a full disk, a diverging loss, any
exception) raises :class:`TrainingFailed`, whose message names the cause and the checkpoint kept, which
``resume`` continues. A failure before the first checkpoint removes only the files this process wrote.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import math
import os
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from . import _validate, checkpoint, resources, runlog, runs
from .conditioning import drop_labels
from .config import (  # noqa: F401  (re-exported: flowscore.training.TrainConfig and its defaults)
    FLOW_MAPS,
    IMAGE_DEFAULTS,
    IMAGE_SHAPES,
    RESUMABLE_CHANGES,
    VECTOR_DEFAULTS,
    TrainConfig,
    resolve_device,
    resolve_preset,
)
from .distributed import _Dist, _init_distributed
from .floor import FLOOR_MAX_SIZE, FLOOR_WORK, LossFloor, _loss_floor  # noqa: F401  (re-exported)
from .models import describe
from .objectives import Objective, QualityWarning
from .prepare import OBJECTIVE_FIELDS, _autocast, _prepare, _Prepared, source_batch  # noqa: F401
from .resources import TRAINING_PASSES, step_memory  # noqa: F401  (re-exported)
from .runlog import RunLog
from .runs import (  # noqa: F401  (re-exported: the run folder format; and its life while training)
    CHECKPOINT_FILE,
    LOG_FIELDS,
    LOG_FILE,
    RUN_FILE,
    Run,
    RunInUse,
    _check_resumable,
    _check_run_dir,
    _make_dir,
    _remove_own_files,
    _restore,
    load_run,
)
from .schedules import (
    _checked_resumed,
    ema_decay_at,
    ema_update,
    learning_rate,
    resumed_schedule,  # noqa: F401  (re-exported)
)

if TYPE_CHECKING:
    from .tblog import TensorBoardLog

LOSS_EMA_DECAY = 0.99


class TrainingFailed(RuntimeError):
    """Training stopped after it started writing: the message names the cause and what was kept."""


class _Diverged(Exception):
    def __init__(self, step: int, loss: float):
        super().__init__(f"training diverged at step {step} (loss {loss:.4g})")
        self.step, self.loss = step, loss


class _Estimate:
    """Times the steps after the first of a run (or of a resumed part) and gives the estimated time of the
    rest once :data:`flowscore.runlog.ESTIMATE_STEPS` steps are done (once; None before and after)."""

    def __init__(self, start: int, steps: int, device: torch.device):
        self.start, self.steps, self.device = start, steps, device
        self.begin: float | None = None
        self.done = steps - start <= runlog.ESTIMATE_STEPS  # a run that short needs no estimate

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def tick(self, step: int) -> str | None:
        if self.done:
            return None
        if step == self.start + 1:
            self.begin = self._now()
        elif step == self.start + runlog.ESTIMATE_STEPS and self.begin is not None:
            self.done = True
            per_step = (self._now() - self.begin) / (runlog.ESTIMATE_STEPS - 1)
            return runlog.estimate_text(per_step, self.steps - step, self.start + 2, step)
        return None


# -- the trainer -------------------------------------------------------------------------------------------
class Trainer:
    """Trains ``config`` into ``run_dir``: AdamW, linear LR warm-up (+ cosine), grad clipping, EMA.

    ``Trainer(config, run_dir).train()`` starts a run: every input is checked (and the data loaded) before
    ``run_dir`` is created, and a non-empty ``run_dir`` is refused. ``train(resume=True)`` continues from
    ``run_dir``'s checkpoint (or starts afresh when there is none); ``config`` may then be None (the stored
    one is used) and only ``RESUMABLE_CHANGES`` fields may differ from the stored config. A run folder that
    another process is writing is refused (:class:`flowscore.runs.RunInUse`, a ``ValueError``).

    ``model``: any ``nn.Module`` called as ``model(x, t)``, or ``model(x, t, y)`` when the data has labels
    (None: the built-in MLP or UNet of ``config.model``); it is trained in place, and the run stores only
    its weights (``load_run(run_dir, model=...)`` loads them back into a module you build). ``data``: a
    tensor ``(N, *dims)``, a pair ``(x, y)`` with integer labels ``0..K-1``, a map-style ``Dataset`` of
    ``x`` or ``(x, y)`` items, or a ``DataLoader`` (None: ``config.data``, which must then be empty when
    ``data`` is given). Resuming such a run takes the same ``model`` and ``data`` again (tensors and
    Datasets are checked against the run's checksum; a DataLoader's position is restored as
    :mod:`flowscore.sources` describes).

    ``source``: the source distribution at t = 0 as data (the same kinds as ``data``; a DataLoader is read
    into memory), for a data-to-data flow (:mod:`flowscore.source_data`); None: ``config.source``, or
    N(0, I) when that is empty. Resuming takes it again (checked against the run's checksum).

    ``objective``: the training objective (:class:`flowscore.Objective`; None: the built-in one of
    ``config.objective``, whose fields then describe it). Your own objective trains with everything the
    built-in ones get; the run stores its :meth:`~flowscore.Objective.to_dict`, never its code, so resuming
    takes it again, and ``load_run(run_dir, model=...)`` reads its prediction from the run.

    Failures after the run started raise :class:`TrainingFailed` (see the module docstring).
    """

    def __init__(
        self,
        config: TrainConfig | dict[str, Any] | None,
        run_dir: str | Path,
        *,
        model: nn.Module | None = None,
        data: object = None,
        progress: bool = True,
        objective: Objective | None = None,
        source: object = None,
    ):
        if isinstance(config, dict):
            config = TrainConfig.from_dict(config)
        if config is not None and not isinstance(config, TrainConfig):
            raise ValueError(f"config must be a TrainConfig, a dict or None, got {type(config).__name__}")
        if config is not None:
            config.validate()
        if model is not None and not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch nn.Module, got {type(model).__name__}")
        self.config = config
        self.run_dir = Path(run_dir)
        self.model = model
        self.data = data
        self.progress = progress
        self.objective = objective
        self.source = source

    @classmethod
    def resume(
        cls,
        run_dir: str | Path,
        *,
        steps: int | None = None,
        model: nn.Module | None = None,
        data: object = None,
        progress: bool = True,
        objective: Objective | None = None,
        source: object = None,
    ) -> Trainer:
        """A trainer that continues ``run_dir`` with its stored config (``steps``: a new total); a run trained
        on your own model, data, objective or source takes them again."""
        config = runs.stored_config(Path(run_dir))
        if steps is not None:
            config = dataclasses.replace(config, steps=steps)
        return cls(
            config, run_dir, model=model, data=data, progress=progress, objective=objective, source=source
        )

    # -- the run -----------------------------------------------------------------------------------------
    def train(self, resume: bool = False) -> dict[str, Any]:
        """Runs (or continues) training to ``config.steps``; returns its step, loss EMA and loss floor."""
        if self.config is None:
            if not resume:
                raise ValueError(
                    "config is None: pass a TrainConfig, or resume=True to continue a stored run"
                )
            self.config = runs.stored_config(self.run_dir)
        config = self.config
        _check_run_dir(self.run_dir, resume)
        device = resolve_device(config.device, int(os.environ.get("LOCAL_RANK", "0")))
        dist = _init_distributed(device)
        try:
            if config.batch_size % dist.world:
                raise ValueError(
                    f"batch_size {config.batch_size} must be divisible by the {dist.world} processes"
                )
            prepared = _prepare(
                config, device, dist.world, self.model, self.data, self.objective, self.source
            )
            warning = prepared.objective.quality_warning(prepared.model)
            if warning and dist.main and not resume:
                warnings.warn(warning, QualityWarning, stacklevel=2)
            with resources.using_threads(prepared.threads):
                result = self._run(config, prepared, device, dist, resume)
            dist.barrier()  # no rank tears the group down while another still talks to it
            return result
        finally:
            if dist.owns_group:
                gc.collect()  # free DDP's reducer (held in reference cycles) while gloo is still up
                torch.distributed.destroy_process_group()

    def _run(
        self, config: TrainConfig, prepared: _Prepared, device: torch.device, dist: _Dist, resume: bool
    ) -> dict[str, Any]:
        lock = runs.RunLock(self.run_dir)
        created = False
        if dist.main:
            created = _make_dir(self.run_dir)
            lock.acquire()  # refused: nothing is removed (the folder is another writer's now)
        loop: _Loop | None = None
        started = False
        try:
            if dist.main:
                _check_run_dir(self.run_dir, resume)  # again, now that this process holds the folder
            dist.barrier()
            restored = _restore(self.run_dir, config, resume)
            if restored is not None:
                run_file, *restored = restored
                floor, absent = _check_resumable(self.run_dir, run_file, prepared)
            else:
                floor, absent = None, None
                if dist.main:
                    floor, absent = _loss_floor(config, prepared, self.progress)
            loop = _Loop(config, prepared, device, dist, self.run_dir, floor, absent)
            if restored is not None:
                loop.load(*restored)
            if dist.main:
                runs.remove_temporaries(self.run_dir)
                started = True
                if restored is None:
                    loop.phase = f"writing {RUN_FILE}"
                    runs.write_run_file(
                        self.run_dir, config=config, model=prepared.model, path=prepared.path,
                        held_out=prepared.held_out, normalizer=prepared.normalizer,
                        n_train=prepared.n_train, data_sha256=prepared.data_sha256,
                        loss_floor=None if floor is None else floor.to_dict(), loss_floor_absent=absent,
                        objective=prepared.objective.to_dict(), labels=prepared.label_info(),
                        held_out_labels=prepared.held_out_labels, source=prepared.source,
                        normalisation=prepared.normalisation(),
                    )  # fmt: skip
            dist.barrier()
            return loop.run(self.progress)
        except BaseException as err:
            if dist.main:
                self._fail(err, loop, created, started)
            raise
        finally:
            lock.release()

    def _fail(self, err: BaseException, loop: _Loop | None, created: bool, started: bool) -> None:
        """After a failure: removes this process's own files when no checkpoint exists, and re-raises the
        failure of a started run as :class:`TrainingFailed` naming the cause and the checkpoint kept (input
        errors and Ctrl-C propagate as they are)."""
        kept = runs.checkpoint_step(self.run_dir)
        if kept is None and (started or created):
            _remove_own_files(self.run_dir, created, written=started)
        if not started or isinstance(err, KeyboardInterrupt):
            return
        if isinstance(err, _Diverged):
            what = str(err)
            fix = f"lower --lr (now {self.config.lr:g}) or set --grad-clip, and start a new run"
        else:
            if isinstance(err, OSError) and err.errno:
                cause = os.strerror(err.errno).lower()
            else:
                cause = f"{type(err).__name__}: {' '.join(str(err).split())}"
            what = f"{cause} while {loop.phase if loop is not None else 'starting'}"
            fix = f"fix that, then continue it (`flowscore train --out {self.run_dir} --resume`)"
            if kept is None:
                fix = "fix that and train again"
        if kept is None:
            raise TrainingFailed(
                f"{what}; no checkpoint had been written, so the run was removed; {fix}"
            ) from err
        raise TrainingFailed(f"{what}; the checkpoint of step {kept} is kept; {fix}") from err


def _average_gradients(model: nn.Module, world: int) -> None:
    """Each parameter's gradient replaced by its mean over the ``world`` processes (what DDP does in its
    backward; a parameter without a gradient counts as 0), in one all-reduce."""
    params = [p for p in model.parameters() if p.requires_grad]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat)
    flat /= world
    offset = 0
    for p in params:
        p.grad = flat[offset : offset + p.numel()].view_as(p).clone()
        offset += p.numel()


class _Loop:
    """The training state (model, EMA, optimizer, generator, loss statistics) and the step loop."""

    def __init__(
        self,
        config: TrainConfig,
        prepared: _Prepared,
        device: torch.device,
        dist: _Dist,
        run_dir: Path,
        floor: LossFloor | None,
        floor_absent: str | None = None,
    ):
        self.config, self.prepared, self.device = config, prepared, device
        self.dist, self.run_dir = dist, run_dir
        self.floor, self.floor_absent = floor, floor_absent
        self.floor_value = None if floor is None else floor.value
        self.objective = prepared.objective
        self.model = prepared.model
        self.ema = copy.deepcopy(self.model).requires_grad_(False)
        self.net: nn.Module = self.model
        # a flow-map objective calls the model inside torch.func.jvp, which DDP's forward does not support
        # (its bucket rebuild and buffer broadcast): its gradients are averaged over the processes by hand
        self.average_gradients = dist.world > 1 and self.objective.two_time
        if dist.world > 1 and not self.average_gradients:
            ids = [device.index] if device.type == "cuda" else None
            self.net = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        if config.compile:
            self.net = torch.compile(self.net)
        self.net = self.objective.wrap(self.net)
        self.ema_model = self.objective.wrap(self.ema)
        if prepared.source is not None:  # TensorBoard's samples start from source points (samplers.sample)
            self.ema_model.x_source = prepared.source.train
        self.stream = prepared.stream
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay
        )
        self.generator = torch.Generator(device=device).manual_seed(config.seed)
        self.step = 0
        self.resumed: dict[str, Any] | None = None  # the schedule's continuation (resumed_schedule)
        self.window_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.window_count = 0
        self.loss_ema: torch.Tensor | None = None
        # the first step whose loss was not finite (-1: none yet) and that loss, kept on the device
        self.bad_step = torch.full((), -1, dtype=torch.long, device=device)
        self.bad_loss = torch.zeros((), dtype=torch.float64, device=device)
        self.phase = "starting"

    # -- state -------------------------------------------------------------------------------------------
    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        self.window_sum = self.dist.mean(self.window_sum)
        if self.loss_ema is not None:
            self.loss_ema = self.dist.mean(self.loss_ema)
        optim_tensors, optim_meta = checkpoint.optimizer_to_flat(self.optimizer.state_dict())
        tensors = {
            **checkpoint.prefixed("model", self.model.state_dict()),
            **checkpoint.prefixed("ema", self.ema.state_dict()),
            **checkpoint.prefixed("optim", optim_tensors),
            "rng.generator": self.generator.get_state(),
            "rng.torch": torch.get_rng_state(),
        }
        if self.device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(self.device)
        state = {
            "format": 1, "step": self.step, "config": self.config.to_dict(), "model": describe(self.model),
            "optimizer": optim_meta, "window_sum": self.window_sum.item(), "window_count": self.window_count,
            "loss_ema": None if self.loss_ema is None else self.loss_ema.item(), "lr_resumed": self.resumed,
        }  # fmt: skip
        if self.stream is not None:
            loader_tensors, state["loader"] = self.stream.state()
            tensors.update(loader_tensors)
        return tensors, state

    def load(self, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
        try:
            self.model.load_state_dict(checkpoint.unprefixed("model", tensors))
            self.ema.load_state_dict(checkpoint.unprefixed("ema", tensors))
            optim = checkpoint.optimizer_from_flat(
                checkpoint.unprefixed("optim", tensors), state["optimizer"]
            )
            self.optimizer.load_state_dict(optim)
            self.generator.set_state(tensors["rng.generator"])
            if self.stream is not None:  # before torch's generator is restored: it replays the epoch
                self.stream.load(tensors, state["loader"])
            torch.set_rng_state(tensors["rng.torch"])
            if self.device.type == "cuda" and "rng.cuda" in tensors:
                torch.cuda.set_rng_state(tensors["rng.cuda"], self.device)
            self.step = int(state["step"])
            self.window_sum.fill_(state["window_sum"])
            self.window_count = int(state["window_count"])
            if state["loss_ema"] is not None:
                self.loss_ema = torch.tensor(state["loss_ema"], dtype=torch.float64, device=self.device)
            resumed = _checked_resumed(state.get("lr_resumed"), self.step, self.config.lr)
            self.resumed, note = resumed_schedule(
                self.config, int(state["config"]["steps"]), self.step, resumed
            )
            if note is not None and self.dist.main:
                print(note, flush=True)
        except (KeyError, RuntimeError, ValueError, TypeError, IndexError) as err:
            raise ValueError(
                f"checkpoint in {str(self.run_dir)!r} does not match this run ({type(err).__name__}: {err}); "
                "start a new run"
            ) from None

    def check_finite(self) -> None:
        """Raises :class:`_Diverged` if some loss so far was NaN or Inf (one device sync; a collective)."""
        step = self.dist.first_flagged(self.bad_step)
        if step >= 0:
            raise _Diverged(step, float(self.bad_loss) if int(self.bad_step) == step else math.nan)

    def save(self) -> None:
        self.check_finite()
        tensors, state = self.state()  # collective on every rank
        if self.dist.main:
            self.phase = f"writing the checkpoint of step {self.step}"
            checkpoint.save_checkpoint(self.run_dir / CHECKPOINT_FILE, tensors, state)

    def set_phase(self, phase: str) -> None:
        """What the run is doing now, for the message of a failure (:meth:`Trainer._fail`)."""
        self.phase = phase

    # -- one update --------------------------------------------------------------------------------------
    def batch(self) -> tuple[torch.Tensor, torch.Tensor | None, slice, dict[str, torch.Tensor]]:
        """The global batch ``(x_data, y, part, source)`` drawn from the run's generator (indices, label
        dropout, then a data source's points: ``{"source": ...}``, else ``{}``), and this rank's ``part``
        of it. A DataLoader gives each rank its own batch, whole.

        With labels each label is replaced by -1 with probability ``p_uncond`` before the objective draws
        (so a coupling pairs within each label after the dropout, the dropped points among themselves)."""
        config, gen = self.config, self.generator
        labels, train = self.prepared.labels, self.prepared.train
        part = slice(None)
        if self.stream is None:
            idx = torch.randint(train.shape[0], (config.batch_size,), generator=gen, device=self.device)
            x_data, y = train[idx], None if labels is None else labels[idx]
            if self.dist.world > 1:
                share = config.batch_size // self.dist.world
                part = slice(self.dist.rank * share, (self.dist.rank + 1) * share)
        else:
            x_data, y = self.stream.next()
            x_data = x_data.to(self.device, torch.float32, non_blocking=True)
            y = None if labels is None or y is None else y.to(self.device, non_blocking=True)
        if y is not None and config.p_uncond > 0:
            y = drop_labels(y, config.p_uncond, gen)
        return x_data, y, part, source_batch(self.prepared, x_data.shape[0], y, gen)

    def rank_generator(self) -> torch.Generator:
        """A generator of this rank's own for an objective that draws on its slice (:meth:`Objective.loss`):
        seeded from the run's generator (one seed per rank, drawn by every rank, so the run's generator
        stays the same on all ranks and in the checkpoint)."""
        seeds = torch.randint(2**62, (self.dist.world,), generator=self.generator, device=self.device)
        return torch.Generator(self.device).manual_seed(int(seeds[self.dist.rank]))

    def update(self) -> torch.Tensor:
        config, objective = self.config, self.objective
        lr = learning_rate(config, self.step, self.resumed)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        with _validate.validation(False):
            x_data, y, part, source = self.batch()
            if objective.draws_globally:  # on the global batch: 1 and N processes train on the same pairs
                batch, generator = objective.draw(x_data, y, self.generator, **source)[part], None
            else:
                batch, generator = (
                    objective.draw(x_data[part], None if y is None else y[part]),
                    self.rank_generator(),
                )
        with _validate.validation(False), _autocast(config, self.device):
            loss = objective.per_sample(self.net, batch, generator).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.average_gradients:
            _average_gradients(self.model, self.dist.world)
        if config.grad_clip:
            nn.utils.clip_grad_norm_(self.model.parameters(), config.grad_clip)
        self.optimizer.step()
        ema_update(self.ema, self.model, ema_decay_at(config.ema_decay, self.step))
        self.step += 1
        return loss.detach()

    def record(self, loss: torch.Tensor) -> None:
        loss = loss.double()
        first = (self.bad_step < 0) & ~torch.isfinite(loss)
        self.bad_step = torch.where(first, self.step, self.bad_step)
        self.bad_loss = torch.where(first, loss, self.bad_loss)
        self.window_sum += loss
        self.window_count += 1
        if self.loss_ema is None:
            self.loss_ema = loss.clone()
        else:
            self.loss_ema.mul_(LOSS_EMA_DECAY).add_(loss, alpha=1 - LOSS_EMA_DECAY)

    def log_row(self, steps_per_s: float) -> dict[str, Any]:
        self.check_finite()
        window = self.dist.mean(self.window_sum).item() / max(self.window_count, 1)
        ema = self.dist.mean(self.loss_ema).item()
        self.window_sum.zero_()
        self.window_count = 0
        return {
            "step": self.step, "loss": f"{window:.6g}", "loss_ema": f"{ema:.6g}",
            "lr": f"{learning_rate(self.config, self.step - 1, self.resumed):.6g}",
            "steps_per_s": f"{steps_per_s:.4g}",
            "loss_floor": "" if self.floor_value is None else f"{self.floor_value:.6g}",
        }  # fmt: skip

    def log_samples(self, tensorboard: TensorBoardLog) -> None:
        """A sample grid of the EMA model into the TensorBoard log (its own generator: see tblog)."""
        prepared = self.prepared
        tensorboard.samples(
            self.step, self.ema_model, prepared.path, self.objective.prediction,
            tuple(prepared.train.shape[1:]), prepared.normalizer.decode,
            prepared.num_classes if prepared.labels is not None else None, self.config.seed, self.device,
        )  # fmt: skip

    def model_text(self) -> str:
        """The line printed before training: the model and its parameters, steps, batch, preset, device."""
        config = self.config
        parameters = sum(p.numel() for p in self.model.parameters())
        preset = resolve_preset(config.preset, config.device) if config.data in IMAGE_SHAPES else None
        threads = self.prepared.threads
        return runlog.model_text(describe(self.model), parameters, config.steps, config.batch_size, preset,
                                 str(self.device), threads)  # fmt: skip

    def run(self, progress: bool) -> dict[str, Any]:
        config = self.config
        log = None
        if self.dist.main:  # the reports: log.csv, the progress bar, TensorBoard
            log = RunLog(self.run_dir, config.steps, self.step, progress, config.tensorboard, self.set_phase)
        self.model.train()
        tick, tick_step = time.perf_counter(), self.step
        if log is not None:
            log.note(self.model_text())
        timer = _Estimate(self.step, config.steps, self.device)
        try:
            while self.step < config.steps:
                self.phase = f"training step {self.step + 1}"
                self.record(self.update())
                if log is not None:
                    log.advance()
                    text = timer.tick(self.step)
                    if text is not None:
                        log.note(text)
                if self.step % config.log_every == 0 or self.step == config.steps:
                    now = time.perf_counter()
                    row = self.log_row((self.step - tick_step) / max(now - tick, 1e-9))  # on every rank
                    tick, tick_step = now, self.step
                    if log is not None:
                        log.row(row, self.floor)
                if self.step % config.checkpoint_every == 0 or self.step == config.steps:
                    self.save()
                    if log is not None and log.tensorboard is not None:
                        self.phase = "writing TensorBoard samples"
                        self.log_samples(log.tensorboard)
        finally:
            if log is not None:
                log.close()
        ema = None if self.loss_ema is None else self.dist.mean(self.loss_ema).item()
        return {
            "step": self.step, "loss_ema": ema, "loss_floor": self.floor_value,
            "loss_floor_standard_error": None if self.floor is None else self.floor.standard_error,
            "loss_floor_absent": self.floor_absent, "normalisation": self.prepared.normalisation(),
        }  # fmt: skip
