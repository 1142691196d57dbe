"""The training loop of ``asymml train`` and the evaluation of ``asymml eval``.

One :class:`Trainer` owns a run: dataset, the user model and its split, SGD with a per-step learning-rate
schedule, the privacy accountant, TensorBoard, checkpoints.  Everything random is seeded from
``--seed``; the data order of an epoch depends only on ``(seed, epoch)``, so a checkpoint written after any
step (every epoch, and on Ctrl-C mid-epoch) resumes bit for bit.
"""

from __future__ import annotations

import copy
import math
import random
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, Subset

from ..errors import CheckpointError, ConfigError, TrainingDivergedError
from .checkpoint import (
    CHECKPOINT_NAME,
    FORMAT,
    VERSION,
    atomic_save,
    capture_rng,
    load_split_state,
    restore_rng,
    split_state,
)
from .config import DEFAULT_CIFAR_WIDTH, TrainConfig, is_cifar_model
from .report import RunLogger, plot_curves, write_json

__all__ = ["Trainer", "TrainResult", "TrainingDivergedError", "build_model", "build_split", "evaluate",
           "default_out_dir"]

NOISED_KINDS = ("residual", "activation", "grad_residual")
PRIVATE_KINDS = ("input", "residual", "activation", "grad_residual", "grad")
Callback = Callable[["Trainer", dict[str, Any]], None]


# ------------------------------------------------------------------------------------------ builders


def default_out_dir(cfg: TrainConfig) -> Path:
    """``runs/<YYYYmmdd-HHMMSS>-<model>-<mode>`` (a numbered suffix if it exists already)."""
    stem = f"{datetime.now():%Y%m%d-%H%M%S}-{cfg.model.replace(':', '-')}-{cfg.mode}"
    p = Path("runs") / stem
    i = 1
    while p.exists():
        i += 1
        p = Path("runs") / f"{stem}-{i}"
    return p


