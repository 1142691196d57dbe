"""Running the report: one :class:`PrivacyRun` per mode and epsilon, the attacks, and the files it writes."""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from ...errors import ConfigError
from ..attacks.common import ATTACK_MODES, AttackMode, Calibration, build_split, calibrate
from ..attacks.gradient import DLGResult, capture_update, gradient_leakage_attack
from ..attacks.inversion import (
    JOINT,
    InversionResult,
    PhotoTask,
    capture_training_releases,
    inversion_attack,
    subspace_recovery,
)
from ..attacks.statistics import MI_ESTIMATOR, energy_ratios, mutual_information
from ..attacks.utility import DigitsTask, UtilityResult, train_utility
from .claims import NOTES, _num, claim_check
from .config import ReportConfig, _command, _config_dict
from .markdown import summary_markdown
from .plots import _figures, _grid_dlg, _grid_inversion, _plot

Log = Callable[[str], None]

# --------------------------------------------------------------------------- the run


def _first_hidden_release(task: PhotoTask) -> str | None:
    sm = build_split(task.make_model().train(), AttackMode("asym"), audit=True, rank=task.rank, seed=task.seed)
    with torch.no_grad():
        sm(task.x_public[:4])
    for r in sm.executor.ledger:
        if r.kind == "residual" and r.layer != "input":
            return r.layer
    return None


@torch.no_grad()
def _photo_energy(task: PhotoTask, mode: AttackMode, clips: dict[str, float] | None) -> dict[str, dict[str, float]]:
    if mode.split_mode == "plain":
        return {"input": {"rank": 0, "mean": 1.0, "max": 1.0}}
    sm = build_split(task.make_model().train(), mode, clips, audit=False, rank=task.rank, seed=task.seed)
    sm(task.x_private)
    return energy_ratios(sm.release_stats())


def _modes(cfg: ReportConfig, digits: DigitsTask) -> list[AttackMode]:
    out = []
    for name in ATTACK_MODES:
        if name not in cfg.modes:
            continue
        if name in ("noise-only", "asym+noise"):
            if cfg.sigmas:
                out.extend(digits.mode(name, sigma=s, delta=cfg.delta) for s in cfg.sigmas)
            else:
                out.extend(digits.mode(name, epsilon=e, delta=cfg.delta) for e in cfg.epsilons)
        else:
            out.append(AttackMode(name, delta=cfg.delta))
    return out


def _rounded(d: dict[str, Any], nd: int = 4) -> dict[str, Any]:
    return {k: _num(v, nd) if isinstance(v, float) else v for k, v in d.items()}


