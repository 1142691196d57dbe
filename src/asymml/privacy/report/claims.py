"""The claim check (does asym leak less than noise-only at the same epsilon and accuracy?) and the notes that
qualify every figure of the report."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


def _num(x: float | None, nd: int = 4) -> float | None:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return None
    return round(float(x), nd)


NOTES = [
    "epsilon: (epsilon, delta)-DP of one digits training sample over everything its row's `covers` lists -- "
    "forward residual releases (activations), protected-mode gradient-residual releases (gradients) and, with "
    "DP-SGD on the updates (the default), the per-sample clipped and noised trusted share of every update "
    "(updates); each a Gaussian mechanism (sensitivity = its clip), composed per step and over all steps with "
    "Opacus' RDP accountant, amplified by Poisson sampling drawn from the secure generator (sampling). "
    "None = infinite (no noise). A row whose covers lacks 'updates' reports only the releases' epsilon: the "
    "accelerator also sees the weight updates, which that figure does not cover.",
    "noise and Poisson masks: ChaCha20 under a 256-bit OS key (asymml.privacy.secure_rng): float64 Box-Muller "
    "noise rounded once into float32 releases; 4 draws summed for float64 releases (Opacus secure_mode); the key "
    "is never stored. Models use GroupNorm and noised "
    "modes split with per-sample bases and cold starts, so each release depends on one sample.",
    "inversion_npsnr / inversion_nssim: PSNR / SSIM after a per-image, per-channel affine fit of the reconstruction "
    "to the target (scale-invariant: brightness and colour a public decoder cannot know do not count); "
    "inversion_baseline_npsnr is a flat image of the right colours. reid_accuracy: fraction of private patches "
    "whose reconstruction correlates best with their own patch among all private patches (reid_chance = 1/N). "
    "'joint' attacks all of a sample's forward releases at once.",
    "clip rule (same in every mode): per layer, clip = min(median release norm, noise_ratio * median whole-"
    "activation norm / (sigma * sqrt(d))) on public calibration data, so the noise norm is at most noise_ratio "
    "of a typical activation. A whole-activation release (noise-only) has signal-to-noise at most "
    "1/(sigma*sqrt(d)) whatever the clip; asym keeps the low-rank part exact in the trusted context.",
    "The photo attacks (inversion, DLG) use the sigma solved for the digits run at that epsilon and the same clip "
    "rule, on photo models; their releases per step differ from the digits run.",
    "inversion_psnr: the best over the attacked layers of a decoder trained on public photos (skimage/sklearn "
    "photos disjoint from the private ones); inversion_baseline_psnr: guessing the mean public patch.",
    "dlg_psnr: batch size 1; dlg_psnr_b8: batch 8 (reconstruction matched to the batch by Hungarian assignment). "
    "The dummy batch starts from the mean public patch (the attacker's prior): a DLG PSNR near the mean-image "
    "baseline means the update told the attacker nothing it did not already know.",
    "test_accuracy: the split model as deployed (noise on at inference too); test_accuracy_noiseless: the trained "
    "weights evaluated without noise.",

]


# --------------------------------------------------------------------------- claim check


def _gain(psnr_db: float | None, baseline: float | None) -> float | None:
    """What an attack adds over its prior: ``max(0, PSNR - baseline PSNR)`` (an attacker whose
    reconstruction is worse than its prior keeps the prior)."""
    if psnr_db is None:
        return None
    return max(0.0, psnr_db - (baseline if baseline is not None else -math.inf))


def _attack_gains(r: dict[str, Any]) -> dict[str, float | None]:
    out = {"inversion": _gain(r.get("inversion_psnr"), r.get("inversion_baseline_psnr")),
           "inversion_npsnr": _gain(r.get("inversion_npsnr"), r.get("inversion_baseline_npsnr"))}
    for b, d in (r.get("dlg") or {}).items():
        out[f"dlg_b{b}"] = _gain(d.get("psnr"), d.get("baseline_psnr"))
    if not r.get("dlg"):
        for k in r:
            if k.startswith("dlg_psnr_b"):
                out[f"dlg_b{k[len('dlg_psnr_b'):]}"] = _gain(r[k], r.get("dlg_baseline_psnr"))
    return out


def claim_check(rows: Sequence[dict[str, Any]], *, acc_tol: float = 0.05, acc_gap: float = 0.10,
                psnr_tol: float = 1.0, reid_tol: float = 0.05) -> dict[str, Any]:
    """Does the paper's claim hold on these rows?

    Per epsilon: (a) asym+noise accuracy within ``acc_tol`` of the noise-free model (asym without noise);
    (b) noise-only loses at least ``acc_gap`` more accuracy than asym+noise; (c) attacks on asym+noise do
    no better than on noise-only: for the inversion (plain and normalised PSNR) and each DLG batch size,
    the attack's gain over its prior (``max(0, PSNR - baseline PSNR)``) is at most ``psnr_tol`` dB above
    noise-only's, and re-identification accuracy at most ``reid_tol`` above noise-only's.
    """
    by = {(r["mode"], r["epsilon_target"]): r for r in rows}
    ref = by.get(("asym", None)) or by.get(("plain", None))
    eps_list = sorted({r["epsilon_target"] for r in rows if r["epsilon_target"] is not None})
    per_eps = []
    for e in eps_list:
        a, n = by.get(("asym+noise", e)), by.get(("noise-only", e))
        if a is None or n is None or ref is None:
            continue
        acc_ref = ref["test_accuracy"]
        c_a = a["test_accuracy"] >= acc_ref - acc_tol
        c_b = n["test_accuracy"] <= a["test_accuracy"] - acc_gap
        ga, gn = _attack_gains(a), _attack_gains(n)
        worse = {k: (ga[k], gn.get(k)) for k in ga
                 if ga[k] is not None and gn.get(k) is not None and ga[k] > gn[k] + psnr_tol}
        ra, rn = a.get("reid_accuracy"), n.get("reid_accuracy")
        reid_ok = ra is None or rn is None or ra <= rn + reid_tol
        inv_ok = "inversion" not in worse and "inversion_npsnr" not in worse and reid_ok
        dlg_ok = not any(k.startswith("dlg") for k in worse)
        per_eps.append({
            "epsilon": e, "accuracy_noise_free": acc_ref, "accuracy_asym_noise": a["test_accuracy"],
            "accuracy_noise_only": n["test_accuracy"], "asym_keeps_accuracy": c_a,
            "noise_only_loses_more": c_b, "attack_gain_db_asym_noise": ga, "attack_gain_db_noise_only": gn,
            "reid_asym_noise": ra, "reid_noise_only": rn, "reid_no_better_than_noise_only": reid_ok,
            "covers_asym_noise": a.get("covers"), "covers_noise_only": n.get("covers"),
            "inversion_no_better_than_noise_only": inv_ok, "dlg_no_better_than_noise_only": dlg_ok,
            "holds": bool(c_a and c_b and inv_ok and dlg_ok),
        })
    plain = by.get(("plain", None))
    return {
        "holds": bool(per_eps) and all(p["holds"] for p in per_eps),
        "per_epsilon": per_eps,
        "attack_works_on_plain": None if plain is None else {
            "inversion_psnr": plain["inversion_psnr"], "dlg_psnr": plain["dlg_psnr"],
            "inversion_above_baseline_db": _num(plain["inversion_psnr"] - plain["inversion_baseline_psnr"], 2)},
        "criteria": {"acc_tol": acc_tol, "acc_gap": acc_gap, "psnr_tol_db": psnr_tol, "reid_tol": reid_tol,
                     "attack_gain": "max(0, PSNR - PSNR of the attacker's prior, the mean public patch)"},
    }
