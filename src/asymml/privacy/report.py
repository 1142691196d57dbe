"""``asymml privacy`` report: utility (digits test accuracy) and attacks (inversion, gradient leakage,
statistics) for the four modes -- plain, noise-only at several epsilon, asym, asym+noise at the same
epsilon -- written to a directory:

* ``privacy.json``  -- ``rows`` (one per mode and epsilon: ``mode, sigma, epsilon, delta, test_accuracy,
  inversion_psnr, inversion_ssim, dlg_psnr`` and more), the configuration, the claim check, notes;
* ``figures.json``  -- the data behind every plot;
* ``summary.md``    -- the table, the verdict on the paper's claim, what epsilon composes, caveats;
* ``grid_inversion.png`` / ``grid_dlg.png`` -- original | what the accelerator saw | best reconstruction;
* ``privacy_utility.png`` -- test accuracy vs epsilon and vs attack PSNR, asym against noise-only.

How epsilon is set: for each mode and target epsilon, one noise multiplier sigma is planned
(:func:`~asymml.privacy.accounting.plan_sigma`, Opacus RDP) for the digits training run -- every Gaussian a
sample goes through in a step (forward residuals, protected-mode gradient residuals and, with DP-SGD on the
updates, the clipped and noised trusted share of the update) composed over all steps, under Poisson sampling
from the secure generator.  Each row's ``covers`` lists what its epsilon accounts for
(:class:`~asymml.privacy.accounting.PrivacyLedger`).  The photo attacks use the same sigma and clip rule.

Leakage measures that can fail: besides PSNR/SSIM, normalised PSNR/SSIM (per-image affine fit), re-
identification accuracy among all private patches, a joint attack on all of a sample's releases, and how
well the accelerator recovers ``span(U)`` from the residual's null space (``span_u``).
"""

from __future__ import annotations

import json
import math
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError
from .attacks.common import ATTACK_MODES, AttackMode, Calibration, build_split, calibrate, check_privacy_options
from .attacks.gradient import DLGResult, capture_update, gradient_leakage_attack
from .attacks.inversion import (
    JOINT,
    InversionResult,
    PhotoTask,
    capture_training_releases,
    inversion_attack,
    subspace_recovery,
)
from .attacks.statistics import MI_ESTIMATOR, energy_ratios, mutual_information
from .attacks.utility import DigitsTask, UtilityConfig, UtilityResult, train_utility

__all__ = ["ReportConfig", "PrivacyRun", "run_report", "run_attack", "claim_check", "summary_markdown"]

Log = Callable[[str], None]