class PrivacyRun:
    """Data, tasks and calibrations shared by the attacks of one report (see :func:`run_report`)."""

    def __init__(self, cfg: ReportConfig, log: Log | None = None) -> None:
        cfg.validate()
        self.cfg = cfg
        self.say = log or (lambda s: None)
        self.say("preparing data and calibrating clip bounds on public data")
        self.digits = DigitsTask(replace(cfg.utility, noise_ratio=cfg.noise_ratio))
        self.modes = _modes(cfg, self.digits)
        self.photo = PhotoTask(public_per_image=cfg.public_per_image, private_per_image=cfg.private_per_image,
                               model=cfg.photo_model, width=cfg.utility.width, rank=cfg.utility.rank, seed=cfg.seed,
                               extra_public=cfg.extra_public)
        self.dlg_task = PhotoTask(patch_size=cfg.dlg_patch_size, public_per_image=16,
                                  private_per_image=cfg.private_per_image, model=cfg.dlg_model,
                                  width=cfg.utility.width, rank=cfg.utility.rank, seed=cfg.seed)
        first = _first_hidden_release(self.photo)
        self.layers = list(cfg.inversion_layers or ["input"] + ([first] if first else []))
        self.dlg_prior = self.dlg_task.x_public.mean(0, keepdim=True)
        gen = torch.Generator().manual_seed(cfg.seed)
        self.dlg_batches = {b: torch.randperm(len(self.dlg_task.x_private), generator=gen)[:b]
                            for b in cfg.dlg_batch_sizes}
        self._photo_cal: dict[str, Calibration] = {}
        self._dlg_cal: dict[str, Calibration] = {}
        self.span_u: dict[str, dict[str, float] | None] = {}
        self.input_rank = 1  # asymml.split's default input_rank (the attacks do not change it)

    # ---------------------------------------------------------------- per-mode pieces
    def clips(self, mode: AttackMode, task: str) -> dict[str, float] | None:
        """Clip bounds of ``mode`` on the ``"photo"`` or ``"dlg"`` model (None without noise)."""
        if not mode.noisy:
            return None
        t, cache = (self.photo, self._photo_cal) if task == "photo" else (self.dlg_task, self._dlg_cal)
        if mode.name not in cache:
            from ..attacks.common import PRIVATE_SPLIT_DEFAULTS

            n = min(128, getattr(t, "n_public_photos", len(t.x_public)))
            cache[mode.name] = calibrate(t.make_model(), mode, t.x_public[:n], t.y_public[:n], loss_fn=t.loss,
                                         split_kw={"rank": t.rank, **PRIVATE_SPLIT_DEFAULTS})
        return cache[mode.name].clips(mode.sigma, self.cfg.noise_ratio)

    def utility(self, mode: AttackMode) -> UtilityResult:
        self.say(f"[{mode.label}] sigma={mode.sigma:.4g}: training on digits")
        return train_utility(self.digits, mode)

    def inversion(self, mode: AttackMode, *, decoders: bool = True) -> tuple[dict[str, InversionResult],
                                                                            dict[str, dict[str, Any]]]:
        """Inversion results and MI estimates per attacked layer (``decoders=False``: MI only); with
        ``cfg.joint`` and several layers, also the joint attack (key :data:`JOINT`).  ``self.span_u`` gets
        the span(U) recovery of the input layer (split modes)."""
        # plain releases only the raw input (the accelerator computes every other activation from it)
        layers = ["input"] if mode.split_mode == "plain" else self.layers
        self.say(f"[{mode.label}] releases of layers {', '.join(layers)} during private training")
        cap = capture_training_releases(self.photo, mode, self.clips(mode, "photo"), layers)
        if not cap.private:
            raise ConfigError(f"mode {mode.label!r} releases none of the layers {', '.join(layers)}")
        inv: dict[str, InversionResult] = {}
        mi: dict[str, dict[str, Any]] = {}
        for layer in cap.private:
            if decoders:
                inv[layer] = inversion_attack(cap, layer, mode_name=mode.name, epochs=self.cfg.inversion_epochs,
                                              width=self.cfg.decoder_width, seed=self.cfg.seed)
            mi[layer] = mutual_information(cap.public_images, cap.public[layer], cap.private_images,
                                           cap.private[layer], seed=self.cfg.seed).as_dict()
        if decoders and self.cfg.joint and len(cap.private) > 1:
            inv[JOINT] = inversion_attack(cap, JOINT, mode_name=mode.name, epochs=self.cfg.inversion_epochs,
                                          width=self.cfg.decoder_width, seed=self.cfg.seed)
        self.span_u[mode.label] = None
        rel = cap.private.get("input")
        if mode.split_mode != "plain" and rel is not None and rel.shape == cap.private_images.shape:
            self.span_u[mode.label] = subspace_recovery(rel, cap.private_images, self.input_rank, seed=self.cfg.seed)
        return inv, mi

    def dlg(self, mode: AttackMode) -> dict[int, DLGResult]:
        """Gradient-leakage results per batch size (empty when no update is revealed)."""
        cfg, t = self.cfg, self.dlg_task
        self.say(f"[{mode.label}] gradient leakage (batch sizes {', '.join(map(str, cfg.dlg_batch_sizes))})")
        out: dict[int, DLGResult] = {}
        for b, idx in self.dlg_batches.items():
            dp = (cfg.utility.update_clip, mode.sigma) if mode.noisy and cfg.utility.dp_updates else None
            upd = capture_update(t.make_model(), mode, self.clips(mode, "dlg"), t.x_private[idx], t.y_private[idx],
                                 lr=cfg.dlg_step_lr, loss_fn=t.loss, probe=t.x_public[:2],
                                 split_kw={"rank": t.rank, "seed": cfg.seed}, dp_update=dp)
            if upd.grads:
                out[b] = gradient_leakage_attack(upd, iters=cfg.dlg_iters, num_classes=t.num_classes,
                                                 seed=cfg.seed, loss_fn=t.loss, prior=self.dlg_prior)
        return out

    def energy(self, mode: AttackMode) -> dict[str, dict[str, float]]:
        return _photo_energy(self.photo, mode, self.clips(mode, "photo"))


