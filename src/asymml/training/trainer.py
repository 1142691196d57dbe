"""The training run of ``asymml train``: one :class:`Trainer` owns the dataset, the user model and its
split, SGD with a per-step learning-rate schedule, DP-SGD on updates and the privacy accountant for
accounted runs, TensorBoard, checkpoints.

Everything public-random is seeded from ``--seed``; the data order of an epoch depends only on
``(seed, epoch)``, so a run without noise resumes bit for bit from a checkpoint written after any step
(epoch ends, every ``--checkpoint-every-steps``/``--checkpoint-every-minutes``, Ctrl-C).  Noise and the
Poisson batches of accounted runs come from the trusted secure generator, which is never saved: a resumed
noised run draws fresh noise.

Data parallel (``torchrun`` / ``--nproc-per-node``, see :mod:`asymml.training.distributed`): every rank
builds the same run, trains on its shard of each global batch, and synchronises gradients, buffers and the
step's figures with one all-reduce before the optimizer step; rank 0 alone writes the outputs.  With
DP-SGD on updates, rank 0 alone adds the update noise to its partial sum and the ranks' sums are added: the
aggregated update carries exactly one ``N(0, (sigma C)^2)`` draw, as a single-process run would.
"""

from __future__ import annotations

import copy
import math
import random
import shlex
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from ..errors import (
    AcceleratorConnectionError,
    CheckpointError,
    ConfigError,
    IntegrityError,
    RemoteError,
    TrainingDivergedError,
)
from ..microbatch import accumulate, check_micro_batchable
from .batches import Batches, PoissonBatches, mix_seed
from .builders import accelerator_name, build_model, build_split, default_out_dir, lr_factor, noise_config
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
from .config import UPDATE_BUDGET, TrainConfig
from .distributed import DistributedContext, PeerLostError, init_from_env, rank_device
from .dp import UpdatePrivatizer, trusted_generator
from .evaluation import DIVERGED_HINT, diverged_guard, evaluate
from .report import RunLogger
from .signals import StopRequests
from .summary import build_summary, epoch_line, finish_line, privacy_report

__all__ = ["Callback", "TrainResult", "Trainer", "plural"]

PRIVATE_KINDS = ("input", "residual", "activation", "grad_residual", "grad")
Callback = Callable[["Trainer", dict[str, Any]], None]


def plural(n: int, word: str) -> str:
    """``1 epoch``, ``2 epochs``."""
    return f"{n} {word}" + ("" if n == 1 else "s")


class TrainResult(dict):
    """The run summary (also written to ``OUT/summary.json``); ``status`` is ``completed``/``interrupted``."""

    @property
    def status(self) -> str:
        return str(self["status"])


