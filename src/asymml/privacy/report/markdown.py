"""The report's ``summary.md``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

# --------------------------------------------------------------------------- markdown


def _fmt(v: Any, nd: int = 2) -> str:
    if v is None:
        return "∞" if nd == -1 else "–"
    if isinstance(v, float):
        return f"{v:.{max(nd, 0)}f}"
    return str(v)


def span_u_sentence(rows: Sequence[dict[str, Any]]) -> str:
    """One paragraph, from the measured rows, on how well the accelerator recovers ``span(U)``."""
    measured = [r for r in rows if r.get("span_u_cos") is not None]
    if not measured:
        return "span(U) recovery was not measured (no split mode released the input layer)."
    parts = [f"{r['label']}: mean |cos| of the principal angles {r['span_u_cos']:.3f} (random guess "
             f"{r['span_u_cos_random']:.3f})" for r in measured]
    clean = [r for r in measured if r["mode"] == "asym"]
    msg = ("Without noise the released input residual is R = (I - UU^T)X, so U^T R = 0 and the accelerator reads "
           "each private image's trusted basis span(U) off the null space of R R^T. Measured against the top "
           "singular subspace of each private patch: " + "; ".join(parts) + ". ")
    if clean and clean[0]["span_u_cos"] > 0.9:
        msg += ("At the input U (rank 1) is each image's dominant colour axis: the accelerator learns every private "
                "image's colour palette exactly and, with R, everything but the one intensity map V along that axis, "
                "which is what stays trusted. ")
    noisy = [r for r in measured if r["mode"] == "asym+noise"]
    if noisy:
        near = all(r["span_u_cos"] <= r["span_u_cos_random"] + 0.1 for r in noisy)
        msg += ("With noise on the releases the estimate is " + ("no better than a random guess" if near else
                "still better than a random guess") + ".")
    return msg


def summary_markdown(data: dict[str, Any]) -> str:
    """The report's ``summary.md``."""
    rows = data["rows"]
    sizes = sorted({int(k[len("dlg_psnr_b"):]) for r in rows for k in r if k.startswith("dlg_psnr_b")})
    head = ["mode", "σ", "ε", "covers", "test acc", "inv. PSNR (dB)", "inv. SSIM", "inv. layer", "inv. nPSNR (dB)",
            "re-id", "span(U) cos"]
    head += [f"DLG PSNR B={b}" for b in sizes] + ["MI (nats)"]
    lines = ["# asymml privacy report", "",
             f"Regenerate: `{data['command']}` ({data['seconds']} s here).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        eps = "∞" if r["epsilon"] is None else f"{r['epsilon']:.3g}"
        cells = [r["mode"], f"{r['sigma']:.3g}", eps, ", ".join(r.get("covers") or []) or "–",
                 _fmt(r["test_accuracy"], 3), _fmt(r["inversion_psnr"], 1), _fmt(r["inversion_ssim"], 3),
                 str(r["inversion_layer"]), _fmt(r.get("inversion_npsnr"), 1), _fmt(r.get("reid_accuracy"), 3),
                 _fmt(r.get("span_u_cos"), 3)]
        cells += [_fmt(r.get(f"dlg_psnr_b{b}"), 1) for b in sizes] + [_fmt(r["mi_nats"], 3)]
        lines.append("| " + " | ".join(cells) + " |")
    if rows:
        lines += ["", f"Inversion baseline (guess the mean public patch): {rows[0]['inversion_baseline_psnr']:.1f} dB "
                  f"PSNR, SSIM {rows[0]['inversion_baseline_ssim']:.3f}; normalised PSNR of a flat image of the right "
                  f"colours: {_fmt(rows[0].get('inversion_baseline_npsnr'), 1)} dB; re-identification chance: "
                  f"{_fmt(rows[0].get('reid_chance'), 4)}."]
    lines += ["", "## What the residual's null space reveals: span(U)", "", span_u_sentence(rows)]
    c = data["claim"]
    lines += ["", "## The paper's claim", "",
              "At equal ε, asym keeps accuracy near the noise-free model while noise-only loses much more, and attacks "
              "on asym do no better than on noise-only.", "",
              f"**Verdict on this run: {'holds' if c['holds'] else 'does not hold'}.**", ""]
    for p in c["per_epsilon"]:
        lines.append(
            f"- ε={p['epsilon']:g}: accuracy noise-free {p['accuracy_noise_free']:.3f}, asym+noise "
            f"{p['accuracy_asym_noise']:.3f} ({'kept' if p['asym_keeps_accuracy'] else 'NOT kept'}), noise-only "
            f"{p['accuracy_noise_only']:.3f} ({'loses more' if p['noise_only_loses_more'] else 'does NOT lose more'}); "
            f"covers {', '.join(p.get('covers_asym_noise') or []) or '–'}; "
            f"inversion on asym+noise {'no better' if p['inversion_no_better_than_noise_only'] else 'BETTER'} and "
            f"DLG {'no better' if p['dlg_no_better_than_noise_only'] else 'BETTER'} than on noise-only."
        )
    cr = c["criteria"]
    lines += ["", f"Criteria: kept = within {cr['acc_tol']:.2f} of asym without noise; loses more = at least "
              f"{cr['acc_gap']:.2f} below asym+noise; no better = the attack's gain over its prior (PSNR minus the "
              f"mean-public-patch PSNR, floored at 0; likewise for normalised PSNR) at most {cr['psnr_tol_db']:.1f} dB "
              f"above noise-only's, and re-identification at most {cr.get('reid_tol', 0.05):.2f} above noise-only's.", ""]
    if c.get("attack_works_on_plain"):
        p = c["attack_works_on_plain"]
        lines.append(f"Sanity: against plain the inversion reaches {p['inversion_psnr']:.1f} dB "
                     f"({p['inversion_above_baseline_db']:+.1f} dB over the baseline) and DLG {_fmt(p['dlg_psnr'], 1)} dB.")
    lines += ["", "## Gradient leakage and what ε covers", ""]
    for r in rows:
        noised = "updates" in (r.get("covers") or [])
        lines.append(f"- {r['label']}: the update of {len(r['dlg_revealed'])} parameter tensors is revealed"
                     + (f" ({', '.join(r['dlg_revealed'][:6])}{', …' if len(r['dlg_revealed']) > 6 else ''})"
                        if r["dlg_revealed"] else "")
                     + ("; DP-SGD noised, covered by ε" if noised else "; not noised, NOT covered by ε"))
    lines += ["", "## Residual energy ‖R‖²/‖X‖² (photos, mean per layer)", ""]
    for r in rows:
        e = ", ".join(f"{k}: {v['mean']:.3f}" for k, v in r["energy_ratio_photos"].items() if not k.endswith(":grad"))
        lines.append(f"- {r['label']}: {e}")
    lines += ["", "## Mutual information estimator", "", data["mi_estimator"], "", "## Notes", ""]
    lines += [f"- {n}" for n in data["notes"]]
    lines += ["", "Files: privacy.json, figures.json, grid_inversion.png, grid_dlg.png, privacy_utility.png.", ""]
    return "\n".join(lines)
