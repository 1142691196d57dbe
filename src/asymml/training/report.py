"""What a training run shows: TensorBoard events, the learning-curve PNG and the JSON summary."""

from __future__ import annotations

import json
import math
import os
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["RunLogger", "plot_curves", "write_json", "jsonable"]


class RunLogger:
    """TensorBoard scalars and histograms of a run (a no-op when disabled or TensorBoard is missing).

    Step logs: ``train/loss``, ``train/accuracy``, ``train/lr``, ``train/throughput``; per split point
    ``rank/<layer>`` and the per-sample residual energy ratio ``‖R‖²/‖X‖²`` as histogram
    ``residual_energy/<layer>`` (the prototype's ``--rankdist``), plus ``rank/all_layers`` (the rank
    distribution over layers).  Epoch logs: ``epoch/*`` (losses, accuracies, lr, seconds, time split,
    epsilon), at the global step that ends the epoch.
    """

    def __init__(self, log_dir: Path | None, *, purge_step: int | None = None) -> None:
        self.writer: Any = None
        if log_dir is None:
            return
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:  # pragma: no cover - tensorboard is a dependency
            warnings.warn(f"TensorBoard logging disabled: {e}", stacklevel=2)
            return
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)

    @property
    def enabled(self) -> bool:
        return self.writer is not None

    def step(self, step: int, scalars: Mapping[str, float], release_stats: Mapping[str, Mapping[str, Any]]) -> None:
        """Log training scalars and the per-layer ranks / residual-energy histograms of the last forward."""
        if self.writer is None:
            return
        for k, v in scalars.items():
            self.writer.add_scalar(f"train/{k}", v, step)
        ranks = []
        for layer, st in release_stats.items():
            tag = layer.replace(":", "/")
            ranks.append(float(st["rank"]))
            self.writer.add_scalar(f"rank/{tag}", st["rank"], step)
            energy = st.get("energy_ratio")
            if isinstance(energy, torch.Tensor) and energy.numel() > 0:
                self.writer.add_histogram(f"residual_energy/{tag}", energy.detach().float().cpu(), step)
        if ranks:
            self.writer.add_histogram("rank/all_layers", torch.tensor(ranks), step)

    def epoch(self, step: int, scalars: Mapping[str, float | None]) -> None:
        """Log the end-of-epoch figures at global step ``step`` (``epoch/epoch`` holds the epoch number)."""
        if self.writer is None:
            return
        for k, v in scalars.items():
            if v is not None and isinstance(v, (int, float)) and math.isfinite(v):
                self.writer.add_scalar(f"epoch/{k}", v, step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def plot_curves(history: Sequence[Mapping[str, Any]], path: Path, title: str) -> Path | None:
    """Loss and accuracy (train and test) per epoch, as a PNG (matplotlib, Agg backend)."""
    if not history:
        return None
    import logging

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # font fallbacks are matplotlib's business, not the run's (torchrun's logging setup would print them)
    logging.getLogger("matplotlib.font_manager").setLevel(logging.ERROR)

    epochs = [h["epoch"] for h in history]
    fig = Figure(figsize=(10, 4), dpi=100)  # no pyplot: no global state, no display needed
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2)
    ax1.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    ax1.plot(epochs, [h["test_loss"] for h in history], "s-", label="test")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("cross-entropy loss")
    ax1.set_yscale("log")
    ax1.legend()
    ax1.grid(alpha=0.3)
    ax2.plot(epochs, [100 * h["train_accuracy"] for h in history], "o-", label="train")
    ax2.plot(epochs, [100 * h["test_accuracy"] for h in history], "s-", label="test")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("accuracy (%)")
    ax2.legend()
    ax2.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)
    return path


def jsonable(obj: Any) -> Any:
    """``obj`` with tensors as lists/numbers and non-finite floats as strings (strict JSON)."""
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return jsonable(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, Path):
        return str(obj)
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    return str(obj)


def write_json(obj: Any, path: Path) -> Path:
    """Write strict JSON atomically (temp file + ``os.replace``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(jsonable(obj), f, indent=2, allow_nan=False)
        f.write("\n")
    os.replace(tmp, path)
    return path