class Trainer:
    """One training run of ``cfg``; :meth:`fit` trains (or resumes from ``checkpoint``) and reports.

    ``callback(trainer, info)`` is called after every optimisation step with ``epoch``, ``step`` (in the
    epoch), ``global_step``, ``loss`` and ``accuracy`` of the (global) batch.  ``echo`` prints the run's
    lines (rank 0 only).  ``dist``: the data-parallel context (default: the one ``torchrun`` describes in the
    environment, joined here; None for a single process).
    """

    def __init__(self, cfg: TrainConfig, *, checkpoint: dict[str, Any] | None = None,
                 callback: Callback | None = None, echo: Callable[[str], None] | None = None,
                 dist: DistributedContext | None = None) -> None:
        cfg.validate()
        self.cfg = cfg
        self.dist = dist if dist is not None else init_from_env(
            timeout_s=cfg.dist_timeout, trusted_interconnect=cfg.trusted_interconnect, tls=cfg.dist_tls)
        self.rank = self.dist.rank if self.dist is not None else 0
        self.world = self.dist.world_size if self.dist is not None else 1
        self.is_main = self.rank == 0
        self.callback = callback
        self.echo = (echo or _echo) if self.is_main else _silent
        out = cfg.out if cfg.out is not None else (str(default_out_dir(cfg)) if self.is_main else None)
        if self.dist is not None:  # one run directory: rank 0's (a default name holds the time)
            out = self.dist.broadcast_text(out)
        self.out = Path(str(out))
        cfg.out = str(self.out)
        if checkpoint is not None and int(checkpoint.get("world_size", 1)) != self.world:
            old = int(checkpoint.get("world_size", 1))
            raise ConfigError(
                f"the checkpoint in {str(self.out)!r} was written by a run over {plural(old, 'rank')}, this run has "
                f"{self.world}: resume it with the same number (asymml train --nproc-per-node {old} --resume "
                f"{shlex.quote(str(self.out))}, or torchrun --nproc-per-node {old} -m asymml train --resume ...); "
                "the data order and the global batch depend on it")
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
        if self.dist is not None:  # every rank has checked the run directory before rank 0 writes to it
            self.dist.barrier("start of the run")

    # ------------------------------------------------------------------ setup
    @staticmethod
    def _seed_everything(seed: int) -> None:
        torch.manual_seed(seed)
        np.random.seed(seed % 2**32)
        random.seed(seed)

    def _build(self, ckpt: dict[str, Any] | None) -> None:
        from ..data import load_dataset
        from ..privacy import PrivacyLedger, ReleaseMechanism

        cfg = self.cfg
        ds = load_dataset(cfg.dataset, data_dir=cfg.data_dir, image_size=cfg.image_size, download=cfg.download,
                          seed=cfg.seed)
        self.data = ds
        self.train_batches = Batches(ds.train, cfg.batch_size, workers=cfg.workers, limit=cfg.limit_train,
                                     seed=cfg.seed, rank=self.rank, world=self.world)
        if self.train_batches.global_batch_size > self.train_batches.n:
            per_rank = f" x {self.world} ranks" if self.world > 1 else ""
            raise ConfigError(
                f"--batch-size {cfg.batch_size}{per_rank} is larger than the training set ({self.train_batches.n} "
                f"samples): every epoch would be one step on all of it; use --batch-size "
                f"{max(1, self.train_batches.n // (8 * self.world))} or less"
            )
        self.test_batches = Batches(ds.test, cfg.test_batch_size, workers=cfg.workers, limit=cfg.limit_test,
                                    seed=cfg.seed)
        self.dp = cfg.dp_updates
        noise_seed = cfg.noise_seed  # each rank its own stream (Poisson masks of its shard)
        if noise_seed is not None and self.rank:
            noise_seed = mix_seed(noise_seed, self.rank)
        self.generator: Any = trusted_generator(noise_seed) if self.dp else None
        self.poisson = PoissonBatches(self.train_batches, self.generator) if self.dp else None
        self.steps_per_epoch = (self.poisson or self.train_batches).steps_per_epoch
        self.model = build_model(cfg, ds.num_classes, ds.in_channels, ds.image_size)
        self.criterion = nn.CrossEntropyLoss()

        # noise: epsilon -> sigma is solved once for the planned run and kept in the checkpoint
        self.noise_cfg = noise_config(cfg)
        self.sigma: float | None = None
        self.update_sigma: float | None = cfg.update_noise
        if ckpt is not None and ckpt.get("update_sigma") is not None:
            self.update_sigma = float(ckpt["update_sigma"])
        self.releases_per_step_planned: int | None = None
        mechanism = None
        if self.noise_cfg is not None:
            if ckpt is not None and ckpt.get("releases_per_step_planned") is not None:
                self.releases_per_step_planned = int(ckpt["releases_per_step_planned"])
            if self.noise_cfg.epsilon is not None:
                if ckpt is not None and ckpt.get("sigma") is not None:
                    self.sigma = float(ckpt["sigma"])
                else:
                    self.sigma = self._solve_sigma()
            else:
                self.sigma = self.noise_cfg.resolve_noise_multiplier(releases_per_step=1, steps=1)
                if self.dp and self.update_sigma is None:
                    self.update_sigma = self.sigma
                if self.dp and self.releases_per_step_planned is None:
                    self.releases_per_step_planned = self._probe_releases() + 1
            mechanism = ReleaseMechanism(self.noise_cfg, sigma=self.sigma if self.noise_cfg.nsr is None else None)
        self.sm = build_split(self.model, cfg, noise=mechanism, device=rank_device(cfg.device, self.rank, self.world))
        # micro-batched steps (gradient accumulation) must give the whole batch's gradient: refuse train-mode
        # BatchNorm now rather than at the first step.  DP-SGD on updates already runs one micro-batch per
        # sample (the smallest trusted working set), so there the micro-batch changes nothing.
        self.micro_batch: int | None = getattr(cfg, "micro_batch", None)
        if self.micro_batch is not None and not self.dp:
            check_micro_batchable(self.sm.model)
        sync = getattr(self.sm.executor, "synchronize", None)
        if callable(sync):  # start the accelerator worker now: it adopts torch's thread count from its first op
            sync()
        if cfg.mode == "plain":
            self.model.to(self.sm.executor.device)  # the whole model lives on the accelerator
        self.accountant = PrivacyLedger(cfg.accountant) if self.noise_cfg is not None else None
        self.unnoised_releases = 0
        self.releases_per_sample: dict[str, int] = {"activations": 0, "gradients": 0}
        # data parallel: rank 0 alone noises its partial sum; the ranks' sums are added (one draw in total)
        self.privatizer = UpdatePrivatizer(self.model.parameters(), clip=cfg.update_clip,
                                           noise_multiplier=float(self.update_sigma or 0.0) if self.is_main else 0.0,
                                           generator=self.generator) if self.dp else None
        self._sync_params = [p for p in self.model.parameters() if p.requires_grad]
        self._sync_buffers = [b for b in self.model.buffers() if b.is_floating_point()]

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
        self.last_checkpoint: dict[str, Any] | None = None
        self._ckpt_time = time.monotonic()
        if ckpt is not None:
            self._restore(ckpt)
        if self.dist is not None:  # every rank starts from rank 0's parameters and buffers
            self.dist.broadcast_module(self.model)

    @property
    def accelerator(self) -> str:
        """The accelerator in words: a remote server's address, or the local device."""
        return accelerator_name(self.sm.executor)

    def _solve_sigma(self) -> float:
        """Measure the noised releases of one training step, then solve the per-release sigma that spends
        ``--epsilon`` over the planned steps (with DP on updates: the releases of one sample plus the update,
        Poisson sampled at ``q``)."""
        from ..privacy import plan_sigma

        cfg = self.cfg
        k = self._probe_releases()
        if k == 0 and not self.dp:
            raise ConfigError("--epsilon: this model/rank releases nothing to the accelerator; no noise needed")
        steps = cfg.epochs * self.steps_per_epoch
        self.releases_per_step_planned = int(k + 1 if self.dp else k)
        q = self.poisson.sample_rate if self.poisson is not None else 1.0

        def plan(**kw: Any) -> float:
            return float(plan_sigma(cfg.epsilon, cfg.delta, steps=steps, sample_rate=q, poisson=self.dp,
                                    accountant=cfg.accountant, **kw))

        try:
            if not self.dp:
                sigma = plan(releases_per_step=k)
            elif k == 0:  # only the updates leave the trusted context
                if self.update_sigma is None:
                    self.update_sigma = plan(releases_per_step=0, updates_per_step=1)
                sigma = self.update_sigma
            else:
                if self.update_sigma is None:  # the updates get UPDATE_BUDGET of 1/sigma_eff^2
                    self.update_sigma = plan(releases_per_step=1) / math.sqrt(UPDATE_BUDGET)
                sigma = plan(releases_per_step=k, updates_per_step=1, update_sigma=self.update_sigma)
        except ValueError as e:
            raise ConfigError(f"--epsilon {cfg.epsilon}: {e}") from None
        what = f"{k} releases + 1 update" if self.dp else f"{k} releases"
        sampling = f", Poisson sampling q={q:.4g}" if self.dp else ""
        upd = f", updates sigma={self.update_sigma:.4g}" if self.dp else ""
        self.echo(f"noise: epsilon={cfg.epsilon} delta={cfg.delta} over {steps} steps x ({what}) per step"
                  f"{sampling} -> releases sigma={sigma:.4g}{upd} (accountant {cfg.accountant})")
        return float(sigma)

    def _probe_releases(self) -> int:
        """Noised releases per step (per sample with DP on updates), measured on a copy of the model with
        a local executor: nothing of the run changes."""
        from ..privacy import NoiseConfig

        cfg = self.cfg
        x, y = next(self.train_batches.train(cfg.seed, 0))
        if self.dp:
            x, y = x[:1], y[:1]
        probe = build_split(copy.deepcopy(self.model), cfg, noise=NoiseConfig(sigma=1.0, clip=cfg.clip), device="cpu")
        try:
            with torch.random.fork_rng(devices=[]):
                self.criterion(probe(x), y).backward()
            return int(sum(probe.mechanism.release_counts().values()))
        finally:
            probe.executor.close()

    @staticmethod
    def _fresh_running() -> dict[str, float]:
        return {"loss_sum": 0.0, "correct": 0, "seen": 0, "wall_s": 0.0, "fb_s": 0.0, "accelerator_s": 0.0,
                "blocked_s": 0.0, "allreduce_s": 0.0}

    # ------------------------------------------------------------------ checkpoints
    def state(self) -> dict[str, Any]:
        """Everything needed to continue this run (see :mod:`asymml.training.checkpoint`); never noise or
        sampling generator state."""
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
            "mechanism": self.sm.mechanism.state_dict() if self.sm.mechanism is not None else None,
            "accountant": None if self.accountant is None else self.accountant.state_dict(),
            "unnoised_releases": self.unnoised_releases,
            "releases_per_sample": dict(self.releases_per_sample),
            "sigma": self.sigma,
            "update_sigma": self.update_sigma,
            "releases_per_step_planned": self.releases_per_step_planned,
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "running": running,
            "history": self.history,
            "releases_by_kind_per_step": self.releases_by_kind_per_step,
            "elapsed_s": self.elapsed_before + time.perf_counter() - self._t_start,
            "torch_version": str(torch.__version__),
            "world_size": self.world,
            "global_batch_size": self.train_batches.global_batch_size,
        }

    def save(self) -> Path:
        """Write the checkpoint (atomically; rank 0 only) and remember where the run stands in it."""
        path = self.out / CHECKPOINT_NAME
        if self.is_main:
            path = atomic_save(self.state(), path)
        self.last_checkpoint = {"path": path, "epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
                                "global_step": self.global_step}
        self._ckpt_time = time.monotonic()
        return path

    def _checkpoint_due(self) -> bool:
        cfg = self.cfg
        last = self.last_checkpoint["global_step"] if self.last_checkpoint else 0
        if cfg.checkpoint_every_steps is not None and self.global_step - last >= cfg.checkpoint_every_steps:
            return True
        return (cfg.checkpoint_every_minutes is not None
                and time.monotonic() - self._ckpt_time >= 60.0 * cfg.checkpoint_every_minutes)

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
        if self.sm.mechanism is not None and ckpt.get("mechanism"):
            self.sm.mechanism.load_state_dict(ckpt["mechanism"])  # adaptive clip state; never noise state
        if self.accountant is not None and ckpt.get("accountant"):
            self.accountant.load_state_dict(ckpt["accountant"])
        self.unnoised_releases = int(ckpt.get("unnoised_releases", 0))
        self.releases_per_sample.update({k: int(v) for k, v in ckpt.get("releases_per_sample", {}).items()})
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
        self.last_checkpoint = {"path": Path(self.cfg.resume or self.out / CHECKPOINT_NAME), "epoch": self.epoch,
                                "step_in_epoch": self.step_in_epoch, "global_step": self.global_step}
        restore_rng(ckpt["rng"])  # last: nothing after this may draw random numbers before training

    # ------------------------------------------------------------------ training
    def _profile_totals(self) -> tuple[float, float]:
        """(accelerator seconds, trusted seconds blocked on the accelerator) since the last profile reset."""
        if self.cfg.mode not in ("asym", "noise-only"):
            return 0.0, 0.0
        prof = self.sm.profile()
        return float(prof.total["accelerator_s"]), float(prof.blocked_s)

    def _release_counts(self) -> tuple[dict[str, int], dict[str, int]]:
        ledger = self.sm.executor.ledger
        mech = self.sm.mechanism
        return dict(ledger.count_by_kind), (dict(mech.release_counts()) if mech is not None else {})

    def _count_releases(self, before: tuple[dict[str, int], dict[str, int]]
                        ) -> tuple[dict[str, int], dict[str, list[str]], int]:
        """(releases by kind, noised releases as layer names per ``activations``/``gradients``, private
        releases without noise) since ``before``."""
        ledger_now, mech_now = self._release_counts()
        delta = {k: v - before[0].get(k, 0) for k, v in ledger_now.items() if v - before[0].get(k, 0)}
        noised: dict[str, list[str]] = {"activations": [], "gradients": []}
        for layer, v in mech_now.items():
            kind = "gradients" if layer.endswith(":grad") else "activations"
            noised[kind].extend([layer] * (v - before[1].get(layer, 0)))
        n_noised = sum(len(v) for v in noised.values())
        private = sum(delta.get(k, 0) for k in PRIVATE_KINDS)
        return delta, noised, max(0, private - n_noised) if self.sm.mechanism is not None else 0

    def _forward_loss(self, x: torch.Tensor, y: torch.Tensor, where: str, reduction: str = "mean"
                      ) -> tuple[torch.Tensor, int]:
        out = self.sm(x)
        y = y.to(out.device)
        loss = nn.functional.cross_entropy(out, y, reduction=reduction)
        if not torch.isfinite(loss):
            raise TrainingDivergedError(f"{where}: the training loss is {float(loss.detach())}: {DIVERGED_HINT}")
        return loss, int((out.detach().argmax(1) == y).sum())

    def _train_step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[float, int, int]:
        """One optimisation step; returns (mean loss, correct predictions, samples) of the (global) batch."""
        t0 = time.perf_counter()
        where = f"epoch {self.epoch + 1}, step {self.step_in_epoch + 1}"
        self.optimizer.zero_grad(set_to_none=True)
        with diverged_guard(self.model, where):
            if self.dp:
                loss, correct, delta = self._dp_backward(x, y, where)
            else:
                loss, correct, delta = self._accumulated_backward(x, y, where)
        t1 = time.perf_counter()
        n = len(y)
        if self.dist is not None:  # average (DP-SGD: add) the ranks' gradients; agree on the step's figures
            loss_sum, correct_f, n_f, stop = self.dist.sync_step(
                self._sync_params, self._sync_buffers, grad_scale=1.0 if self.dp else 1.0 / self.world,
                extras=[loss * n, correct, n, float(self.stop.requested)])
            correct, n = int(round(correct_f)), int(round(n_f))
            loss = loss_sum / n if n else 0.0
            self.stop.requested = self.stop.requested or stop > 0
            self.running["allreduce_s"] += time.perf_counter() - t1
        self.optimizer.step()
        self.scheduler.step()
        t2 = time.perf_counter()
        self.running["fb_s"] += t1 - t0
        self.running["wall_s"] += t2 - t0
        if not self.releases_by_kind_per_step and delta:
            self.releases_by_kind_per_step = {k: v for k, v in delta.items() if k != "weight"}
        return loss, correct, n

    def _accumulated_backward(self, x: torch.Tensor, y: torch.Tensor, where: str
                              ) -> tuple[float, int, dict[str, int]]:
        """Forward and backward of the batch's mean loss, in micro-batches of ``cfg.micro_batch`` when set
        (:func:`asymml.microbatch.accumulate`: the accumulated gradient is the whole batch's, the trusted side
        holds one micro-batch's activations); the step's noised releases are accounted once.  Each sample is in
        exactly one micro-batch, so a step releases per sample what one micro-batch releases: the step is
        accounted with the largest micro-batch's releases (parallel composition over disjoint samples)."""
        before = self._release_counts()
        delta: dict[str, int] = {}
        worst: tuple[int, dict[str, list[str]]] = (-1, {"activations": [], "gradients": []})
        unnoised_max = 0

        def count() -> None:
            nonlocal before, worst, unnoised_max
            d, noised, unnoised = self._count_releases(before)
            before = self._release_counts()
            for k, v in d.items():
                delta[k] = delta.get(k, 0) + v
            self.unnoised_releases += unnoised
            unnoised_max = max(unnoised_max, unnoised)
            n = sum(len(v) for v in noised.values())
            if n > worst[0]:
                worst = (n, noised)

        def loss_fn(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            loss = nn.functional.cross_entropy(out, target)
            if not torch.isfinite(loss):
                raise TrainingDivergedError(f"{where}: the training loss is {float(loss.detach())}: {DIVERGED_HINT}")
            return loss

        res = accumulate(self.sm, x, y, loss_fn, micro_batch=self.micro_batch, after_each=count)
        self._account_release_only(worst[1], unnoised_max)
        return res.loss, int(res.correct or 0), delta

    def _dp_backward(self, x: torch.Tensor, y: torch.Tensor, where: str) -> tuple[float, int, dict[str, int]]:
        """DP-SGD on updates (see :mod:`asymml.training.dp`): one micro-batch per sample, per-sample clipped
        trusted shares plus noise plus public shares in ``param.grad``; the step is accounted."""
        assert self.privatizer is not None and self.poisson is not None and self.accountant is not None
        priv, sm = self.privatizer, self.sm
        priv.reset()
        loss_sum, correct, total = 0.0, 0, {}
        unnoised_max = 0
        sm.public_grad_sink = priv.public_sink
        try:
            for i in range(len(y)):
                before = self._release_counts()
                loss_t, c = self._forward_loss(x[i:i + 1], y[i:i + 1], where, reduction="sum")
                loss_t.backward()
                priv.add_sample()
                loss_sum += float(loss_t.detach())
                correct += c
                delta, noised, unnoised = self._count_releases(before)
                self.unnoised_releases += unnoised
                unnoised_max = max(unnoised_max, unnoised)
                for kind, layers in noised.items():
                    self.releases_per_sample[kind] = max(self.releases_per_sample[kind], len(layers))
                for k, v in delta.items():
                    total[k] = total.get(k, 0) + v
        finally:
            sm.public_grad_sink = None
        priv.finish(self.poisson.expected_batch_size, step=self.global_step)
        if self.dist is not None:  # every rank accounts the same step: the largest counts of any rank's samples
            n_a, n_g, unnoised_max = self.dist.all_max([self.releases_per_sample["activations"],
                                                        self.releases_per_sample["gradients"], unnoised_max])
            self.releases_per_sample.update(activations=int(n_a), gradients=int(n_g))
            unnoised_max = int(unnoised_max)
        # one step of the run: a sampled sample's releases and the noised update (an empty batch is a step
        # too: Poisson sampling's guarantee needs every step accounted, with the planned releases)
        sigma = float(self.sigma or 0.0)
        n_act, n_grad = self.releases_per_sample["activations"], self.releases_per_sample["gradients"]
        planned = (self.releases_per_step_planned or 1) - 1
        n_act += max(0, planned - n_act - n_grad)  # before any sample was seen: the probe's count
        self.accountant.step(self.poisson.sample_rate, activations=[sigma] * n_act, gradients=[sigma] * n_grad,
                             updates=[float(self.update_sigma or 0.0)], sampled_by=self.generator,
                             unnoised=unnoised_max)
        per_sample = {k_: max(1, v // max(len(y), 1)) for k_, v in total.items()}
        return (loss_sum / len(y) if len(y) else 0.0), correct, per_sample

    def _account_release_only(self, noised: dict[str, list[str]], unnoised: int) -> None:
        """Account the noised releases of a step without DP on updates (--nsr, adaptive clip, paper)."""
        mech = self.sm.mechanism
        if self.accountant is None or mech is None:
            return
        mults = mech.multipliers()
        sig = {kind: [float(self.sigma) if self.noise_cfg.nsr is None else mults[layer] for layer in layers]
               for kind, layers in noised.items()}
        self.accountant.step(1.0, activations=sig["activations"], gradients=sig["gradients"], unnoised=unnoised)

    def epsilon(self) -> float | None:
        """Epsilon of what the accountant composed so far (None without noise; inf when some private release
        had no noise).  Whether it covers the run is :func:`~asymml.training.summary.privacy_report`'s call."""
        if self.accountant is None:
            return None
        with warnings.catch_warnings():  # Opacus' hints about its range of RDP orders
            warnings.simplefilter("ignore", UserWarning)
            return float(self.accountant.epsilon(self.cfg.delta))

    def _batches(self, epoch: int) -> Any:
        if self.poisson is not None:
            return self.poisson.train(epoch, self.step_in_epoch)
        return self.train_batches.train(self.cfg.seed, epoch, self.step_in_epoch)

    def fit(self) -> TrainResult:
        """Train to ``cfg.epochs`` (from where a restored checkpoint stopped); write checkpoints, the
        summary, the curves and ``model.pt``; return the summary."""
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        self._t_start = time.perf_counter()
        if self.epoch >= self.cfg.epochs:
            self.echo(f"{self.out}: the checkpoint has completed {plural(self.epoch, 'epoch')} already; nothing "
                      "to train (pass a larger --epochs to train on)")
        else:
            self._header()
        if self.last_checkpoint is None:
            self.save()  # a lost accelerator always has a checkpoint to name
        try:
            status = self._loop()
        except PeerLostError as e:
            self._close_quietly()
            if self.dist is not None:
                self.dist.close()
            raise PeerLostError(self._peer_message(e)) from None
        except (AcceleratorConnectionError, RemoteError) as e:
            self._close_quietly()
            raise AcceleratorConnectionError(self._lost_message(e)) from None
        except IntegrityError as e:  # a wrong result: this step is discarded, the checkpoint is from before
            self._close_quietly()
            raise IntegrityError(self._lost_message(e, "rejected a result of")) from None
        if status == "interrupted":
            path = self.save()
            self.echo(f"interrupted at epoch {self.epoch + 1}, step {self.step_in_epoch}: checkpoint saved to "
                      f"{path}; continue with: {self.resume_command()}")
        return self._finish(status)

    def _loop(self) -> str:
        cfg = self.cfg
        from tqdm.auto import tqdm

        logger = RunLogger(self.out / "tensorboard" if cfg.tensorboard and self.is_main else None,
                           purge_step=self.global_step if self.global_step else None)
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
                               disable=not (cfg.progress and self.is_main), dynamic_ncols=True, file=sys.stderr)
                    with bar:
                        for x, y in self._batches(e):
                            self._one_step(x, y, logger, bar)
                            if self.stop.requested and self.step_in_epoch < self.steps_per_epoch:
                                return "interrupted"
                            if self.step_in_epoch < self.steps_per_epoch and self._checkpoint_due():
                                self.save()
                    self._end_epoch(logger)
                    if self.dist is not None:  # a signal during evaluation: every rank stops, or none
                        self.stop.requested = self.dist.all_max([float(self.stop.requested)])[0] > 0
                    if self.stop.requested and self.epoch < cfg.epochs:
                        return "interrupted"
        finally:
            logger.close()
        return "completed"

    def _one_step(self, x: torch.Tensor, y: torch.Tensor, logger: RunLogger, bar: Any) -> None:
        loss, correct, n = self._train_step(x, y)
        r = self.running
        r["loss_sum"] += loss * n
        r["correct"] += correct
        r["seen"] += n
        self.step_in_epoch += 1
        self.global_step += 1
        acc = correct / n if n else float("nan")
        if self.global_step % self.cfg.log_every == 0 or self.step_in_epoch == 1:
            logger.step(self.global_step, {
                "loss": loss, "accuracy": acc, "lr": self.optimizer.param_groups[0]["lr"],
                "throughput": r["seen"] / max(r["wall_s"], 1e-9),
            }, self.sm.release_stats())
        bar.update(1)
        seen = max(r["seen"], 1)
        bar.set_postfix(loss=f"{r['loss_sum'] / seen:.4f}", acc=f"{100 * r['correct'] / seen:.1f}%",
                        img_s=f"{r['seen'] / max(r['wall_s'], 1e-9):.0f}", refresh=False)
        if self.callback is not None:
            self.callback(self, {"epoch": self.epoch, "step": self.step_in_epoch - 1,
                                 "global_step": self.global_step, "loss": loss, "accuracy": acc})

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
            test = evaluate(self.sm, self.test_batches, progress=cfg.progress and self.is_main, rank=self.rank,
                            world=self.world, reduce=self.dist.all_sum if self.dist is not None else None)
        if not math.isfinite(test["loss"]):
            raise TrainingDivergedError(f"{where}: the test loss is {test['loss']}: {DIVERGED_HINT}")
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
            "epsilon": eps if privacy_report(self)["epsilon"] is not None else None,
        }
        if self.dist is not None:
            entry["allreduce_s"] = r["allreduce_s"]
        self.history.append(entry)
        logger.epoch(self.global_step, entry)
        self.echo(epoch_line(self, entry))
        self.save()

    # ------------------------------------------------------------------ reporting
    def resume_command(self) -> str:
        """The exact command that continues this run (data parallel: with the same number of ranks)."""
        if self.world > 1:
            return f"asymml train --nproc-per-node {self.world} --resume {shlex.quote(str(self.out))}"
        return f"asymml train --resume {shlex.quote(str(self.out))}"

    def _peer_message(self, e: BaseException) -> str:
        """What a lost rank means for this run, and how to continue it."""
        ck = self.last_checkpoint
        msg = (f"{e} Data-parallel run of {self.world} ranks stopped at epoch {self.epoch + 1}, step "
               f"{self.step_in_epoch + 1}.")
        if ck is not None:
            lost = self.global_step - ck["global_step"]
            msg += (f" The last checkpoint is {ck['path']} (epoch {ck['epoch'] + 1}, step {ck['step_in_epoch']}; "
                    f"{plural(lost, 'step')} since then are lost). Continue with: {self.resume_command()} "
                    f"(multi-host: your torchrun command with --resume {shlex.quote(str(self.out))})")
        return msg

    def _lost_message(self, e: BaseException, what: str = "lost") -> str:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        ck = self.last_checkpoint
        where = f"epoch {self.epoch + 1}, step {self.step_in_epoch + 1}"
        msg = f"{what} the accelerator {self.accelerator} at {where} ({first})."
        if ck is not None:
            lost = self.global_step - ck["global_step"]
            msg += (f" The last checkpoint is {ck['path']} (epoch {ck['epoch'] + 1}, step {ck['step_in_epoch']}; "
                    f"{plural(lost, 'step')} since then are lost). Once the accelerator server is back, continue "
                    f"with: {self.resume_command()}")
            if self.cfg.device.startswith(("tcp://", "unix://")):
                msg += " (add --device ADDRESS if it moved)"
        return msg

    def _close_quietly(self) -> None:
        try:
            self.sm.executor.close()
        except Exception:  # the connection is gone already
            pass

    def _header(self) -> None:
        cfg, ds = self.cfg, self.data
        n_params = sum(p.numel() for p in self.model.parameters())
        where = f"resuming at epoch {self.epoch + 1}, step {self.step_in_epoch}" if self.global_step else "training"
        noise = ""
        if self.noise_cfg is not None:
            noise = (f", noise nsr={cfg.nsr}" if cfg.nsr is not None else f", noise sigma={self.sigma:.4g}") + \
                f" clip={cfg.clip}"
            if self.dp:
                noise += (f", DP-SGD on updates (sigma {self.update_sigma:.4g}, clip {cfg.update_clip}, Poisson q="
                          f"{self.poisson.sample_rate:.4g})")
        self.echo(
            f"asymml train: {where} {cfg.model} ({n_params / 1e6:.2f} M parameters, {cfg.norm} norm) on {ds.name} "
            f"({self.train_batches.n} train / {self.test_batches.n} test, {ds.in_channels}x{ds.image_size}x"
            f"{ds.image_size}), mode {cfg.mode}, accelerator {self.accelerator}, rank {cfg.rank_spec}, "
            f"backward {cfg.backward}{noise}{self._micro_batch_note()}, {plural(cfg.epochs, 'epoch')} x "
            f"{plural(self.steps_per_epoch, 'step')} "
            f"-> {self.out}"
        )
        if self.dist is not None:
            self.echo(f"data parallel: {self.world} ranks (trusted contexts) x batch {cfg.batch_size} = global batch "
                      f"{self.train_batches.global_batch_size}; gradients all-reduced with gloo over "
                      f"{self.dist.transport}, collective timeout {self.dist.timeout_s:g} s; rank 0 writes the outputs")
        if cfg.noise_seed is not None and self.noise_cfg is not None:
            self.echo(f"WARNING: --noise-seed {cfg.noise_seed} makes the noise reproducible and INSECURE: anyone who "
                      "knows the seed can subtract it (for experiments only; no privacy guarantee is reported)")

    def _micro_batch_note(self) -> str:
        """``, micro-batches of m`` for the header when the step is micro-batched."""
        if self.micro_batch is None or self.dp:
            return ""
        return f", micro-batches of {self.micro_batch} (gradients accumulated)"

    def _finish(self, status: str) -> TrainResult:
        if status == "completed" and self.is_main:
            atomic_save({k: v.detach().cpu() for k, v in self.model.state_dict().items()}, self.out / "model.pt")
        summary = build_summary(self, status, write=self.is_main)
        if status == "completed" and self.history:
            self.echo(finish_line(self, summary))
        self.sm.executor.close()
        if self.dist is not None:
            self.dist.close()
        return TrainResult(summary)


def _silent(msg: str) -> None:
    """The echo of ranks other than 0: rank 0 speaks for the run."""


def _echo(msg: str) -> None:
    from tqdm.auto import tqdm

    tqdm.write(msg, file=sys.stdout)
    sys.stdout.flush()
