"""``asymml bench``: plain, trusted-only, asym (both backward modes) and noise-only side by side.

Example: ``asymml bench --model vgg16 --input-size 224 --batch-size 32 --json out.json``
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from ..options import add_arguments


def _csv(kind: type = str):
    def parse(s: str) -> list[Any]:
        try:
            return [kind(v.strip()) for v in s.split(",") if v.strip()]
        except ValueError:
            msg = f"expected a comma-separated list of {kind.__name__}, got {s!r}"
            raise argparse.ArgumentTypeError(msg) from None

    return parse


def _flat(xs: list[list[Any]] | None, default: list[Any]) -> list[Any]:
    if not xs:
        return default
    return [v for x in xs for v in x]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench", help="benchmark plain / trusted-only / asym / noise-only side by side",
        description="Measure every execution mode in one process, interleaved, with warm-up and repeats: "
                    "trusted-side time, accelerator time, end-to-end step time, trusted FLOPs, trusted peak "
                    "memory vs the EPC budget, bytes released per step, and the derived speed-ups. Writes a "
                    "JSON file, a markdown table (stdout) and a PNG chart.",
    )
    g = p.add_argument_group("what to measure")
    g.add_argument("--model", action="append", type=_csv(), metavar="NAME[,NAME…]",
                   help="model(s): CIFAR-style (vgg11…19[_bn], resnet20/32/56…) or torchvision names "
                        "(resnet18…); from 128 px on, vgg names mean torchvision's ImageNet VGG; "
                        "force with cifar:NAME / tv:NAME [default: resnet20]")
    g.add_argument("--input-size", action="append", type=_csv(int), metavar="PX[,PX…]",
                   help="square input size(s) [default: 32]")
    g.add_argument("--batch-size", action="append", type=_csv(int), metavar="B[,B…]",
                   help="batch size(s) [default: 32]")
    g.add_argument("--phase", choices=("train", "infer", "both"), default="both", help="[default: both]")
    g.add_argument("--modes", type=_csv(), default=["plain", "trusted-only", "asym", "noise-only"],
                   help="modes to run, comma-separated [default: all four]")
    g.add_argument("--backward", type=_csv(), default=["protected", "paper"],
                   help="backward mode(s) of asym in training [default: protected,paper]")
    g.add_argument("--num-classes", type=int, default=None,
                   help="default: 10 (CIFAR-style), 1000 (torchvision)")
    g.add_argument("--width", type=float, default=1.0, help="channel width multiplier of CIFAR-style models [default: 1]")
    g.add_argument("--optimizer-step", action=argparse.BooleanOptionalAction, default=True,
                   help="include an SGD step in each training step [default: on]")
    s = p.add_argument_group("split settings")
    # defined once in asymml.options.SplitOptions (--warm-start/--no-warm-start, ...)
    add_arguments(s, include=("rank", "decomposition", "iters", "basis", "input_rank", "grad_rank", "warm_start",
                         "micro_batch", "verify_sample"))
    s.add_argument("--noise-sigma", type=float, default=1.0, help="noise multiplier of the noise-only mode [default: 1]")
    s.add_argument("--asym-sigma", type=float, default=None,
                   help="also noise asym's releases (default: no noise)")
    s.add_argument("--clip", type=float, default=1.0, help="per-sample clip bound of noised releases [default: 1]")
    s.add_argument("--placement", default=None, choices=("auto", "split", "trusted"),
                   help="where layers run in asym / noise-only: auto (the runtime's cost model), split (every "
                        "splittable layer), trusted [default: the runtime's default]")
    s.add_argument("--verify", action="store_true",
                   help="add an asym instance with the runtime's accelerator-result verification on (skipped "
                        "with a note if the runtime has none)")
    s.add_argument("--noise", type=float, default=None, metavar="SIGMA",
                   help="add an asym instance whose releases carry Gaussian noise of this sigma, beside noise off")
    m = p.add_argument_group("measurement")
    m.add_argument("--repeats", type=int, default=5,
                   help="timed steps of the context modes (plain, noise-only) and the minimum number of rounds "
                        "[default: 5]")
    m.add_argument("--rounds", type=int, default=None,
                   help="paired rounds (trusted-only and asym, shuffled per round; speed-up = median of per-round "
                        "ratios with a bootstrap 95%% interval) [default: max(15, repeats), more for small models "
                        "while a phase's paired steps fit in 20 s]")
    m.add_argument("--warmup", type=int, default=4,
                   help="un-timed steps per mode first; the default covers the cost-aware planner's longest "
                        "trial, so timed steps run its final per-layer decisions [default: 4]")
    m.add_argument("--device", default="auto",
                   help="accelerator device: auto (cuda if present), cpu, cuda[:N] [default: auto]")
    m.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default: torch's default)")
    m.add_argument("--speed-ratio", type=float, default=10.0,
                   help="accelerator-to-TEE speed ratio of the projected speed-up [default: 10]")
    m.add_argument("--epc-mib", type=float, default=128, help="trusted memory budget (EPC), MiB [default: 128]")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--nproc-per-node", type=int, default=None, metavar="N",
                   help="instead of the modes: data-parallel training throughput for 1 and N ranks (short asymml "
                        "train runs on digits, torchrun on loopback, --threads per rank, default 1) and the "
                        "trusted-side time of the gradient all-reduce per step; --model (default vgg11_bn), "
                        "--batch-size (per rank, default 64), --input-size, --repeats (steps, default 5), --device")
    m.add_argument("--layers", action="store_true",
                   help="add per-layer profiles of the split modes to the JSON")
    m.add_argument("--serialize", action=argparse.BooleanOptionalAction, default=None,
                   help="run each accelerator job only when the trusted side waits for it: no overlap, so "
                        "per-side times are free of CPU contention; step = sum [default: on with a CPU "
                        "accelerator, off otherwise]")
    m.add_argument("--calibration", default=None, metavar="FILE",
                   help="reuse the roofline calibration of an earlier bench JSON (environment."
                        "roofline_calibration) instead of measuring it")
    m.add_argument("--sgx-weights-in-epc", action="store_true",
                   help="SGX1 projection: keep parameters inside the EPC (default: public, outside)")
    m.add_argument("--attribute", action="store_true",
                   help="profile one extra step per mode and split its trusted time by engine function and op kind")
    m.add_argument("--sweep", default=None, metavar="PARAM=V1,V2,…",
                   help="scaling sweep over batch, input or rank (log-log plot and growth exponents)")
    o = p.add_argument_group("output")
    o.add_argument("--json", default=None, metavar="FILE", help="write the full results as JSON")
    o.add_argument("--markdown", default=None, metavar="FILE",
                   help="also write the markdown tables to FILE [default: next to --json]")
    o.add_argument("--plot", default=None, metavar="FILE",
                   help="PNG chart [default: next to --json, else asymml-bench.png]; 'none' to skip")
    o.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.set_defaults(func=run)


def _config(args: argparse.Namespace):
    from ..bench import BenchConfig

    phases = ("train", "infer") if args.phase == "both" else (args.phase,)
    return BenchConfig(
        models=_flat(args.model, ["resnet20"]), input_sizes=_flat(args.input_size, [32]),
        batch_sizes=_flat(args.batch_size, [32]), phases=phases, modes=tuple(args.modes),
        backwards=tuple(args.backward), rank=args.rank, decomposition=args.decomposition, iters=args.iters,
        basis=args.basis, input_rank=args.input_rank, grad_rank=args.grad_rank, warm_start=args.warm_start,
        micro_batch=args.micro_batch, verify_sample=args.verify_sample,
        repeats=args.repeats, warmup=args.warmup, device=args.device, speed_ratio=args.speed_ratio,
        noise_sigma=args.noise_sigma, clip=args.clip, asym_sigma=args.asym_sigma,
        epc_bytes=int(args.epc_mib * 2**20), num_classes=args.num_classes, width=args.width,
        optimizer_step=args.optimizer_step, seed=args.seed, layers=args.layers,
        attribute=args.attribute, serialize=args.serialize, rounds=args.rounds, verify=args.verify,
        noise=args.noise, calibration=_calibration(args.calibration),
        sgx_weights_in_epc=args.sgx_weights_in_epc, placement=args.placement,
    )


def _calibration(path: str | None) -> dict[str, Any] | None:
    """The roofline calibration stored in an earlier bench JSON (or a bare calibration object)."""
    from ..errors import ConfigError

    if path is None:
        return None
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read a calibration from {path!r}: {e}") from None
    cal = data.get("environment", {}).get("roofline_calibration", data) if isinstance(data, dict) else None
    if not isinstance(cal, dict) or not {"conv_gflops", "mem_gbps"} <= set(cal):
        raise ConfigError(f"{path!r} holds no roofline calibration (conv_gflops, mem_gbps)")
    return cal


def _run_distributed(args: argparse.Namespace, log: Any) -> int:
    """``--nproc-per-node N``: see :mod:`asymml.bench.distributed`."""
    from ..bench.distributed import markdown_distributed, run_distributed_bench

    dev = "cpu" if args.device == "auto" else args.device
    result = run_distributed_bench(
        args.nproc_per_node, model=_flat(args.model, ["vgg11_bn"])[0], batch_size=_flat(args.batch_size, [64])[0],
        image_size=_flat(args.input_size, [None])[0], steps=max(2, args.repeats),
        device=dev, threads=args.threads or 1, log=log)
    sys.stdout.write(markdown_distributed(result))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1, default=float))
        print(f"\nwrote {args.json}", file=sys.stderr)
    return 0


def run(args: argparse.Namespace) -> int:
    import torch

    from ..bench import markdown, parse_sweep, plot_chart, plot_sweep, run_bench, run_sweep

    if args.threads is not None:
        if args.threads < 1:
            raise ValueError("--threads must be ≥ 1")
        torch.set_num_threads(args.threads)
    log = (lambda s: None) if args.quiet else None
    if args.nproc_per_node is not None:
        return _run_distributed(args, log)
    cfg = _config(args)
    cfg.validate()
    if args.sweep:
        param, values = parse_sweep(args.sweep)
        result = run_sweep(cfg, param, values, log)
    else:
        result = run_bench(cfg, log)
    table = markdown(result)
    sys.stdout.write(table)
    stem = os.path.splitext(args.json)[0] if args.json else None
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1, default=float)
        print(f"\nwrote {args.json}", file=sys.stderr)
    md = args.markdown or (f"{stem}.md" if stem else None)
    if md:
        Path(md).write_text(table)
        print(f"wrote {md}", file=sys.stderr)
    plot = args.plot or (f"{stem}.png" if stem else "asymml-bench.png")
    if plot.lower() != "none":
        plot_chart(result, plot)
        print(f"wrote {plot}", file=sys.stderr)
        if "sweep" in result:
            sp = os.path.splitext(plot)[0] + "-sweep.png"
            plot_sweep(result, sp)
            print(f"wrote {sp}", file=sys.stderr)
    return 0
