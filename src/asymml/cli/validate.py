"""``asymml validate``: show where every op of a model would run, before computing anything."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("validate", help="list what runs split / trusted for a model")
    p.add_argument("--model", default="resnet20", help="CIFAR-style name or any torchvision classification model")
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--in-channels", type=int, default=3)
    p.add_argument("--eval", action="store_true", help="validate in eval mode (BatchNorm becomes splittable)")
    p.add_argument("--strict", action="store_true", help="fail on ops that are neither split nor known non-linear")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .. import validate
    from ..models import get_model

    model = get_model(args.model, num_classes=args.num_classes, in_channels=args.in_channels)
    model.train(not args.eval)
    report = validate(model, strict=args.strict)
    print(report)
    return 0 if report.ok or not args.strict else 1
