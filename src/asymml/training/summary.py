"""What a finished (or stopped) run reports: ``summary.json``, its ``privacy`` object (SPEC §7) and the
terminal lines."""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any

import torch

from .checkpoint import CHECKPOINT_NAME
from .config import DEFAULT_CIFAR_WIDTH, is_cifar_model
from .report import plot_curves, write_json

if TYPE_CHECKING:
    from .trainer import Trainer

__all__ = ["build_summary", "epoch_line", "finish_line", "privacy_report"]

TIME_SPLIT_DEFINITION = (
    "training steps only. asym/noise-only: accelerator_s = the executor's compute time (it runs concurrently), "
    "trusted_s = step wall time minus the time the trusted side waited for the accelerator; plain: "
    "accelerator_s = forward+backward, trusted_s = the rest (optimizer step); trusted-only: everything is trusted"
)


def privacy_report(t: Trainer) -> dict[str, Any]:
    """``{"epsilon", "delta", "covers", "notes"}`` of run ``t`` (SPEC §7).

    ``covers`` lists what the accountant composed: ``activations`` (noised forward releases),
    ``gradients`` (noised gradient residuals, protected backward), ``updates`` (DP-SGD on the trusted share
    of every update), ``sampling`` (amplification by secure Poisson sampling).  ``epsilon`` is a number only
    when everything the accelerator sees is covered -- releases, gradients and updates, under a fixed clip,
    with OS-keyed noise -- and ``null`` otherwise, with ``notes`` saying why.
    """
    cfg = t.cfg
    if cfg.mode in ("plain", "trusted-only"):
        what = ("the whole model, its inputs and activations run on the accelerator" if cfg.mode == "plain"
                else "nothing is released, but the weights after each step are not noised")
        return {"epsilon": None, "delta": None, "covers": [],
                "notes": [f"mode {cfg.mode}: no differential privacy ({what})"]}
    if t.noise_cfg is None or t.accountant is None:
        return {"epsilon": None, "delta": None, "covers": [],
                "notes": ["no noise: residuals, gradient residuals and weight updates reach the accelerator "
                          "without DP noise (use --epsilon for an accounted run)"]}
    covers = list(t.accountant.covers)
    notes = list(t.accountant.notes())
    if cfg.backward == "paper":
        notes.append("backward paper: full activation gradients are released without noise")
    if t.dp and "sampling" not in covers and cfg.noise_seed is not None:
        notes.append("batches are Poisson sampled from the reproducible --noise-seed: no amplification")
    if not t.dp:
        why = ("--nsr" if cfg.nsr is not None else "an adaptive --clip" if isinstance(cfg.clip, str)
               else f"--backward {cfg.backward}")
        notes.append(f"DP-SGD on updates needs --noise or --epsilon with a fixed --clip and --backward protected; "
                     f"this run has {why}, so the accelerator reads each update by differencing two steps' weights")
    if not t.noise_cfg.formally_accounted:
        notes.append("adaptive clip: the bound is data dependent, not a guarantee")
    if cfg.noise_seed is not None:
        notes.append(f"noise from --noise-seed {cfg.noise_seed} (INSECURE, for experiments): anyone who knows the "
                     "seed can subtract it")
    if cfg.norm == "batch" and any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in t.model.modules()):
        notes.append("BatchNorm running statistics are computed from private data without noise and reach the "
                     "accelerator in evaluation (use --norm group)")
    eps = t.epsilon()
    # complete: the updates are noised and every private release was noised (a kind absent from covers
    # was not released at all: e.g. layers kept fully trusted)
    complete = "updates" in covers and not notes and eps is not None and math.isfinite(eps)
    if complete:
        notes.append("epsilon composes, per step, every noised release of a sampled sample and the noised trusted "
                     "share of its update (accelerator shares of weight gradients are post-processing of "
                     f"released tensors); steps compose over the run (accountant {cfg.accountant}); the "
                     "test-set evaluation is not covered")
    else:
        if eps is not None and math.isfinite(eps):
            notes.append(f"the noised releases alone account to epsilon {eps:.4g} (not a guarantee for the run)")
        notes.insert(0, "epsilon is null: what the accelerator sees is not fully covered")
    return {"epsilon": eps if complete else None, "delta": cfg.delta, "covers": covers, "notes": notes}


def _accounting_details(t: Trainer) -> dict[str, Any]:
    cfg = t.cfg
    details: dict[str, Any] = {
        "noise_multiplier": t.sigma,
        "noise": {"sigma": cfg.noise, "nsr": cfg.nsr, "epsilon_target": cfg.epsilon, "clip": cfg.clip},
        "releases_per_step_planned": t.releases_per_step_planned,
        "accountant": t.accountant.describe() if t.accountant is not None else {},
        "epsilon_releases_composed": t.epsilon(),
    }
    if t.dp and t.poisson is not None:
        details["updates"] = {"clip": cfg.update_clip, "noise_multiplier": t.update_sigma,
                              "noise_std_of_sum": (t.update_sigma or 0.0) * cfg.update_clip,
                              "divided_by_expected_batch_size": t.poisson.expected_batch_size,
                              "per_sample": "one micro-batch per sample; public accelerator shares added unclipped"}
        details["sampling"] = {"kind": "poisson", "sample_rate": t.poisson.sample_rate,
                               "generator": repr(t.generator)}
    else:
        details["sampling"] = {"kind": "shuffled fixed-size batches", "sample_rate": 1.0}
    return details


