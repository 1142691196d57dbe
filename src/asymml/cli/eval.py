"""``asymml eval``: test accuracy of a trained model in any execution mode.

Takes an ``asymml train`` checkpoint (the model, dataset and split options are read from it) or a bare
``state_dict`` such as ``OUT/model.pt`` (options from the ``summary.json`` beside it, or from ``--model`` /
``--dataset`` / ...).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

MODES = ("asym", "plain", "trusted-only", "noise-only")

DESCRIPTION = """Test accuracy of a trained model in any execution mode.

Takes an asymml train checkpoint (the model, dataset and split options are read from it) or a bare
state_dict such as OUT/model.pt (options from the summary.json beside it, or from --model, --dataset, ...).
Options not given default to the training run's."""

EVAL_OPTIONS = ("mode", "device", "request_timeout", "tls_cert", "tls_key", "tls_ca", "insecure", "verify",
                "verify_sample", "model",
                "width", "norm", "dataset", "data_dir", "image_size", "limit_test", "workers", "rank", "tau", "decomposition",
                "iters", "basis", "backward", "micro_batch", "seed", "threads", "noise", "nsr", "clip")


def _help(text: str) -> str:
    """An option's help without its own default (eval's default is the training run's)."""
    return re.sub(r"\s*\(default[^()]*(\([^()]*\)[^()]*)*\)", "", text).replace("``", "")


def add_parser(sub: argparse._SubParsersAction) -> None:
    from ..training.config import OPTIONS, OptionType

    opts = {o.name: o for o in OPTIONS}
    p = sub.add_parser("eval", help="test accuracy of a checkpoint or state_dict in any mode",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", metavar="CHECKPOINT",
                   help="checkpoint.pt of a run (or its directory), or a bare state_dict such as model.pt")
    for name in EVAL_OPTIONS:
        o = opts[name]
        if o.is_flag:
            p.add_argument(o.cli, dest=name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                           help=_help(o.help))
        else:
            p.add_argument(o.cli, dest=name, type=OptionType(o), default=argparse.SUPPRESS,
                           metavar=o.metavar or name.upper(), help=_help(o.help))
    p.add_argument("--batch-size", dest="test_batch_size", type=OptionType(opts["test_batch_size"]),
                   default=argparse.SUPPRESS, metavar="N", help="evaluation batch size (default: the training "
                   "run's --test-batch-size)")
    p.add_argument("--no-noise", action="store_true",
                   help="evaluate without the noise the model was trained with")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run)


def _sibling_config(path: Path) -> dict[str, Any] | None:
    """The training configuration in the ``summary.json`` next to a bare state_dict (None if absent)."""
    summary = path.parent / "summary.json"
    if summary.is_file():
        try:
            cfg = json.loads(summary.read_text(encoding="utf-8")).get("config")
            if isinstance(cfg, dict):
                return cfg
        except (OSError, ValueError):
            pass
    return None


def run(args: argparse.Namespace) -> int:
    import torch

    from ..errors import CheckpointError
    from ..training.batches import Batches
    from ..training.builders import accelerator_name, build_model, build_split, noise_config
    from ..training.checkpoint import FORMAT, check_checkpoint, find_checkpoint, is_state_dict, read_file
    from ..training.config import TrainConfig, given_options
    from ..training.evaluation import evaluate
    from ..training.report import jsonable

    path = find_checkpoint(args.checkpoint)
    obj = read_file(path)
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        ckpt = check_checkpoint(obj, path)
        base, state, sigma = ckpt["config"], ckpt["model"], ckpt.get("sigma")
    elif is_state_dict(obj):
        base, state, sigma = _sibling_config(path) or {}, obj, None
    else:
        raise CheckpointError(f"{str(path)!r} is neither an asymml checkpoint nor a state_dict")

    given = given_options(args)
    cfg = TrainConfig.from_dict({k: v for k, v in base.items() if k not in ("out", "resume")},
                                source=f"configuration of {path}")
    train_mode = cfg.mode
    trained_noise = (sigma if cfg.epsilon is not None else cfg.noise), cfg.nsr
    for k, v in given.items():
        setattr(cfg, k, v)
    # noise: as given here; else the training run's (with --epsilon: the sigma solved for it), unless
    # --no-noise or a mode without noise
    cfg.epsilon = None
    if "noise" not in given and "nsr" not in given:
        use_trained = not args.no_noise and cfg.mode in ("asym", "noise-only")
        cfg.noise, cfg.nsr = trained_noise if use_trained else (None, None)
    if cfg.noise is not None or cfg.nsr is not None:
        cfg.warm_start = False  # noised releases start cold (a warm start couples samples)
    cfg.validate()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)

    from ..data import load_dataset

    ds = load_dataset(cfg.dataset, data_dir=cfg.data_dir, image_size=cfg.image_size, download=cfg.download,
                      seed=cfg.seed)
    model = build_model(cfg, ds.num_classes, ds.in_channels, ds.image_size)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        lines = str(e).strip().splitlines()
        raise CheckpointError(f"{str(path)!r} does not fit model {cfg.model!r} on {cfg.dataset}: "
                              + " ".join(s.strip() for s in lines[:3])) from None
    nc = noise_config(cfg)
    sm = build_split(model, cfg, noise=nc)
    if cfg.mode == "plain":
        model.to(sm.executor.device)
    batches = Batches(ds.test, cfg.test_batch_size, workers=cfg.workers, limit=cfg.limit_test, seed=cfg.seed)
    res = evaluate(sm, batches, progress=not args.no_progress and sys.stderr.isatty())
    sm.executor.close()
    out = {
        "checkpoint": str(path),
        "model": cfg.model,
        "dataset": cfg.dataset,
        "mode": cfg.mode,
        "trained_in_mode": train_mode,
        "accelerator": accelerator_name(sm.executor),
        "noise": None if nc is None else {"sigma": cfg.noise, "nsr": cfg.nsr, "clip": cfg.clip},
        "test_accuracy": res["accuracy"],
        "test_loss": res["loss"],
        "samples": res["samples"],
        "seconds": res["seconds"],
    }
    if args.json:
        print(json.dumps(jsonable(out), indent=2))
    else:
        noise = "" if nc is None else f", noise sigma={cfg.noise}" if cfg.noise is not None else f", nsr={cfg.nsr}"
        print(f"{cfg.model} on {cfg.dataset} ({res['samples']} test images), mode {cfg.mode}{noise}: "
              f"test accuracy {100 * res['accuracy']:.2f}%, loss {res['loss']:.4f} ({res['seconds']:.1f}s)")
    return 0
