"""The report's figures: the data behind them and the PNG grids and curves."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

from ..attacks.inversion import (
    InversionResult,
)

# --------------------------------------------------------------------------- figures


def _figures(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    series: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        series.setdefault(r["mode"], []).append({
            "epsilon": r["epsilon"], "epsilon_target": r["epsilon_target"], "sigma": r["sigma"],
            "test_accuracy": r["test_accuracy"], "inversion_psnr": r["inversion_psnr"],
            "inversion_ssim": r["inversion_ssim"], "dlg_psnr": r["dlg_psnr"],
            **{k: r[k] for k in r if k.startswith("dlg_psnr_b")}, "mi_nats": r["mi_nats"],
        })
    return {
        "series": series,
        "energy_ratio_photos": {r["label"]: r["energy_ratio_photos"] for r in rows},
        "energy_ratio_digits": {r["label"]: r["energy_ratio_digits"] for r in rows},
        "mutual_information": {r["label"]: r["mi"] for r in rows},
        "inversion_baseline_psnr": rows[0]["inversion_baseline_psnr"] if rows else None,
    }


def _to_img(t: Tensor) -> Any:
    return t.detach().float().clamp(0, 1).permute(1, 2, 0).numpy()


def _grid_inversion(examples: dict[str, dict[str, Any]], path: Path, n: int = 4) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(examples)
    fig, axes = plt.subplots(len(labels), 3 * n, figsize=(1.2 * 3 * n, 1.35 * len(labels) + 0.4), squeeze=False)
    for i, lab in enumerate(labels):
        r: InversionResult = examples[lab]["inversion"]
        for j in range(n):
            for k, (img, name) in enumerate(((r.originals, "original"), (r.seen, "accelerator saw"),
                                             (r.reconstructions, "reconstruction"))):
                ax = axes[i, 3 * j + k]
                if j < len(img):
                    ax.imshow(_to_img(img[j]), interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                if i == 0:
                    ax.set_title(name, fontsize=6)
        axes[i, 0].set_ylabel(f"{lab}\n{r.layer}\n{r.psnr:.1f} dB", fontsize=6)
    fig.suptitle("Inversion attack on private photos: original | what the accelerator saw | best reconstruction",
                 fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _grid_dlg(examples: dict[str, dict[str, Any]], path: Path, n: int = 4) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [lab for lab in examples if examples[lab]["dlg"]]
    if not labels:
        return
    sizes = sorted({b for lab in labels for b in examples[lab]["dlg"]})
    cols = sum(2 * min(n, b) for b in sizes)
    fig, axes = plt.subplots(len(labels), cols, figsize=(1.1 * cols, 1.35 * len(labels) + 0.4), squeeze=False)
    for i, lab in enumerate(labels):
        c = 0
        for b in sizes:
            r = examples[lab]["dlg"].get(b)
            for j in range(min(n, b)):
                for img, name in ((None if r is None else r.originals, f"B={b} original"),
                                  (None if r is None else r.reconstructions, f"B={b} reconstruction")):
                    ax = axes[i, c]
                    if img is not None:
                        ax.imshow(_to_img(img[j]), interpolation="nearest")
                    ax.set_xticks([])
                    ax.set_yticks([])
                    if i == 0:
                        ax.set_title(name, fontsize=5)
                    c += 1
        first = examples[lab]["dlg"].get(sizes[0])
        axes[i, 0].set_ylabel(f"{lab}\n{first.psnr:.1f} dB" if first else lab, fontsize=6)
    fig.suptitle("Gradient leakage from the public per-step weight update: original | reconstruction", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot(fig_data: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = fig_data["series"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    colors = {"plain": "black", "asym": "tab:blue", "asym+noise": "tab:green", "noise-only": "tab:red"}
    for mode in ("asym+noise", "noise-only"):
        pts = sorted((p["epsilon_target"], p["test_accuracy"]) for p in series.get(mode, []))
        if pts:
            a1.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=colors[mode], label=mode)
    for mode, style in (("plain", ":"), ("asym", "--")):
        for p in series.get(mode, []):
            a1.axhline(p["test_accuracy"], ls=style, color=colors[mode], label=f"{mode} (no noise)")
    a1.set_xscale("log")
    a1.set_xlabel("ε (digits training run, δ fixed)")
    a1.set_ylabel("test accuracy (digits)")
    a1.set_ylim(0, 1.02)
    a1.set_title("utility vs privacy budget")
    a1.legend(fontsize=7)
    for mode, pts in series.items():
        xs = [p["inversion_psnr"] for p in pts]
        ys = [p["test_accuracy"] for p in pts]
        a2.scatter(xs, ys, color=colors.get(mode, "gray"), marker="o", label=f"{mode} (inversion)")
        xd = [p["dlg_psnr"] for p in pts if p["dlg_psnr"] is not None]
        yd = [p["test_accuracy"] for p in pts if p["dlg_psnr"] is not None]
        a2.scatter(xd, yd, color=colors.get(mode, "gray"), marker="x", label=f"{mode} (DLG, B=1)")
        for p in pts:
            if p["epsilon_target"] is not None:
                a2.annotate(f"ε={p['epsilon_target']:g}", (p["inversion_psnr"], p["test_accuracy"]), fontsize=6)
    base = fig_data.get("inversion_baseline_psnr")
    if base is not None:
        a2.axvline(base, ls=":", color="gray", label="mean-image guess")
    a2.set_xlabel("attack PSNR on private photos (dB, higher = more leakage)")
    a2.set_ylabel("test accuracy (digits)")
    a2.set_ylim(0, 1.02)
    a2.set_title("utility vs attack success")
    a2.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