@dataclass(frozen=True)
class ReportConfig:
    """Everything that decides a privacy report (defaults: the full run; with DP-SGD on the updates each noised
    digits run trains one micro-batch per sample, ~10 minutes each on one core of a busy 2-core machine)."""

    epsilons: tuple[float, ...] = (1.0, 8.0)
    sigmas: tuple[float, ...] = ()  # noise multipliers instead of epsilons (then epsilon is only reported)
    delta: float = 1e-5
    noise_ratio: float = 0.1
    modes: tuple[str, ...] = ATTACK_MODES
    utility: UtilityConfig = field(default_factory=UtilityConfig)
    inversion_layers: tuple[str, ...] | None = None  # None: "input" and the first hidden release
    inversion_epochs: int = 3
    decoder_width: int = 16
    public_per_image: int = 128
    private_per_image: int = 64
    extra_public: int = 32  # crops per extra offline image in the attacker's public set (0: public photos only)
    joint: bool = True  # also attack all of a sample's releases jointly
    photo_model: str = "vgg11_bn"
    dlg_model: str = "vgg11"
    dlg_patch_size: int = 16
    dlg_batch_sizes: tuple[int, ...] = (1, 8)
    dlg_iters: int = 200
    dlg_step_lr: float = 0.1
    seed: int = 0
    quick: bool = False

    @classmethod
    def quick_config(cls, **overrides: Any) -> ReportConfig:
        """A short version: one epsilon, short training, linear decoders, short DLG (minutes, not tens)."""
        base = cls(epsilons=(8.0,), utility=UtilityConfig(epochs=6), inversion_epochs=0,
                   public_per_image=64, private_per_image=32, extra_public=16, dlg_iters=100, quick=True)
        return replace(base, **overrides)

    def validate(self) -> None:
        """Raise :class:`ConfigError` for unusable options (bad epsilon/delta, unknown modes, ...)."""
        if not self.modes:
            raise ConfigError("need at least one mode")
        for m in self.modes:
            if m not in ATTACK_MODES:
                raise ConfigError(f"unknown mode {m!r}; choose from {', '.join(ATTACK_MODES)}")
        if self.sigmas and self.epsilons:
            raise ConfigError("conflicting options: give epsilons or sigmas, not both (sigma is solved from epsilon)")
        if any(m in ("noise-only", "asym+noise") for m in self.modes) and not (self.epsilons or self.sigmas):
            raise ConfigError("noise-only / asym+noise need at least one epsilon (or sigma)")
        for e in self.epsilons:
            check_privacy_options(epsilon=e)
        for sg in self.sigmas:
            check_privacy_options(sigma=sg)
            if sg == 0:
                raise ConfigError("sigma must be > 0 for the noisy modes (use mode 'asym' for no noise)")
        check_privacy_options(delta=self.delta, noise_ratio=self.noise_ratio)
        self.utility.validate()
        for name in ("inversion_epochs", "dlg_iters", "decoder_width", "public_per_image", "private_per_image",
                     "dlg_patch_size", "extra_public"):
            v = getattr(self, name)
            nonneg = name in ("inversion_epochs", "extra_public")
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if nonneg else 1):
                raise ConfigError(f"{name} must be a {'non-negative' if nonneg else 'positive'} "
                                  f"integer (got {v!r})")
        if not self.dlg_batch_sizes or any(b < 1 for b in self.dlg_batch_sizes):
            raise ConfigError(f"dlg batch sizes must be positive (got {self.dlg_batch_sizes!r})")
        if max(self.dlg_batch_sizes) > 4 * self.private_per_image:
            raise ConfigError("dlg batch size larger than the private set")
        if not self.dlg_step_lr > 0:
            raise ConfigError("dlg_step_lr must be > 0")


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


def _num(x: float | None, nd: int = 4) -> float | None:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return None
    return round(float(x), nd)


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
            from .attacks.common import PRIVATE_SPLIT_DEFAULTS

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


def _config_dict(cfg: ReportConfig) -> dict[str, Any]:
    d = asdict(cfg)
    d["utility"] = asdict(cfg.utility)
    return d


def _command(cfg: ReportConfig) -> str:
    cmd = "asymml privacy --out DIR" + (" --quick" if cfg.quick else "")
    default = ReportConfig.quick_config() if cfg.quick else ReportConfig()
    if cfg.sigmas:
        cmd += " --sigmas " + ",".join(f"{s:g}" for s in cfg.sigmas)
    elif cfg.epsilons != default.epsilons:
        cmd += " --epsilons " + ",".join(f"{e:g}" for e in cfg.epsilons)
    if tuple(cfg.modes) != ATTACK_MODES:
        cmd += " --modes " + ",".join(cfg.modes)
    if cfg.delta != default.delta:
        cmd += f" --delta {cfg.delta:g}"
    if cfg.noise_ratio != default.noise_ratio:
        cmd += f" --noise-ratio {cfg.noise_ratio:g}"
    if cfg.seed != default.seed:
        cmd += f" --seed {cfg.seed}"
    if cfg.utility.epochs != default.utility.epochs:
        cmd += f" --epochs {cfg.utility.epochs}"
    if cfg.utility.rank != default.utility.rank:
        cmd += f" --rank {cfg.utility.rank}"
    if cfg.utility.batch_size != default.utility.batch_size:
        cmd += f" --batch-size {cfg.utility.batch_size}"
    if cfg.extra_public != default.extra_public:
        cmd += f" --extra-public {cfg.extra_public}"
    if cfg.utility.dp_updates != default.utility.dp_updates:
        cmd += " --no-dp-updates"
    if cfg.utility.update_clip != default.utility.update_clip:
        cmd += f" --update-clip {cfg.utility.update_clip:g}"
    if cfg.utility.limit_train != default.utility.limit_train:
        cmd += f" --limit-train {cfg.utility.limit_train}"
    return cmd


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
