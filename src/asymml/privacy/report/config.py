"""The privacy report's configuration (:class:`ReportConfig`) and the command line that reproduces it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from ...errors import ConfigError
from ..attacks.common import ATTACK_MODES, check_privacy_options
from ..attacks.utility import UtilityConfig


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