def run_report(cfg: ReportConfig, out_dir: str | Path, *, log: Log | None = None) -> dict[str, Any]:
    """Run every attack on every mode, write the report into ``out_dir`` and return ``privacy.json``'s data."""
    t_start = time.perf_counter()
    run = PrivacyRun(cfg, log)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    examples: dict[str, dict[str, Any]] = {}
    for mode in run.modes:
        t0 = time.perf_counter()
        util = run.utility(mode)
        t1 = time.perf_counter()
        inv, mi = run.inversion(mode)
        best = max(inv.values(), key=lambda r: r.psnr)
        best_n = max(inv.values(), key=lambda r: r.npsnr - r.baseline_npsnr)
        best_reid = max(inv.values(), key=lambda r: r.reid)
        span = run.span_u.get(mode.label)
        t2 = time.perf_counter()
        dlg = run.dlg(mode)
        t3 = time.perf_counter()
        b1 = min(dlg) if dlg else None
        row: dict[str, Any] = {
            "mode": mode.name,
            "label": mode.label,
            "split_mode": mode.split_mode,
            "sigma": _num(mode.sigma, 6),
            "epsilon": _num(util.epsilon),
            "epsilon_releases_only": _num(util.epsilon_releases_only),
            "epsilon_target": mode.epsilon,
            "delta": mode.delta,
            "test_accuracy": _num(util.test_accuracy),
            "test_accuracy_noiseless": _num(util.test_accuracy_noiseless),
            "inversion_psnr": _num(best.psnr, 3),
            "inversion_ssim": _num(best.ssim, 4),
            "inversion_layer": best.layer,
            "inversion_baseline_psnr": _num(best.baseline_psnr, 3),
            "inversion_baseline_ssim": _num(best.baseline_ssim, 4),
            "inversion_npsnr": _num(best_n.npsnr, 3),
            "inversion_nssim": _num(best_n.nssim, 4),
            "inversion_baseline_npsnr": _num(best_n.baseline_npsnr, 3),
            "inversion_npsnr_layer": best_n.layer,
            "reid_accuracy": _num(best_reid.reid, 4),
            "reid_top5": _num(best_reid.reid_top5, 4),
            "reid_chance": _num(best_reid.reid_chance, 5),
            "reid_layer": best_reid.layer,
            "joint": _rounded(inv[JOINT].as_dict()) if JOINT in inv else None,
            "span_u_cos": _num(span["cos"], 4) if span else None,
            "span_u_cos_random": _num(span["cos_random"], 4) if span else None,
            "covers": util.covers,
            "privacy_notes": util.notes,
            "inversion": {k: _rounded(r.as_dict()) for k, r in inv.items()},
            "dlg_psnr": _num(dlg[b1].psnr, 3) if b1 is not None else None,
            "dlg_ssim": _num(dlg[b1].ssim, 4) if b1 is not None else None,
            "dlg_baseline_psnr": _num(dlg[b1].baseline_psnr, 3) if b1 is not None else None,
            **{f"dlg_psnr_b{b}": (_num(dlg[b].psnr, 3) if b in dlg else None) for b in cfg.dlg_batch_sizes},
            "dlg": {str(b): _rounded(r.as_dict()) for b, r in dlg.items()},
            "dlg_revealed": dlg[b1].revealed if b1 is not None else [],
            "mi_nats": _num(mi["input"]["total"] if "input" in mi else next(iter(mi.values()))["total"])
            if mi else None,
            "mi": {k: {kk: vv for kk, vv in v.items() if kk != "estimator"} for k, v in mi.items()},
            "energy_ratio_photos": run.energy(mode),
            "energy_ratio_digits": util.release_energy,
            "releases_per_step": util.releases_per_step,
            "steps": util.steps,
            "sample_rate": _num(util.sample_rate, 6),
            "seconds": round(time.perf_counter() - t0, 1),
            "seconds_by_phase": {"utility": round(t1 - t0, 1), "inversion": round(t2 - t1, 1),
                                 "dlg": round(t3 - t2, 1)},
        }
        rows.append(row)
        examples[mode.label] = {"inversion": best, "dlg": dlg}
        run.say(f"[{mode.label}] acc={row['test_accuracy']} eps={row['epsilon']} covers={','.join(util.covers) or '-'} "
                f"inversion={row['inversion_psnr']} dB nPSNR={row['inversion_npsnr']} dB reid={row['reid_accuracy']} "
                f"dlg(b1)={row['dlg_psnr']} dB ({row['seconds']} s: {row['seconds_by_phase']})")

    data: dict[str, Any] = {
        "rows": rows,
        "claim": claim_check(rows),
        "config": _config_dict(cfg),
        "inversion_layers": run.layers,
        "mi_estimator": MI_ESTIMATOR,
        "notes": NOTES,
        "command": _command(cfg),
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "threads": torch.get_num_threads()},
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    (out / "privacy.json").write_text(json.dumps(data, indent=2, allow_nan=False))
    figures = _figures(rows)
    (out / "figures.json").write_text(json.dumps(figures, indent=2, allow_nan=False))
    _grid_inversion(examples, out / "grid_inversion.png")
    _grid_dlg(examples, out / "grid_dlg.png")
    _plot(figures, out / "privacy_utility.png")
    (out / "summary.md").write_text(summary_markdown(data))
    run.say(f"report written to {out} in {data['seconds']} s")
    return data