def build_summary(t: Trainer, status: str, *, write: bool = True) -> dict[str, Any]:
    """The run summary; writes ``summary.json`` and ``curves.png`` (unless ``write`` is false: the ranks
    other than 0 of a data-parallel run)."""
    cfg, h = t.cfg, t.history
    files = {"checkpoint": t.out / CHECKPOINT_NAME, "summary": t.out / "summary.json"}
    if status == "completed":
        files["model"] = t.out / "model.pt"
    if cfg.tensorboard:
        files["tensorboard"] = t.out / "tensorboard"
    curves = plot_curves(h, t.out / "curves.png", f"{cfg.model} on {cfg.dataset}, mode {cfg.mode}") \
        if h and write else None
    if curves is not None:
        files["curves"] = curves
    best = max(h, key=lambda e: e["test_accuracy"]) if h else None
    total_trusted = sum(e["trusted_s"] for e in h)
    total_accel = sum(e["accelerator_s"] for e in h)
    privacy = privacy_report(t)
    summary: dict[str, Any] = {
        "status": status,
        "config": cfg.to_dict(),
        "epochs_completed": t.epoch,
        "steps": t.global_step,
        "test_accuracy": h[-1]["test_accuracy"] if h else None,
        "best_test_accuracy": best["test_accuracy"] if best else None,
        "best_epoch": best["epoch"] if best else None,
        "test_loss": h[-1]["test_loss"] if h else None,
        "train_loss": h[-1]["train_loss"] if h else None,
        "train_accuracy": h[-1]["train_accuracy"] if h else None,
        "epoch_seconds": [e["epoch_seconds"] for e in h],
        "eval_seconds": [e["eval_seconds"] for e in h],
        "train_seconds": sum(e["epoch_seconds"] for e in h),
        "wall_seconds": t.elapsed_before + time.perf_counter() - t._t_start,
        "time_split": {
            "trusted_s": total_trusted,
            "accelerator_s": total_accel,
            "blocked_s": sum(e["blocked_s"] for e in h),
            "trusted_fraction": total_trusted / (total_trusted + total_accel) if total_trusted + total_accel else None,
            "definition": TIME_SPLIT_DEFINITION,
        },
        "model": {
            "name": cfg.model,
            "norm": cfg.norm,
            "parameters": sum(p.numel() for p in t.model.parameters()),
            "width": (cfg.width if cfg.width is not None else DEFAULT_CIFAR_WIDTH) if is_cifar_model(cfg.model) else None,
            "num_classes": t.data.num_classes,
            "in_channels": t.data.in_channels,
            "image_size": t.data.image_size,
        },
        "dataset": {"name": t.data.name, "train_samples": t.train_batches.n, "test_samples": t.test_batches.n,
                    "steps_per_epoch": t.steps_per_epoch},
        "world_size": t.world,
        "global_batch_size": (t.poisson.expected_batch_size if t.poisson is not None
                              else t.train_batches.global_batch_size),
        "distributed": None if t.dist is None else {
            **t.dist.describe(), "batch_size_per_rank": cfg.batch_size,
            "global_batch_size": t.train_batches.global_batch_size,
            "sampling": ("Poisson: each rank samples its own shard (samples rank::world) at the global rate q"
                         if t.poisson is not None else "one seeded permutation per epoch; rank r takes part r of "
                         "each global batch"),
            "update_noise": "added once, by rank 0, to the sum of the ranks' clipped trusted shares"
                            if t.dp else None,
        },
        "accelerator": t.accelerator,
        "releases_per_step": t.releases_by_kind_per_step,
        "epsilon": privacy["epsilon"],
        "delta": privacy["delta"],
        "privacy": privacy,
        "history": h,
        "files": {k: str(v) for k, v in files.items()},
        "versions": {"torch": str(torch.__version__), "asymml": _asymml_version()},
    }
    if t.noise_cfg is not None:
        summary["privacy_accounting"] = _accounting_details(t)
    if write:
        write_json(summary, t.out / "summary.json")
    return summary


def epoch_line(t: Trainer, entry: dict[str, Any]) -> str:
    """The terminal line of a finished epoch."""
    cfg = t.cfg
    line = (f"epoch {t.epoch:>{len(str(cfg.epochs))}}/{cfg.epochs}  train loss {entry['train_loss']:.4f} "
            f"acc {100 * entry['train_accuracy']:5.2f}%  test loss {entry['test_loss']:.4f} "
            f"acc {100 * entry['test_accuracy']:5.2f}%  lr {entry['lr']:.4g}  {entry['epoch_seconds']:.1f}s "
            f"(trusted {entry['trusted_s']:.1f}s, accelerator {entry['accelerator_s']:.1f}s)  "
            f"{entry['throughput']:.0f} img/s")
    if entry.get("epsilon") is not None:
        line += f"  epsilon {entry['epsilon']:.3g}"
    return line


def finish_line(t: Trainer, summary: dict[str, Any]) -> str:
    """The terminal lines that close a completed run (accuracy, privacy, where the summary is)."""
    priv = summary["privacy"]
    if priv["epsilon"] is not None:
        eps = f"epsilon {priv['epsilon']:.3g} at delta {priv['delta']:g} (covers {', '.join(priv['covers'])})"
    else:
        eps = "epsilon: none (" + "; ".join(priv["notes"][1:2] or priv["notes"][:1]) + ")"
    return (f"test accuracy {100 * summary['test_accuracy']:.2f}% (best {100 * summary['best_test_accuracy']:.2f}% "
            f"at epoch {summary['best_epoch']}), {summary['train_seconds']:.1f}s training; {eps}; summary: "
            f"{t.out / 'summary.json'}")


def _asymml_version() -> str:
    from .. import __version__

    return __version__
