"""``asymml train``: train a model split between the trusted context and the accelerator.

With no options it trains a narrow CIFAR-style VGG on scikit-learn's digits in ``asym`` mode on the CPU.
Every option may also come from a YAML/TOML file (``--config``); see :mod:`asymml.training.config`.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
from typing import Any

EPILOG = """examples:
  asymml train                                    # vgg11_bn (width 0.25) on digits, asym mode, CPU
  asymml train --mode plain --epochs 5            # the same network, all on the accelerator
  asymml train --model resnet20 --dataset cifar10 --data-dir ~/data --device cuda --rank adaptive:0.1
  asymml train --epsilon 8                        # accounted: noised releases + DP-SGD on updates, one epsilon
  asymml train --device tcp://10.0.0.2:7777 --tls-cert c.pem --tls-key c.key --tls-ca ca.pem
  asymml train --out runs/a ... ; asymml train --resume runs/a   # continue a stopped or crashed run
checkpoints: at every epoch end, every --checkpoint-every-minutes (default 2) and --checkpoint-every-steps,
and on Ctrl-C; a lost accelerator ends with the exact --resume command.
data parallel (one model over N trusted contexts, each with its own accelerator; gloo all-reduce of the
gradients before every optimizer step; --batch-size is per rank; rank 0 writes the outputs):
  asymml train --nproc-per-node 2                 # one host: launches torchrun on a loopback rendezvous
  torchrun --nproc-per-node 2 -m asymml train ... # the same, or multi-host with torchrun's --nnodes/--rdzv-*
  asymml train --nproc-per-node 2 --device tcp://gpu{rank}:7777 ...   # one accelerator server per rank
  the ranks exchange unnoised gradient shares: a non-loopback MASTER_ADDR is refused unless gloo runs over
  TLS (--dist-tls, PyTorch built with USE_GLOO_WITH_OPENSSL=1) or you pass --trusted-interconnect for a
  network you protect yourself (VPN, IPsec, WireGuard); a dead or hung rank stops every rank within
  --dist-timeout seconds (default 60) with the --resume command, which needs the same N.
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
    p.add_argument("--nproc-per-node", type=_positive, default=None, metavar="N",
                   help="train data parallel over N processes (trusted contexts) on this host: runs torchrun on "
                        "a loopback rendezvous and exits with its status (default: 1, no torchrun)")
    p.set_defaults(func=run)


def _positive(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return n


def run(args: argparse.Namespace) -> int:
    from ..training import train
    from ..training.config import given_options

    nproc = getattr(args, "nproc_per_node", None)
    if nproc is not None and "LOCAL_RANK" not in os.environ:
        return launch(nproc, forward_argv(args))
    result = train(given_options(args), getattr(args, "config", None))
    return 130 if result.status == "interrupted" else 0


def forward_argv(args: argparse.Namespace) -> list[str]:
    """The ``asymml train`` arguments of ``args`` (as parsed) for each rank, without ``--nproc-per-node``."""
    from ..training.config import given_options

    out: list[str] = []
    if getattr(args, "config", None) is not None:
        out += ["--config", str(args.config)]
    bare_resume = False
    for name, value in given_options(args).items():
        opt = "--" + name.replace("_", "-")
        if name == "resume" and value == "":
            bare_resume = True
        elif isinstance(value, bool):
            out.append(opt if value else "--no-" + opt[2:])
        else:
            out.append(f"{opt}={_text(value)}")
    return out + (["--resume"] if bare_resume else [])


def _text(value: Any) -> str:
    return "none" if value is None else str(value)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(nproc: int, argv: list[str]) -> int:
    """Run ``torchrun --nproc-per-node nproc -m asymml train ARGV`` on a loopback rendezvous (a free port);
    return its exit status (non-zero when any rank failed: torchrun then stops the others)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--nnodes", "1",
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), "-m", "asymml", "train", *argv]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")  # torchrun's own default for several ranks, without its warning
    proc = subprocess.Popen(cmd, env=env)
    while True:
        try:
            return int(proc.wait())
        except KeyboardInterrupt:  # Ctrl-C reached the ranks too: they save a checkpoint and stop together
            continue
