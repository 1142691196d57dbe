"""``asymml privacy``: what the accelerator can learn -- reconstruction attacks, statistics, epsilon, plots.

    asymml privacy --out DIR                 # the full report (report is the default action); DP-SGD on the
                                             # updates makes it long (~10 min per noised run on one core)
    asymml privacy --out DIR --quick         # a short version
    asymml privacy inversion --modes plain,asym --epsilons 8
    asymml privacy dlg --modes plain,asym+noise --sigmas 2
    asymml privacy stats --out DIR
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

ACTIONS = ("report", "inversion", "dlg", "stats")


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _names(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "privacy", help="attack the release ledger (inversion, gradient leakage, statistics) and report",
        description="Run reconstruction attacks and statistics against the four modes (plain, noise-only at "
        "several epsilon, asym, asym+noise at the same epsilon) and measure digits test accuracy. "
        "'report' (default) writes privacy.json, figures.json, summary.md, image grids and a "
        "privacy-utility plot to --out.",
    )
    p.add_argument("action", nargs="?", choices=ACTIONS, default="report",
                   help="report (default): everything; or one attack: inversion | dlg | stats")
    p.add_argument("--out", metavar="DIR", help="output directory (required for report)")
    p.add_argument("--quick", action="store_true", help="a short version (one epsilon, short runs)")
    p.add_argument("--modes", type=_names, default=None,
                   help="comma-separated subset of plain,noise-only,asym,asym+noise (default: all)")
    p.add_argument("--epsilons", "--epsilon", type=_floats, default=None, metavar="E1,E2",
                   help="target epsilons for noise-only and asym+noise (default 1,8; --quick: 8)")
    p.add_argument("--sigmas", "--sigma", type=_floats, default=None, metavar="S1,S2",
                   help="noise multipliers instead of --epsilons (epsilon is then reported, not targeted)")
    p.add_argument("--delta", type=float, default=None, help="delta of (epsilon, delta)-DP (default 1e-5)")
    p.add_argument("--noise-ratio", type=float, default=None,
                   help="clip rule: noise norm at most this fraction of a typical activation (default 0.1)")
    p.add_argument("--epochs", type=int, default=None, help="digits training epochs (default 8; --quick: 6)")
    p.add_argument("--rank", default=None,
                   help="rank policy of the split modes: int, 'schedule' (default) or 'adaptive:TAU'")
    p.add_argument("--batch-size", type=int, default=None, help="digits training (expected) batch size (default 64)")
    p.add_argument("--dlg-iters", type=int, default=None, help="gradient-leakage optimisation steps")
    p.add_argument("--batch-sizes", type=_ints, default=None, help="DLG batch sizes (default 1,8)")
    p.add_argument("--inversion-epochs", type=int, default=None,
                   help="decoder refinement epochs after its closed-form linear fit (0: linear only)")
    p.add_argument("--layers", type=_names, default=None,
                   help="released layers to invert (default: input and the first hidden release)")
    p.add_argument("--public-per-image", type=int, default=None,
                   help="public photo patches per photo (attacker's training data)")
    p.add_argument("--private-per-image", type=int, default=None, help="private photo patches per photo")
    p.add_argument("--extra-public", type=int, default=None, metavar="N",
                   help="crops per extra offline image (greyscale photos, faces, digits) added to the attacker's public "
                        "set (default 32; --quick: 16; 0: the public photos only)")
    p.add_argument("--no-joint", action="store_true", help="skip the joint attack on all of a sample's releases")
    p.add_argument("--no-dp-updates", action="store_true",
                   help="do not clip and noise the updates (DP-SGD): epsilon then does not cover them (reported as such)")
    p.add_argument("--update-clip", type=float, default=None,
                   help="DP-SGD per-sample L2 bound of the trusted share of the gradient (default 1.0)")
    p.add_argument("--limit-train", type=int, default=None, metavar="N",
                   help="train the utility model on only N digits (quick checks)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1: the split runtime runs the accelerator in its own thread)")
    p.set_defaults(func=run)


def build_config(args: argparse.Namespace) -> Any:
    """The :class:`~asymml.privacy.report.ReportConfig` the options describe (validated)."""
    from ..errors import ConfigError
    from ..privacy.attacks.common import check_privacy_options
    from ..privacy.report import ReportConfig

    if args.epsilons is not None and args.sigmas is not None:
        raise ConfigError("conflicting options: --epsilons and --sigmas; give one (sigma is solved from epsilon)")
    for e in args.epsilons or ():
        check_privacy_options(epsilon=e)
    for s in args.sigmas or ():
        check_privacy_options(sigma=s)
    if args.delta is not None:
        check_privacy_options(delta=args.delta)
    if args.noise_ratio is not None:
        check_privacy_options(noise_ratio=args.noise_ratio)
    cfg = ReportConfig.quick_config() if args.quick else ReportConfig()
    kw: dict[str, Any] = {}
    if args.modes is not None:
        kw["modes"] = args.modes
    if args.sigmas is not None:
        kw["sigmas"], kw["epsilons"] = args.sigmas, ()
    elif args.epsilons is not None:
        kw["epsilons"] = args.epsilons
    for name in ("delta", "noise_ratio", "dlg_iters", "inversion_epochs", "seed", "public_per_image",
                 "private_per_image", "extra_public"):
        if getattr(args, name) is not None:
            kw[name] = getattr(args, name)
    if args.no_joint:
        kw["joint"] = False
    util: dict[str, Any] = {}
    if args.no_dp_updates:
        util["dp_updates"] = False
    if args.update_clip is not None:
        util["update_clip"] = args.update_clip
    if args.limit_train is not None:
        util["limit_train"] = args.limit_train
    if args.batch_sizes is not None:
        kw["dlg_batch_sizes"] = args.batch_sizes
    if args.layers is not None:
        kw["inversion_layers"] = args.layers
    if args.epochs is not None:
        kw["utility"] = replace(cfg.utility, epochs=args.epochs)
    if args.batch_size is not None:
        kw["utility"] = replace(kw.get("utility", cfg.utility), batch_size=args.batch_size)
    if args.rank is not None:
        from .. import parse_rank

        rank: Any = int(args.rank) if args.rank.strip().isdigit() else args.rank.strip()
        try:
            parse_rank(rank)
        except ValueError as e:
            raise ConfigError(f"--rank: {e}") from None
        kw["utility"] = replace(kw.get("utility", cfg.utility), rank=rank)
    if args.seed is not None:
        kw["utility"] = replace(kw.get("utility", cfg.utility), seed=args.seed)
    if util:
        kw["utility"] = replace(kw.get("utility", cfg.utility), **util)
    cfg = replace(cfg, **kw)
    cfg.validate()
    return cfg


def _log(msg: str) -> None:
    print(f"asymml privacy: {msg}", file=sys.stderr, flush=True)


def _table(rows: list[dict[str, Any]], keys: list[str]) -> str:
    keys = [k for k in keys if any(k in r for r in rows)]
    def cell(v: Any) -> str:
        if v is None:
            return "–"
        return ",".join(map(str, v)) or "–" if isinstance(v, list) else str(v)

    cells = [[cell(r.get(k)) for k in keys] for r in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    lines = ["  ".join(k.ljust(w) for k, w in zip(keys, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from ..errors import ConfigError

    if args.threads is not None:
        if args.threads < 1:
            raise ConfigError(f"--threads must be >= 1 (got {args.threads})")
    cfg = build_config(args)
    if args.action == "report" and not args.out:
        raise ConfigError("the report needs --out DIR")
    import torch

    torch.set_num_threads(args.threads)
    from ..privacy.report import run_attack, run_report

    if args.action == "report":
        data = run_report(cfg, args.out, log=_log)
        keys = ["label", "sigma", "epsilon", "covers", "test_accuracy", "inversion_psnr", "inversion_npsnr",
                "reid_accuracy", "span_u_cos"]
        keys += [k for k in data["rows"][0] if k.startswith("dlg_psnr_b")] if data["rows"] else []
        print(_table(data["rows"], keys + ["mi_nats"]))
        print(f"paper's claim {'holds' if data['claim']['holds'] else 'does not hold'} on this run; "
              f"see {Path(args.out) / 'summary.md'}")
        return 0
    data = run_attack(args.action, cfg, log=_log)
    keys = {"inversion": ["label", "sigma", "inversion_psnr", "inversion_ssim", "inversion_layer",
                          "inversion_baseline_psnr", "inversion_npsnr", "reid_accuracy", "span_u_cos"],
            "dlg": ["label", "sigma"] + [f"dlg_psnr_b{b}" for b in cfg.dlg_batch_sizes],
            "stats": ["label", "sigma", "mi_nats"]}[args.action]
    print(_table(data["rows"], keys))
    if args.action == "stats":
        for r in data["rows"]:
            e = ", ".join(f"{k}={v['mean']:.3f}" for k, v in r["energy_ratio_photos"].items())
            print(f"  {r['label']}: energy ratio {e}")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{args.action}.json").write_text(json.dumps(data, indent=2, allow_nan=False))
        print(f"wrote {out / (args.action + '.json')}")
    return 0
