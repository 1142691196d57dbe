"""``asymml validate``: show where every op of a model would run, before computing anything."""

from __future__ import annotations

import argparse

from ..options import add_arguments


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("validate", help="list what runs split / trusted for a model")
    p.add_argument("--model", default="resnet20", help="CIFAR-style name or any torchvision classification model")
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--in-channels", type=int, default=3)
    p.add_argument("--eval", action="store_true", help="validate in eval mode (BatchNorm becomes splittable)")
    add_arguments(p, include=["strict"])  # --strict/--no-strict, defined once in SplitOptions
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .. import validate
    from ..models import get_model

    model = get_model(args.model, num_classes=args.num_classes, in_channels=args.in_channels)
    model.train(not args.eval)
    report = validate(model, strict=args.strict)
    print(report)
    return 0 if report.ok or not args.strict else 1
