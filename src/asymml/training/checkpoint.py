"""Checkpoints: atomic writes, safe loading, RNG state capture, compatibility checks.

A checkpoint is a ``torch.save`` dict loadable with ``weights_only=True`` (only tensors, numbers, strings,
lists and dicts): the user model's ``state_dict`` (an ordinary PyTorch one), optimizer, scheduler, the
public random-number generators (torch, CUDA, numpy, python), the split module's own state (decomposition
generator and warm-start cache, through its public interface), the privacy accountant, the epoch/step
reached, the metrics history and the configuration.

Never in a checkpoint: the DP noise generator or the batch-sampling generator of accounted runs (a file
on disk is readable by whoever runs the host; a resumed run draws fresh noise and fresh batches).
"""

from __future__ import annotations

import os
import pickle
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import CheckpointError
from .config import TrainConfig, config_diff

__all__ = [
    "FORMAT",
    "VERSION",
    "atomic_save",
    "capture_rng",
    "check_checkpoint",
    "check_compatible",
    "find_checkpoint",
    "is_state_dict",
    "load_checkpoint",
    "read_file",
    "restore_rng",
    "split_state",
    "load_split_state",
]

FORMAT = "asymml-train-checkpoint"
VERSION = 1
CHECKPOINT_NAME = "checkpoint.pt"


def atomic_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to a temporary file in the same directory, fsync, then ``os.replace``: a reader (or a
    crash) never sees a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def fsync_dir(directory: str | Path) -> None:
    """fsync a directory, so that a rename into it survives a power loss (a no-op where unsupported)."""
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems (and Windows) cannot fsync a directory
        pass
    finally:
        os.close(fd)


def find_checkpoint(path: str | Path) -> Path:
    """The checkpoint file ``path`` names: the file itself, or ``checkpoint.pt`` in a run directory."""
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / CHECKPOINT_NAME
    if not p.is_file():
        raise CheckpointError(f"no checkpoint at {str(p)!r}")
    return p


def read_file(path: str | Path) -> Any:
    """``torch.load`` with ``weights_only=True`` on the CPU; an unreadable file raises CheckpointError."""
    p = find_checkpoint(path)
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, garbage bytes, pickle with unsafe globals...
        lines = [s.strip() for s in str(e).strip().splitlines() if s.strip()]
        with open(p, "rb") as f:
            raw_pickle = f.read(1) == b"\x80"  # a bare pickle stream (torch.save writes a zip archive)
        unsafe = isinstance(e, pickle.UnpicklingError) and (
            "GLOBAL" in str(e) or (raw_pickle and "weights only load failed" in str(e).lower()))
        if unsafe:
            why = [s for s in lines if "GLOBAL" in s or "Unsupported" in s or s.startswith("WeightsUnpickler")]
            detail = why[-1].split(":", 1)[-1].strip() if why else ""
            raise CheckpointError(
                f"{str(p)!r} was refused as unsafe: it holds Python objects other than tensors and plain data, "
                "and loading them could execute code" + (f" ({detail[:160]})" if detail else "")
                + "; only load files you wrote with asymml or torch.save of tensors"
            ) from None
        reason = f"corrupt, truncated or not written by torch.save: {(lines or [type(e).__name__])[0][:200]}"
        raise CheckpointError(f"{str(p)!r} is not a readable checkpoint ({reason})") from None


def is_state_dict(obj: Any) -> bool:
    """Whether ``obj`` looks like a bare ``state_dict`` (a non-empty mapping of names to tensors)."""
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read an asymml training checkpoint; refuse corrupt files and other kinds of file clearly."""
    return check_checkpoint(read_file(path), path)


def check_checkpoint(ckpt: Any, path: str | Path) -> dict[str, Any]:
    """``ckpt`` (what :func:`read_file` returned) if it is a complete asymml training checkpoint."""
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(
            f"{str(path)!r} is not an asymml training checkpoint"
            + (" (it looks like a bare state_dict: evaluate it with `asymml eval FILE --model NAME`)"
               if is_state_dict(ckpt) else "")
        )
    if ckpt.get("version") != VERSION:
        raise CheckpointError(f"{str(path)!r}: checkpoint version {ckpt.get('version')!r} is not supported "
                              f"(this asymml reads version {VERSION})")
    missing = [k for k in ("config", "model", "epoch", "step_in_epoch") if k not in ckpt]
    if missing:
        raise CheckpointError(f"{str(path)!r} is incomplete: missing {', '.join(missing)}")
    return ckpt


def check_compatible(ckpt: dict[str, Any], cfg: TrainConfig, path: str | Path) -> None:
    """Refuse to resume ``ckpt`` under a configuration that trains something else; say what differs."""
    diffs = config_diff(ckpt["config"], cfg.to_dict())
    if diffs:
        raise CheckpointError(
            f"checkpoint {str(path)!r} is from another model/configuration: " + "; ".join(diffs)
            + ". Resume with the checkpoint's options (omit them: they are read from the checkpoint) "
            "or start a new run in another --out directory"
        )


# ------------------------------------------------------------------------------------------- RNG


def capture_rng() -> dict[str, Any]:
    """The state of torch's (CPU and CUDA), numpy's and python's global generators (weights_only-safe)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
        "python": {"version": py_state[0], "state": list(py_state[1]), "gauss": py_state[2]},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Undo :func:`capture_rng`."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


# ------------------------------------------------------------------------------ split module state


def split_state(sm: Any) -> dict[str, Any]:
    """The split module's own state through its public interface (``SplitModule.get_extra_state``:
    decomposition generator and warm-start cache, never noise state)."""
    return {"extra_state": sm.get_extra_state()}


def load_split_state(sm: Any, state: dict[str, Any]) -> None:
    """Undo :func:`split_state` (a checkpoint without split state leaves ``sm`` as it is)."""
    if "extra_state" in state:
        sm.set_extra_state(state["extra_state"])