def build_model(cfg: TrainConfig, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    """The user model of ``cfg`` (random init from the global torch RNG)."""
    from ..models import get_model

    kw: dict[str, Any] = {}
    if is_cifar_model(cfg.model):
        kw["width"] = cfg.width if cfg.width is not None else DEFAULT_CIFAR_WIDTH
    try:
        return get_model(cfg.model, num_classes=num_classes, in_channels=in_channels, image_size=image_size, **kw)
    except TypeError as e:  # torchvision builders reject unknown keywords
        raise ConfigError(f"cannot build model {cfg.model!r}: {e}") from None


def noise_config(cfg: TrainConfig) -> Any:
    """The :class:`~asymml.privacy.NoiseConfig` of ``cfg`` (None without noise)."""
    from ..privacy import NoiseConfig

    try:
        return NoiseConfig.from_options(sigma=cfg.noise, nsr=cfg.nsr, epsilon=cfg.epsilon, delta=cfg.delta,
                                        clip=cfg.clip)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def build_split(model: nn.Module, cfg: TrainConfig, *, noise: Any = None, device: str | None = None) -> Any:
    """``asymml.split`` of ``model`` with the split options of ``cfg`` (``noise`` as given)."""
    import asymml
    from asymml.executors import make_executor

    return asymml.split(
        model, rank=cfg.rank_spec, decomposition=cfg.decomposition, backward=cfg.backward, noise=noise,
        mode=cfg.mode, executor=make_executor(device or cfg.device), iters=cfg.iters, basis=cfg.basis,
        input_rank=cfg.input_rank, grad_rank=cfg.grad_rank, warm_start=cfg.warm_start, seed=cfg.seed,
        noise_seed=cfg.noise_seed,
    )


def lr_factor(cfg: TrainConfig, steps_per_epoch: int) -> Callable[[int], float]:
    """Learning-rate multiplier as a function of the global step (a pure function of the config)."""
    total = max(1, cfg.epochs * steps_per_epoch)
    if cfg.scheduler == "cos":
        return lambda t: 0.5 * (1.0 + math.cos(math.pi * min(t, total) / total))
    if cfg.scheduler == "step":
        if cfg.lr_step is not None:
            every = cfg.lr_step * steps_per_epoch
            return lambda t: cfg.lr_gamma ** (t // every)
        milestones = [int(0.5 * total), int(0.75 * total)]
        return lambda t: cfg.lr_gamma ** sum(t >= m for m in milestones)
    return lambda t: 1.0


# ------------------------------------------------------------------------------------------ data


class Batches:
    """Batches of a dataset: in-memory tensors are indexed directly, other datasets go through a DataLoader.

    The training order of epoch ``e`` is a permutation drawn from a generator seeded with ``(seed, e)``;
    the last partial batch is dropped (unless the set is smaller than one batch).
    """

    def __init__(self, dataset: Dataset, batch_size: int, *, workers: int = 0, limit: int | None = None,
                 seed: int = 0) -> None:
        n = len(dataset)  # type: ignore[arg-type]
        if limit is not None and limit < n:
            keep = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 7919))[:limit].sort().values
            dataset = self._subset(dataset, keep)
            n = limit
        self.dataset = dataset
        self.n = n
        self.batch_size = batch_size
        self.workers = workers
        tensors = getattr(dataset, "tensors", None)
        self.tensors = tensors if isinstance(tensors, tuple) and len(tensors) == 2 else None

    @staticmethod
    def _subset(dataset: Dataset, keep: torch.Tensor) -> Dataset:
        tensors = getattr(dataset, "tensors", None)
        if isinstance(tensors, tuple) and len(tensors) == 2:
            from ..data import ImageTensorDataset

            return ImageTensorDataset(tensors[0][keep], tensors[1][keep])
        return Subset(dataset, keep.tolist())

    @property
    def steps_per_epoch(self) -> int:
        return max(1, self.n // self.batch_size)

    def _iterate(self, index_batches: list[torch.Tensor], loader_seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.tensors is not None:
            x, y = self.tensors
            for idx in index_batches:
                yield x[idx], y[idx]
            return
        loader = DataLoader(self.dataset, batch_sampler=[b.tolist() for b in index_batches],
                            num_workers=self.workers, generator=torch.Generator().manual_seed(loader_seed))
        yield from loader

    def train(self, seed: int, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches ``start, start+1, ...`` of training epoch ``epoch``."""
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        bs = min(self.batch_size, self.n)
        batches = [perm[i * bs:(i + 1) * bs] for i in range(start, self.steps_per_epoch)]
        return self._iterate(batches, seed * 1_000_003 + epoch * 10_007 + start)

    def ordered(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """All samples in order (evaluation)."""
        idx = torch.arange(self.n)
        return self._iterate([idx[i:i + self.batch_size] for i in range(0, self.n, self.batch_size)], 0)


def evaluate(sm: nn.Module, batches: Batches, *, progress: bool = False, desc: str = "test") -> dict[str, float]:
    """Loss and accuracy of ``sm`` over ``batches`` in eval mode (no gradients)."""
    from tqdm.auto import tqdm

    was_training = sm.training
    sm.eval()
    crit = nn.CrossEntropyLoss(reduction="sum")
    loss_sum, correct, seen = 0.0, 0, 0
    t0 = time.perf_counter()
    try:
        with torch.no_grad(), tqdm(total=batches.n, desc=desc, unit="img", leave=False, disable=not progress,
                                   dynamic_ncols=True) as bar:
            for x, y in batches.ordered():
                out = sm(x)
                y = y.to(out.device)
                loss_sum += float(crit(out, y))
                correct += int((out.argmax(1) == y).sum())
                seen += len(y)
                bar.update(len(y))
    finally:
        sm.train(was_training)
    return {"loss": loss_sum / max(seen, 1), "accuracy": correct / max(seen, 1), "samples": seen,
            "seconds": time.perf_counter() - t0}


# ------------------------------------------------------------------------------------------ divergence


_DIVERGED_HINT = ("lower --lr, the noise (--noise/--nsr/--epsilon) or --clip (checkpoints of completed epochs "
                  "are kept)")


@contextmanager
def diverged_guard(model: nn.Module, where: str) -> Iterator[None]:
    """Turn a decomposition failing on NaN/Inf activations into a :class:`TrainingDivergedError`."""
    try:
        yield
    except torch.linalg.LinAlgError as e:
        bad = [n for n, t in model.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
        state = f"non-finite model state ({', '.join(bad[:3])})" if bad else "NaN/Inf activations"
        raise TrainingDivergedError(
            f"{where}: a low-rank decomposition failed ({str(e).splitlines()[0][:90]}); the model has diverged "
            f"({state}): {_DIVERGED_HINT}"
        ) from None


# ------------------------------------------------------------------------------------------ Ctrl-C


class StopRequests:
    """SIGINT/SIGTERM handler: the first signal asks the loop to stop after the current step (it then saves
    a checkpoint and exits cleanly); a second one interrupts at once."""

    def __init__(self, echo: Callable[[str], None]) -> None:
        self.requested = False
        self.echo = echo
        self._old: dict[int, Any] = {}

    def request(self, signum: int = signal.SIGINT, frame: Any = None) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        name = signal.Signals(signum).name if signum else "stop"
        self.echo(f"\n{name}: stopping after this step and saving a checkpoint (again to abort at once)")

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self.request)
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old.clear()


# ------------------------------------------------------------------------------------------ trainer


class TrainResult(dict):
    """The run summary (also written to ``OUT/summary.json``); ``status`` is ``completed``/``interrupted``."""

    @property
    def status(self) -> str:
        return str(self["status"])


class Trainer:
    """One training run of ``cfg``; :meth:`fit` trains (or resumes from ``checkpoint``) and reports.

    ``callback(trainer, info)`` is called after every optimisation step with ``epoch``, ``step`` (in the
    epoch), ``global_step``, ``loss`` and ``accuracy`` of the batch.  ``echo`` prints the run's lines.
    """

    def __init__(self, cfg: TrainConfig, *, checkpoint: dict[str, Any] | None = None,
                 callback: Callback | None = None, echo: Callable[[str], None] | None = None) -> None:
        cfg.validate()
        self.cfg = cfg
        self.callback = callback
        self.echo = echo or _echo
        self.out = Path(cfg.out) if cfg.out is not None else default_out_dir(cfg)
        cfg.out = str(self.out)
        if checkpoint is None and (self.out / CHECKPOINT_NAME).exists():
            raise ConfigError(
                f"{str(self.out)!r} already holds a checkpoint: pass --resume to continue that run, or choose "
                "another --out"
            )
        if cfg.threads is not None:
            torch.set_num_threads(cfg.threads)
        self.stop = StopRequests(self.echo)
        self._seed_everything(cfg.seed)
        self._build(checkpoint)

    # ------------------------------------------------------------------ setup
    @staticmethod
    def _seed_everything(seed: int) -> None:
        torch.manual_seed(seed)
        np.random.seed(seed % 2**32)
        random.seed(seed)

    def _build(self, ckpt: dict[str, Any] | None) -> None:
        from ..data import load_dataset
        from ..privacy import PrivacyLedgerAccountant, ReleaseMechanism

        cfg = self.cfg
        ds = load_dataset(cfg.dataset, data_dir=cfg.data_dir, image_size=cfg.image_size, download=cfg.download,
                          seed=cfg.seed)
        self.data = ds
        self.train_batches = Batches(ds.train, cfg.batch_size, workers=cfg.workers, limit=cfg.limit_train,
                                     seed=cfg.seed)
        self.test_batches = Batches(ds.test, cfg.test_batch_size, workers=cfg.workers, limit=cfg.limit_test,
                                    seed=cfg.seed)
        self.steps_per_epoch = self.train_batches.steps_per_epoch
        self.model = build_model(cfg, ds.num_classes, ds.in_channels, ds.image_size)
        self.criterion = nn.CrossEntropyLoss()

        # noise: epsilon -> sigma is solved once for the planned run and kept in the checkpoint
        self.noise_cfg = noise_config(cfg)
        self.sigma: float | None = None
        self.releases_per_step_planned: int | None = None
        mechanism = None
        if self.noise_cfg is not None:
            if self.noise_cfg.epsilon is not None:
                if ckpt is not None and ckpt.get("sigma") is not None:
                    self.sigma = float(ckpt["sigma"])
                    self.releases_per_step_planned = ckpt.get("releases_per_step_planned")
                else:
                    self.sigma = self._solve_sigma()
            else:
                self.sigma = self.noise_cfg.resolve_noise_multiplier(releases_per_step=1, steps=1)
            mechanism = ReleaseMechanism(self.noise_cfg, sigma=self.sigma if self.noise_cfg.nsr is None else None)
        self.sm = build_split(self.model, cfg, noise=mechanism)
        _init_worker_threads(self.sm.executor)
        if cfg.mode == "plain":
            self.model.to(self.sm.executor.device)  # the whole model lives on the accelerator
        self.accountant = PrivacyLedgerAccountant(cfg.accountant) if self.noise_cfg is not None else None
        self.unnoised_releases = 0

        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                         weight_decay=cfg.wd, nesterov=cfg.nesterov)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_factor(cfg, self.steps_per_epoch))

        self.epoch = 0  # epochs completed
        self.step_in_epoch = 0  # steps completed in the current epoch
        self.global_step = 0
        self.history: list[dict[str, Any]] = []
        self.running = self._fresh_running()
        self.releases_by_kind_per_step: dict[str, int] = {}
        self.elapsed_before = 0.0
        self._t_start = time.perf_counter()
        if ckpt is not None:
            self._restore(ckpt)

    def _solve_sigma(self) -> float:
        """Measure the noised releases of one training step (on a copy of the model: nothing of the run
        changes), then solve the per-release sigma that spends ``--epsilon`` over the planned steps."""
        from ..privacy import NoiseConfig

        cfg = self.cfg
        x, y = next(self.train_batches.train(cfg.seed, 0))
        probe = build_split(copy.deepcopy(self.model), cfg, noise=NoiseConfig(sigma=1.0, clip=cfg.clip),
                            device="cpu")
        with torch.random.fork_rng(devices=[]):
            self.criterion(probe(x), y).backward()
        k = sum(probe.mechanism.release_counts().values())
        probe.executor.close()
        if k == 0:
            raise ConfigError("--epsilon: this model/rank releases nothing to the accelerator; no noise needed")
        steps = cfg.epochs * self.steps_per_epoch
        self.releases_per_step_planned = int(k)
        try:
            sigma = self.noise_cfg.resolve_noise_multiplier(releases_per_step=k, steps=steps,
                                                            mechanism=cfg.accountant)
        except ValueError as e:
            raise ConfigError(f"--epsilon {cfg.epsilon}: {e}") from None
        self.echo(f"noise: epsilon={cfg.epsilon} delta={cfg.delta} over {steps} steps x {k} releases per step "
                  f"-> noise multiplier sigma={sigma:.4g} (accountant {cfg.accountant})")
        return float(sigma)

    @staticmethod
    def _fresh_running() -> dict[str, float]:
        return {"loss_sum": 0.0, "correct": 0, "seen": 0, "wall_s": 0.0, "fb_s": 0.0, "accelerator_s": 0.0,
                "blocked_s": 0.0}

    # ------------------------------------------------------------------ checkpoints
    def state(self) -> dict[str, Any]:
        """Everything needed to continue this run bit for bit (see :mod:`asymml.training.checkpoint`)."""
        running = dict(self.running)
        if self.step_in_epoch:  # profile totals of the partial epoch (the profile is not saved)
            prof = self._profile_totals()
            running["accelerator_s"] += prof[0]
            running["blocked_s"] += prof[1]
        return {
            "format": FORMAT,
            "version": VERSION,
            "config": self.cfg.to_dict(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": capture_rng(),
            "split": split_state(self.sm),
            "accountant": None if self.accountant is None else self.accountant.state_dict(),
            "unnoised_releases": self.unnoised_releases,
            "sigma": self.sigma,
            "releases_per_step_planned": self.releases_per_step_planned,
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "running": running,
            "history": self.history,
            "releases_by_kind_per_step": self.releases_by_kind_per_step,
            "elapsed_s": self.elapsed_before + time.perf_counter() - self._t_start,
            "torch_version": str(torch.__version__),
        }

    def save(self) -> Path:
        return atomic_save(self.state(), self.out / CHECKPOINT_NAME)

    def _restore(self, ckpt: dict[str, Any]) -> None:
        try:
            self.model.load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.scheduler.load_state_dict(ckpt["scheduler"])
        except (RuntimeError, ValueError, KeyError) as e:
            msg = str(e).strip().splitlines()
            raise CheckpointError(f"checkpoint does not fit this model: {msg[0] if msg else e}"
                                  + (f" {msg[1].strip()}" if len(msg) > 1 else "")) from None
        load_split_state(self.sm, ckpt.get("split", {}))
        if self.accountant is not None and ckpt.get("accountant"):
            self.accountant.load_state_dict(ckpt["accountant"])
        self.unnoised_releases = int(ckpt.get("unnoised_releases", 0))
        self.epoch = int(ckpt["epoch"])
        self.step_in_epoch = int(ckpt["step_in_epoch"])
        self.global_step = int(ckpt.get("global_step", self.epoch * self.steps_per_epoch + self.step_in_epoch))
        self.history = list(ckpt.get("history", []))
        self.running = {**self._fresh_running(), **ckpt.get("running", {})}
        self.releases_by_kind_per_step = dict(ckpt.get("releases_by_kind_per_step", {}))
        self.elapsed_before = float(ckpt.get("elapsed_s", 0.0))
        if self.step_in_epoch >= self.steps_per_epoch:
            raise CheckpointError(f"checkpoint is at step {self.step_in_epoch} of an epoch that has only "
                                  f"{self.steps_per_epoch} steps with this configuration")
        old_epochs = ckpt["config"].get("epochs")
        if old_epochs != self.cfg.epochs:
            self.echo(f"note: --epochs {self.cfg.epochs} differs from the checkpoint's {old_epochs}; the "
                      "learning-rate schedule is stretched to the new length")
        restore_rng(ckpt["rng"])  # last: nothing after this may draw random numbers before training

    # ------------------------------------------------------------------ training
    def _profile_totals(self) -> tuple[float, float]:
        """(accelerator seconds, trusted seconds blocked on the accelerator) since the last profile reset."""
        if self.cfg.mode not in ("asym", "noise-only"):
            return 0.0, 0.0
        prof = self.sm.profile()
        return float(prof.total["accelerator_s"]), float(prof.blocked_s)

    def _train_step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[float, int]:
        sm = self.sm
        ledger = sm.executor.ledger
        mech = sm.mechanism
        before = dict(ledger.count_by_kind)
        mech_before = dict(mech.release_counts()) if mech is not None else {}
        t0 = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        where = f"epoch {self.epoch + 1}, step {self.step_in_epoch + 1}"
        with diverged_guard(self.model, where):
            out = sm(x)
            y = y.to(out.device)
            loss = self.criterion(out, y)
            if not torch.isfinite(loss):
                raise TrainingDivergedError(f"{where}: the training loss is {float(loss.detach())}: {_DIVERGED_HINT}")
            loss.backward()
        t1 = time.perf_counter()
        self.optimizer.step()
        self.scheduler.step()
        t2 = time.perf_counter()
        self.running["fb_s"] += t1 - t0
        self.running["wall_s"] += t2 - t0
        delta = {k: v - before.get(k, 0) for k, v in ledger.count_by_kind.items() if v - before.get(k, 0)}
        if not self.releases_by_kind_per_step:
            self.releases_by_kind_per_step = {k: v for k, v in delta.items() if k != "weight"}
        if self.accountant is not None and mech is not None:
            counts = mech.release_counts()
            noised = {k: v - mech_before.get(k, 0) for k, v in counts.items() if v - mech_before.get(k, 0)}
            k_noised = sum(noised.values())
            private = sum(delta.get(k, 0) for k in PRIVATE_KINDS)
            self.unnoised_releases += max(0, private - k_noised)
            if k_noised:
                if self.noise_cfg.nsr is None:
                    self.accountant.step(noise_multiplier=float(self.sigma), releases=k_noised)
                else:
                    from ..privacy import combine_noise_multipliers

                    mults = mech.multipliers()
                    combined = combine_noise_multipliers(m for layer, n in noised.items() for m in [mults[layer]] * n)
                    self.accountant.step(noise_multiplier=combined, releases=1)
        correct = int((out.detach().argmax(1) == y).sum())
        return float(loss.detach()), correct

    def epsilon(self) -> float | None:
        """Epsilon spent so far (None without noise; inf when some private release had no noise)."""
        if self.accountant is None:
            return None
        if self.unnoised_releases:
            return math.inf
        with warnings.catch_warnings():  # Opacus' hints about its range of RDP orders
            warnings.simplefilter("ignore", UserWarning)
            return float(self.accountant.get_epsilon(self.cfg.delta))

    def fit(self) -> TrainResult:
        """Train to ``cfg.epochs`` (from where a restored checkpoint stopped); write checkpoints, the
        summary, the curves and ``model.pt``; return the summary."""
        cfg = self.cfg
        from tqdm.auto import tqdm

        self.out.mkdir(parents=True, exist_ok=True)
        logger = RunLogger(self.out / "tensorboard" if cfg.tensorboard else None,
                           purge_step=self.global_step if self.global_step else None)
        self._t_start = time.perf_counter()
        if self.epoch >= cfg.epochs:
            self.echo(f"{self.out}: the checkpoint has completed {self.epoch} epochs already; nothing to train "
                      "(pass a larger --epochs to train on)")
        else:
            self._header()
        status = "completed"
        try:
            with self.stop:
                while self.epoch < cfg.epochs:
                    e = self.epoch
                    self.sm.train()
                    self.sm.reset_profile()
                    if self.step_in_epoch == 0:
                        self.running = self._fresh_running()
                    bar = tqdm(total=self.steps_per_epoch, initial=self.step_in_epoch,
                               desc=f"epoch {e + 1}/{cfg.epochs}", unit="step", leave=False,
                               disable=not cfg.progress, dynamic_ncols=True, file=sys.stderr)
                    interrupted = False
                    with bar:
                        for x, y in self.train_batches.train(cfg.seed, e, self.step_in_epoch):
                            loss, correct = self._train_step(x, y)
                            r = self.running
                            r["loss_sum"] += loss * len(y)
                            r["correct"] += correct
                            r["seen"] += len(y)
                            self.step_in_epoch += 1
                            self.global_step += 1
                            if self.global_step % cfg.log_every == 0 or self.step_in_epoch == 1:
                                logger.step(self.global_step, {
                                    "loss": loss, "accuracy": correct / len(y),
                                    "lr": self.optimizer.param_groups[0]["lr"],
                                    "throughput": r["seen"] / max(r["wall_s"], 1e-9),
                                }, self.sm.release_stats())
                            bar.update(1)
                            bar.set_postfix(loss=f"{r['loss_sum'] / r['seen']:.4f}",
                                            acc=f"{100 * r['correct'] / r['seen']:.1f}%",
                                            img_s=f"{r['seen'] / max(r['wall_s'], 1e-9):.0f}", refresh=False)
                            if self.callback is not None:
                                self.callback(self, {"epoch": e, "step": self.step_in_epoch - 1,
                                                     "global_step": self.global_step, "loss": loss,
                                                     "accuracy": correct / len(y)})
                            if self.stop.requested and self.step_in_epoch < self.steps_per_epoch:
                                interrupted = True
                                break
                    if interrupted:
                        status = "interrupted"
                        break
                    self._end_epoch(logger)
                    if self.stop.requested and self.epoch < cfg.epochs:
                        status = "interrupted"
                        break
        finally:
            logger.close()
        if status == "interrupted":
            path = self.save()
            self.echo(f"interrupted at epoch {self.epoch + 1}, step {self.step_in_epoch}: checkpoint saved to "
                      f"{path}; continue with: asymml train --resume {self.out}")
        return self._finish(status)

    def _end_epoch(self, logger: RunLogger) -> None:
        cfg, r = self.cfg, self.running
        accel, blocked = self._profile_totals()
        accel += r["accelerator_s"]
        blocked += r["blocked_s"]
        if cfg.mode == "plain":
            trusted, accel = r["wall_s"] - r["fb_s"], r["fb_s"]
        elif cfg.mode == "trusted-only":
            trusted, accel = r["wall_s"], 0.0
        else:
            trusted = r["wall_s"] - blocked
        where = f"evaluation after epoch {self.epoch + 1}"
        with diverged_guard(self.model, where):
            test = evaluate(self.sm, self.test_batches, progress=cfg.progress)
        if not math.isfinite(test["loss"]):
            raise TrainingDivergedError(f"{where}: the test loss is {test['loss']}: {_DIVERGED_HINT}")
        self.epoch += 1
        self.step_in_epoch = 0
        eps = self.epsilon()
        entry = {
            "epoch": self.epoch,
            "train_loss": r["loss_sum"] / max(r["seen"], 1),
            "train_accuracy": r["correct"] / max(r["seen"], 1),
            "test_loss": test["loss"],
            "test_accuracy": test["accuracy"],
            "lr": self.optimizer.param_groups[0]["lr"],
            "epoch_seconds": r["wall_s"],
            "eval_seconds": test["seconds"],
            "trusted_s": trusted,
            "accelerator_s": accel,
            "blocked_s": blocked,
            "throughput": r["seen"] / max(r["wall_s"], 1e-9),
            "epsilon": eps,
        }
        self.history.append(entry)
        logger.epoch(self.global_step, entry)
        line = (f"epoch {self.epoch:>{len(str(cfg.epochs))}}/{cfg.epochs}  train loss {entry['train_loss']:.4f} "
                f"acc {100 * entry['train_accuracy']:5.2f}%  test loss {entry['test_loss']:.4f} "
                f"acc {100 * entry['test_accuracy']:5.2f}%  lr {entry['lr']:.4g}  {entry['epoch_seconds']:.1f}s "
                f"(trusted {trusted:.1f}s, accelerator {accel:.1f}s)  {entry['throughput']:.0f} img/s")
        if eps is not None:
            line += f"  epsilon {eps:.3g}"
        self.echo(line)
        self.save()

    # ------------------------------------------------------------------ reporting
    def _header(self) -> None:
        cfg, ds = self.cfg, self.data
        n_params = sum(p.numel() for p in self.model.parameters())
        where = f"resuming at epoch {self.epoch + 1}, step {self.step_in_epoch}" if self.global_step else "training"
        noise = ""
        if self.noise_cfg is not None:
            noise = (f", noise nsr={cfg.nsr}" if cfg.nsr is not None else f", noise sigma={self.sigma:.4g}") + \
                f" clip={cfg.clip}"
        self.echo(
            f"asymml train: {where} {cfg.model} ({n_params / 1e6:.2f} M parameters) on {ds.name} "
            f"({self.train_batches.n} train / {self.test_batches.n} test, {ds.in_channels}x{ds.image_size}x"
            f"{ds.image_size}), mode {cfg.mode}, accelerator {self.sm.executor.device}, rank {cfg.rank_spec}, "
            f"backward {cfg.backward}{noise}, {cfg.epochs} epochs x {self.steps_per_epoch} steps -> {self.out}"
        )

    def _finish(self, status: str) -> TrainResult:
        cfg, h = self.cfg, self.history
        files = {"checkpoint": self.out / CHECKPOINT_NAME, "summary": self.out / "summary.json"}
        if status == "completed":
            files["model"] = atomic_save({k: v.detach().cpu() for k, v in self.model.state_dict().items()},
                                         self.out / "model.pt")
        if cfg.tensorboard:
            files["tensorboard"] = self.out / "tensorboard"
        curves = plot_curves(h, self.out / "curves.png",
                             f"{cfg.model} on {cfg.dataset}, mode {cfg.mode}") if h else None
        if curves is not None:
            files["curves"] = curves
        best = max(h, key=lambda e: e["test_accuracy"]) if h else None
        total_trusted = sum(e["trusted_s"] for e in h)
        total_accel = sum(e["accelerator_s"] for e in h)
        summary: dict[str, Any] = {
            "status": status,
            "config": cfg.to_dict(),
            "epochs_completed": self.epoch,
            "steps": self.global_step,
            "test_accuracy": h[-1]["test_accuracy"] if h else None,
            "best_test_accuracy": best["test_accuracy"] if best else None,
            "best_epoch": best["epoch"] if best else None,
            "test_loss": h[-1]["test_loss"] if h else None,
            "train_loss": h[-1]["train_loss"] if h else None,
            "train_accuracy": h[-1]["train_accuracy"] if h else None,
            "epoch_seconds": [e["epoch_seconds"] for e in h],
            "eval_seconds": [e["eval_seconds"] for e in h],
            "train_seconds": sum(e["epoch_seconds"] for e in h),
            "wall_seconds": self.elapsed_before + time.perf_counter() - self._t_start,
            "time_split": {
                "trusted_s": total_trusted,
                "accelerator_s": total_accel,
                "blocked_s": sum(e["blocked_s"] for e in h),
                "trusted_fraction": total_trusted / (total_trusted + total_accel) if total_trusted + total_accel
                else None,
                "definition": (
                    "training steps only. asym/noise-only: accelerator_s = the executor's compute time (it runs "
                    "concurrently), trusted_s = step wall time minus the time the trusted side waited for the "
                    "accelerator; plain: accelerator_s = forward+backward, trusted_s = the rest (optimizer "
                    "step); trusted-only: everything is trusted"
                ),
            },
            "model": {
                "name": cfg.model,
                "parameters": sum(p.numel() for p in self.model.parameters()),
                "width": (cfg.width if cfg.width is not None else DEFAULT_CIFAR_WIDTH)
                if is_cifar_model(cfg.model) else None,
                "num_classes": self.data.num_classes,
                "in_channels": self.data.in_channels,
                "image_size": self.data.image_size,
            },
            "dataset": {"name": self.data.name, "train_samples": self.train_batches.n,
                        "test_samples": self.test_batches.n, "steps_per_epoch": self.steps_per_epoch},
            "accelerator": str(self.sm.executor.device),
            "releases_per_step": self.releases_by_kind_per_step,
            "history": h,
            "files": {k: str(v) for k, v in files.items()},
            "versions": {"torch": str(torch.__version__), "asymml": _asymml_version()},
        }
        if self.noise_cfg is not None:
            eps = self.epsilon()
            desc = self.accountant.describe() if self.accountant is not None else {}
            notes = []
            if self.unnoised_releases:
                notes.append(f"{self.unnoised_releases} private releases carried no noise (backward "
                             f"{cfg.backward}: full activation gradients are released), so epsilon is infinite")
            if not self.noise_cfg.formally_accounted:
                notes.append("adaptive clip: the bound is data dependent, epsilon is a heuristic, not a guarantee")
            summary.update({
                "epsilon": eps,
                "delta": cfg.delta,
                "privacy": {
                    "noise_multiplier": self.sigma,
                    "noise": {"sigma": cfg.noise, "nsr": cfg.nsr, "epsilon_target": cfg.epsilon, "clip": cfg.clip},
                    "releases_per_step_planned": self.releases_per_step_planned,
                    "accountant": desc,
                    "sampling": "shuffled fixed-size batches: no amplification by subsampling (sample rate 1)",
                    "notes": notes,
                },
            })
        write_json(summary, self.out / "summary.json")
        if status == "completed" and h:
            eps = summary.get("epsilon")
            self.echo(
                f"test accuracy {100 * summary['test_accuracy']:.2f}% (best {100 * summary['best_test_accuracy']:.2f}% "
                f"at epoch {summary['best_epoch']}), {summary['train_seconds']:.1f}s training"
                + ("" if eps is None else f", epsilon {eps:.3g} at delta {cfg.delta:g}")
                + f"; summary: {self.out / 'summary.json'}"
            )
        self.sm.executor.close()
        return TrainResult(summary)


def _init_worker_threads(executor: Any) -> None:
    """Make the in-process accelerator thread adopt torch's thread count now.

    A new thread picks up ``torch.set_num_threads`` lazily, at its first parallel op; ops before that run
    with the default count, which changes their round-off.  Without this, a run resumed with ``--threads``
    would differ from the uninterrupted run in the last bits (the worker thread starts at another step).
    """
    pool = getattr(executor, "_pool", None)
    if pool is not None:
        pool.submit(torch.get_num_threads).result()


def _asymml_version() -> str:
    from .. import __version__

    return __version__


def _echo(msg: str) -> None:
    from tqdm.auto import tqdm

    tqdm.write(msg, file=sys.stdout)
    sys.stdout.flush()