def run_attack(kind: str, cfg: ReportConfig, *, log: Log | None = None) -> dict[str, Any]:
    """One attack (``"inversion"``, ``"dlg"`` or ``"stats"``) on every configured mode; JSON-ready rows."""
    if kind not in ("inversion", "dlg", "stats"):
        raise ConfigError(f"unknown attack {kind!r}; choose inversion, dlg or stats")
    t_start = time.perf_counter()
    run = PrivacyRun(cfg, log)
    rows = []
    for mode in run.modes:
        row: dict[str, Any] = {"mode": mode.name, "label": mode.label, "sigma": _num(mode.sigma, 6),
                               "epsilon_target": mode.epsilon, "delta": mode.delta}
        if kind == "inversion":
            inv, mi = run.inversion(mode)
            best = max(inv.values(), key=lambda r: r.psnr)
            best_reid = max(inv.values(), key=lambda r: r.reid)
            span = run.span_u.get(mode.label)
            row.update(inversion_psnr=_num(best.psnr, 3), inversion_ssim=_num(best.ssim, 4),
                       inversion_layer=best.layer, inversion_baseline_psnr=_num(best.baseline_psnr, 3),
                       inversion_npsnr=_num(max(r.npsnr for r in inv.values()), 3),
                       inversion_baseline_npsnr=_num(best.baseline_npsnr, 3),
                       reid_accuracy=_num(best_reid.reid, 4), reid_chance=_num(best_reid.reid_chance, 5),
                       span_u_cos=_num(span["cos"], 4) if span else None,
                       inversion={k: _rounded(r.as_dict()) for k, r in inv.items()})
        elif kind == "dlg":
            dlg = run.dlg(mode)
            row.update({f"dlg_psnr_b{b}": _num(r.psnr, 3) for b, r in dlg.items()})
            row["dlg"] = {str(b): _rounded(r.as_dict()) for b, r in dlg.items()}
        else:
            _, mi = run.inversion(mode, decoders=False)
            row["mi"] = {k: {kk: vv for kk, vv in v.items() if kk != "estimator"} for k, v in mi.items()}
            row["mi_nats"] = _num(mi["input"]["total"]) if "input" in mi else None
            row["energy_ratio_photos"] = run.energy(mode)
        rows.append(row)
    return {"attack": kind, "rows": rows, "config": _config_dict(cfg), "inversion_layers": run.layers,
            "mi_estimator": MI_ESTIMATOR if kind == "stats" else None,
            "seconds": round(time.perf_counter() - t_start, 1)}
