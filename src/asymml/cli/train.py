"""``asymml train``: train a model split between the trusted context and the accelerator.

With no options it trains a narrow CIFAR-style VGG on scikit-learn's digits in ``asym`` mode on the CPU.
Every option may also come from a YAML/TOML file (``--config``); see :mod:`asymml.training.config`.
"""

from __future__ import annotations

import argparse

EPILOG = """examples:
  asymml train                                    # vgg11_bn (width 0.25) on digits, asym mode, CPU
  asymml train --mode plain --epochs 5            # the same network, all on the accelerator
  asymml train --model resnet20 --dataset cifar10 --data-dir ~/data --device cuda --rank adaptive:0.1
  asymml train --epsilon 8                        # accounted: noised releases + DP-SGD on updates, one epsilon
  asymml train --device tcp://10.0.0.2:7777 --tls-cert c.pem --tls-key c.key --tls-ca ca.pem
  asymml train --out runs/a ... ; asymml train --resume runs/a   # continue a stopped or crashed run
checkpoints: at every epoch end, every --checkpoint-every-minutes (default 2) and --checkpoint-every-steps,
and on Ctrl-C; a lost accelerator ends with the exact --resume command.
outputs in OUT: summary.json (with "privacy": epsilon, delta, covers, notes), curves.png, checkpoint.pt,
model.pt (a plain state_dict), tensorboard/"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    from ..training.config import add_options

    p = sub.add_parser(
        "train", help="train a model split between the trusted context and the accelerator",
        description="Train a CNN with its low-rank part in the trusted context and the residual on the "
                    "accelerator (or in one of the baseline modes). Ctrl-C saves a checkpoint and exits.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..training import train
    from ..training.config import given_options

    result = train(given_options(args), getattr(args, "config", None))
    return 130 if result.status == "interrupted" else 0
