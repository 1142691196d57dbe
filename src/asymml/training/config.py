"""Training configuration: one table of options drives the command line, config files and checkpoints.

Every option of ``asymml train`` is an :class:`Option` in :data:`OPTIONS`; :class:`TrainConfig` has one
field per option with the same name (dashes become underscores).  A YAML or TOML file may set any of
them (``--config FILE``); command-line values win over the file, the file wins over the defaults.  Values
from a file go through the same converters as the command line, so a bad value gives the same message.

The split options (``--rank``, ``--iters``, ``--warm-start``, ``--micro-batch``, ...) are not defined here:
their entries are generated from :class:`asymml.options.SplitOptions` (its default, help, converter and
validation, which raises :class:`~asymml.errors.ConfigError`); this module only says in which help group
each goes and what training adds (``warm_start``'s automatic default, what else ``seed`` seeds).
:meth:`TrainConfig.split_options` turns a configuration into the ``SplitOptions`` of its run.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..options import OptionSpec, SplitOptions, option_specs

__all__ = [
    "OPTIONS",
    "RUNTIME_FIELDS",
    "TrainConfig",
    "SPLIT_OPTIONS_NOT_IN_TRAINING",
    "add_options",
    "config_diff",
    "load_config_file",
    "resolve_config",
]

SCHEDULERS = ("cos", "step", "none")
ACCOUNTANTS = ("rdp", "prv")
NORMS = ("auto", "batch", "group")
DP_GROUP = "data parallel (torchrun --nproc-per-node N -m asymml train, or asymml train --nproc-per-node N)"
UPDATE_BUDGET = 0.9
"""Share of an --epsilon run's privacy budget (in 1/sigma^2 per step) given to the DP-SGD updates."""
DEFAULT_CIFAR_WIDTH = 0.25


# ----------------------------------------------------------------------------------- value converters
# Each takes the raw value (a string from the command line, or any YAML/TOML scalar) and returns the typed
# value or raises ValueError with a message fit for the user.  Rejected values are shown shortened
# (:func:`_show`): a config file may hold a huge value, which an error message must not echo in full.

_SHOW_CHARS = 40


def _show(value: Any) -> str:
    """``repr(value)`` cut to a few dozen characters (with its type when cut)."""
    try:
        r = repr(value)
    except Exception:  # a hostile __repr__
        return f"a {type(value).__name__}"
    if len(r) <= _SHOW_CHARS:
        return r
    return f"{r[:_SHOW_CHARS]}... (a {type(value).__name__} of {len(r)} characters)"


def _number(value: Any, kind: type) -> Any:
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got {_show(value)}")
    try:
        out = kind(value)
    except (TypeError, ValueError):
        raise ValueError(f"expected {'an integer' if kind is int else 'a number'}, got {_show(value)}") from None
    if kind is int and isinstance(value, float) and value != out:
        raise ValueError(f"expected an integer, got {_show(value)}")
    if kind is float and not math.isfinite(out):
        raise ValueError(f"expected a finite number, got {_show(value)}")
    return out


def positive_int(value: Any) -> int:
    v = _number(value, int)
    if v < 1:
        raise ValueError(f"must be a positive integer, got {_show(value)}")
    return v


def nonneg_int(value: Any) -> int:
    v = _number(value, int)
    if v < 0:
        raise ValueError(f"must be an integer >= 0, got {_show(value)}")
    return v


def positive_float(value: Any) -> float:
    v = _number(value, float)
    if v <= 0:
        raise ValueError(f"must be a number > 0, got {_show(value)}")
    return v


def nonneg_float(value: Any) -> float:
    v = _number(value, float)
    if v < 0:
        raise ValueError(f"must be a number >= 0, got {_show(value)}")
    return v


def unit_interval(value: Any) -> float:
    v = _number(value, float)
    if not 0.0 < v < 1.0:
        raise ValueError(f"must be in (0, 1), got {_show(value)}")
    return v


def momentum_value(value: Any) -> float:
    v = _number(value, float)
    if not 0.0 <= v < 1.0:
        raise ValueError(f"must be in [0, 1), got {_show(value)}")
    return v


def text(value: Any) -> str:
    if not isinstance(value, (str, int, float)) or isinstance(value, bool):
        raise ValueError(f"expected a string, got {_show(value)}")
    return str(value)


def choice(*allowed: str) -> Callable[[Any], str]:
    def conv(value: Any) -> str:
        v = str(value).strip().lower() if isinstance(value, str) else value
        if v not in allowed:
            raise ValueError(f"invalid choice {_show(value)} (choose from {', '.join(allowed)})")
        return v

    conv.__name__ = "choice"
    return conv


def clip_spec(value: Any) -> str | float:
    """A clip bound: a number > 0, ``auto`` or ``auto:q``."""
    from ..privacy.noise import parse_clip

    if isinstance(value, str) and not value.strip().lower().startswith("auto"):
        value = _number(value, float)
    fixed, _ = parse_clip(value)
    return fixed if fixed is not None else str(value).strip().lower()


def device_spec(value: Any) -> str:
    s = text(value).strip()
    remote = r"(tcp://[^\s/,]+:\d+|unix:///[^\s,]+)"
    if re.fullmatch(remote, s.replace("{rank}", "0")):
        return s  # a remote accelerator server (`asymml serve`); {rank}: one per data-parallel rank
    if "," in s and all(re.fullmatch(remote, d.strip()) for d in s.split(",")):
        return ",".join(d.strip() for d in s.split(","))  # one accelerator server per rank
    s = s.lower()
    if not re.fullmatch(r"cpu|auto|cuda(:\d+)?|mps", s):
        raise ValueError(f"invalid device {_show(value)} (choose from cpu, cuda, cuda:N, auto, tcp://HOST:PORT, "
                         "unix:///PATH; data parallel: a {rank} placeholder or a comma-separated list, one per rank)")
    return s


def path_text(value: Any) -> str:
    return str(Path(text(value)).expanduser())


def flag(value: Any) -> bool:
    """A boolean, strictly: ``true``/``false`` in a config file (a string such as ``"no"`` is truthy in
    Python, so it is refused rather than guessed); the command line's ``--x/--no-x`` give booleans."""
    if isinstance(value, bool):
        return value
    raise ValueError(f"expected true or false (a boolean), got {_show(value)}")


def optional(conv: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """``conv`` that also accepts ``none``/``null`` (→ None)."""

    def wrapped(value: Any) -> Any:
        if value is None or isinstance(value, str) and value.strip().lower() in ("none", "null", ""):
            return None
        return conv(value)

    wrapped.__name__ = getattr(conv, "__name__", "value")
    return wrapped


# ------------------------------------------------------------------------------------------ options


@dataclass(frozen=True)
class Option:
    """One option: its field name, converter, default, help and command-line group."""

    name: str
    convert: Callable[[Any], Any]
    default: Any
    help: str
    group: str
    metavar: str | None = None
    is_flag: bool = False
    split: OptionSpec | None = None
    """The :class:`SplitOptions` option this one is generated from (None: a training-only option)."""

    @property
    def cli(self) -> str:
        return "--" + self.name.replace("_", "-")


def _o(name: str, convert: Callable[[Any], Any], default: Any, help: str, group: str, **kw: Any) -> Option:
    return Option(name, convert, default, help, group, **kw)


_SPLIT_SPECS = {s.name: s for s in option_specs()}
_INHERIT: Any = object()

#: :class:`SplitOptions` options that ``asymml train`` does not offer, and why (a new split option must be
#: placed in :data:`OPTIONS` or listed here; tests/cli/test_train_cli.py checks it).
SPLIT_OPTIONS_NOT_IN_TRAINING: dict[str, str] = {
    "strict": "training builds known models (asymml's or torchvision's): every op has a rule or runs trusted",
    "epc_bytes": "only changes what sm.profile() compares the trusted peak against, not what is trained",
}


def _split_converter(spec: OptionSpec, default: Any) -> Callable[[Any], Any]:
    """``spec``'s converter followed by :class:`SplitOptions`' validation of the one value (so a bad value is
    refused where it is given, with SplitOptions' message, the value shortened by :func:`_show`); ``None``
    passes when ``default`` is None.  Booleans go through :func:`flag` first: like every boolean of a
    training config file, they must be booleans (``"no"`` is refused rather than read)."""

    def convert(value: Any) -> Any:
        if default is None and (value is None or isinstance(value, str)
                                and value.strip().lower() in ("none", "null", "")):
            return None
        v = value
        try:
            v = spec.parse(flag(value) if spec.is_flag or spec.name == "verify" else value)
            if v is not None or spec.default is None:
                v = getattr(SplitOptions(**{spec.name: v}), spec.name)  # raises ConfigError naming the option
        except ConfigError as e:
            msg = str(e)
            for shown in {repr(value), repr(v)}:
                msg = msg.replace(shown, _show(value))
            raise ConfigError(msg) from None
        return v

    convert.__name__ = spec.name
    return convert


def _split(name: str, group: str, *, default: Any = _INHERIT, note: str = "") -> Option:
    """The training option of split option ``name``: default, help, metavar and converter from
    :class:`SplitOptions`; training adds its help ``group``, a ``note`` on what the option also does in
    training, and (warm_start only) a default of its own."""
    spec = _SPLIT_SPECS[name]
    d = spec.default if default is _INHERIT else default
    return Option(name, _split_converter(spec, d), d, spec.help + note, group, metavar=spec.metavar,
                  is_flag=spec.is_flag or name == "verify", split=spec)


def _split_default(name: str) -> Any:
    """A :class:`TrainConfig` field's default: :class:`SplitOptions`' for split option ``name``."""
    return _SPLIT_SPECS[name].default


OPTIONS: tuple[Option, ...] = (
    # model and data
    _o("model", text, "vgg11_bn", "vgg11/13/16/19[_bn], resnet20/32/44/56/110, or any torchvision "
       "classification model (resnet18, mobilenet_v2, ...; 'tv:NAME' forces torchvision)", "model and data",
       metavar="NAME"),
    _o("width", optional(positive_float), None, f"channel-width multiplier of the CIFAR-style models "
       f"(default {DEFAULT_CIFAR_WIDTH}: a narrow network that trains in minutes on a CPU)", "model and data",
       metavar="W"),
    _o("dataset", choice("digits", "photos", "synthetic", "cifar10", "cifar100", "imagenet"), "digits",
       "digits, photos, synthetic (offline); cifar10, cifar100, imagenet (files under --data-dir)",
       "model and data", metavar="NAME"),
    _o("data_dir", optional(path_text), None, "where CIFAR/ImageNet files are (default $ASYMML_DATA or "
       "~/.cache/asymml/data)", "model and data", metavar="DIR"),
    _o("download", flag, False, "allow torchvision to download CIFAR (never done otherwise)",
       "model and data", is_flag=True),
    _o("image_size", optional(positive_int), None, "input size in pixels (default: the dataset's, 32 for "
       "digits/CIFAR, 224 for ImageNet)", "model and data", metavar="PX"),
    _o("limit_train", optional(positive_int), None, "train on the first N samples of a fixed shuffle of the "
       "training set", "model and data", metavar="N"),
    _o("limit_test", optional(positive_int), None, "evaluate on the first N test samples", "model and data",
       metavar="N"),
    _o("norm", choice(*NORMS), "auto", "normalisation layers: batch (BatchNorm as the model defines it), group "
       "(BatchNorm replaced by GroupNorm, per sample: what DP needs), auto (group when noise is on, else batch)",
       "model and data"),
    _o("workers", nonneg_int, 0, "DataLoader worker processes for on-disk datasets (in-memory datasets are "
       "batched directly)", "model and data", metavar="N"),
    # execution
    _split("mode", "execution"),
    _o("device", device_spec, "cpu", "the accelerator: cpu, cuda[:N], auto, or a remote accelerator server "
       "(asymml serve) at tcp://HOST:PORT or unix:///PATH; the trusted context is always this process's CPU",
       "execution", metavar="DEV"),
    _o("request_timeout", optional(positive_float), 60.0, "seconds to wait for a remote accelerator's answer "
       "before declaring it lost ('none': wait forever)", "execution", metavar="S"),
    _o("tls_cert", optional(path_text), None, "client certificate (PEM) for mutual TLS with a tcp:// "
       "accelerator server (asymml certs writes a test set)", "execution", metavar="FILE"),
    _o("tls_key", optional(path_text), None, "private key (PEM) of --tls-cert", "execution", metavar="FILE"),
    _o("tls_ca", optional(path_text), None, "CA certificate (PEM) that signed the server's certificate",
       "execution", metavar="FILE"),
    _o("insecure", flag, False, "allow an unauthenticated, unencrypted link to a non-loopback accelerator "
       "server (only on a network you trust)", "execution", is_flag=True),
    _split("verify", "execution"),
    _split("verify_sample", "execution"),
    _o("threads", optional(positive_int), None, "torch CPU threads (default: torch's choice)", "execution",
       metavar="N"),
    # data parallel (torchrun / --nproc-per-node)
    _o("dist_timeout", positive_float, 60.0, "data parallel: seconds a collective (the per-step gradient "
       "all-reduce) may wait for the other ranks before the run stops with an error naming the --resume command",
       DP_GROUP,
       metavar="S"),
    _o("trusted_interconnect", flag, False, "data parallel: allow a rendezvous (MASTER_ADDR) that is not a "
       "loopback address without TLS, declaring that the network between the trusted contexts is protected "
       "(VPN, IPsec, WireGuard, private link): the ranks exchange unnoised gradient shares",
       DP_GROUP,
       is_flag=True),
    _o("dist_tls", flag, False, "data parallel: run gloo over TLS (GLOO_DEVICE_TRANSPORT=TCP_TLS; key, certificate "
       "and CA from GLOO_DEVICE_TRANSPORT_TCP_TLS_PKEY/_CERT/_CA_FILE); needs a PyTorch built with "
       "USE_GLOO_WITH_OPENSSL=1 (refused otherwise)",
       DP_GROUP,
       is_flag=True),
    # optimisation
    _o("batch_size", positive_int, 64, "training batch size per rank (the last partial batch is dropped; data "
       "parallel: the global batch is N times this)",
       "optimisation", metavar="N"),
    _o("test_batch_size", positive_int, 256, "evaluation batch size", "optimisation", metavar="N"),
    _o("epochs", positive_int, 10, "number of epochs", "optimisation", metavar="N"),
    _o("lr", positive_float, 0.05, "initial learning rate (SGD)", "optimisation"),
    _o("scheduler", choice(*SCHEDULERS), "cos", "learning-rate schedule, updated every step: cos (cosine to "
       "0), step (x lr_gamma every lr_step epochs), none", "optimisation"),
    _o("lr_step", optional(positive_int), None, "epochs between decays of --scheduler step (default: decay "
       "at 50%% and 75%% of training)", "optimisation", metavar="EPOCHS"),
    _o("lr_gamma", positive_float, 0.1, "decay factor of --scheduler step", "optimisation", metavar="G"),
    _o("momentum", momentum_value, 0.9, "SGD momentum", "optimisation", metavar="M"),
    _o("nesterov", flag, False, "Nesterov momentum", "optimisation", is_flag=True),
    _o("wd", nonneg_float, 5e-4, "weight decay", "optimisation"),
    _split("seed", "optimisation", note="; in training also of the model's initialisation and the data's split "
           "and order"),
    _split("noise_seed", "noise / differential privacy", note="; in training also of Poisson batch "
           "sampling; never saved"),
    # split
    _split("rank", "split"),
    _o("tau", optional(unit_interval), None, "adaptive rank: smallest rank whose residual energy ratio "
       "||R||^2/||X||^2 <= TAU (shorthand for --rank adaptive:TAU; the prototype used 0.1)", "split"),
    _split("input_rank", "split"),
    _split("grad_rank", "split"),
    _split("decomposition", "split"),
    _split("iters", "split"),
    _split("basis", "split"),
    _split("warm_start", "split", default=None, note=" (default: on without noise, off with noise: a warm start "
           "carries other samples' factors)"),
    _split("placement", "split"),
    _split("backward", "split"),
    _split("micro_batch", "split", note="; asymml train also runs each training step in micro-batches of this "
           "size, accumulating their gradients"),
    # noise
    _o("noise", optional(nonneg_float), None, "noise multiplier sigma of every released residual (std = "
       "sigma * clip)", "noise / differential privacy", metavar="SIGMA"),
    _o("nsr", optional(nonneg_float), None, "the prototype's noise-to-signal amplitude ratio",
       "noise / differential privacy"),
    _o("epsilon", optional(positive_float), None, "target epsilon of the whole run: sigma is solved by the "
       "accountant before training", "noise / differential privacy"),
    _o("delta", unit_interval, 1e-5, "delta of (epsilon, delta)", "noise / differential privacy"),
    _o("clip", clip_spec, 1.0, "per-sample L2 bound of each release: a number, auto or auto:q (adaptive, not "
       "formally accounted)", "noise / differential privacy", metavar="C"),
    _o("update_clip", positive_float, 1.0, "DP-SGD on updates: per-sample L2 bound of the trusted share of "
       "each sample's gradient (all parameters), noised before the optimizer step", "noise / differential privacy",
       metavar="C"),
    _o("update_noise", optional(positive_float), None, "noise multiplier of the DP-SGD update (default: with "
       f"--epsilon, {UPDATE_BUDGET:.0%}% of the privacy budget goes to the updates, whose noise costs accuracy "
       "most; with --noise, the same sigma)", "noise / differential privacy", metavar="SIGMA"),
    _o("accountant", choice(*ACCOUNTANTS), "rdp", "Opacus accountant for epsilon", "noise / differential "
       "privacy"),
    # output
    _o("out", optional(path_text), None, "output directory (default runs/<time>-<model>-<mode>)", "output",
       metavar="DIR"),
    _o("resume", optional(path_text), None, "continue a run from a checkpoint file or run directory "
       "(bare --resume: the one in --out)", "output", metavar="PATH"),
    _o("progress", flag, True, "tqdm progress bars", "output", is_flag=True),
    _o("tensorboard", flag, True, "TensorBoard event files in OUT/tensorboard", "output", is_flag=True),
    _o("log_every", positive_int, 10, "steps between TensorBoard step logs (loss, lr, per-layer ranks and "
       "residual-energy histograms)", "output", metavar="N"),
    _o("checkpoint_every_steps", optional(positive_int), None, "also write a checkpoint every N steps ('none': "
       "only by time and at epoch ends)", "output", metavar="N"),
    _o("checkpoint_every_minutes", optional(positive_float), 2.0, "write a checkpoint at least every M "
       "minutes of training, mid-epoch too ('none': only by steps and at epoch ends)", "output", metavar="M"),
)

_BY_NAME = {o.name: o for o in OPTIONS}

#: Fields that may change between a checkpoint and its resumption (they do not change what is trained).
RUNTIME_FIELDS = frozenset({
    "data_dir", "download", "workers", "device", "threads", "test_batch_size", "limit_test", "epochs",
    "out", "resume", "progress", "tensorboard", "log_every", "checkpoint_every_steps",
    "checkpoint_every_minutes", "request_timeout", "tls_cert", "tls_key", "tls_ca", "insecure", "verify",
    "verify_sample",
    "dist_timeout", "trusted_interconnect", "dist_tls",
})


@dataclass
class TrainConfig:
    """All options of a training run (see :data:`OPTIONS` for their meaning and defaults).

    The split options' fields take their defaults from :class:`SplitOptions` (except ``warm_start``,
    automatic here); :meth:`split_options` is the :class:`SplitOptions` they make."""

    model: str = "vgg11_bn"
    width: float | None = None
    dataset: str = "digits"
    data_dir: str | None = None
    download: bool = False
    image_size: int | None = None
    limit_train: int | None = None
    limit_test: int | None = None
    norm: str = "auto"
    workers: int = 0
    mode: str = _split_default("mode")
    device: str = "cpu"
    request_timeout: float | None = 60.0
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None
    insecure: bool = False
    verify: bool | None = _split_default("verify")
    verify_sample: float = _split_default("verify_sample")
    threads: int | None = None
    dist_timeout: float = 60.0
    trusted_interconnect: bool = False
    dist_tls: bool = False
    batch_size: int = 64
    test_batch_size: int = 256
    epochs: int = 10
    lr: float = 0.05
    scheduler: str = "cos"
    lr_step: int | None = None
    lr_gamma: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    wd: float = 5e-4
    seed: int = _split_default("seed")
    noise_seed: int | None = _split_default("noise_seed")
    rank: int | tuple[int, ...] | str = _split_default("rank")
    tau: float | None = None
    input_rank: int | None = _split_default("input_rank")
    grad_rank: int | tuple[int, ...] | str | None = _split_default("grad_rank")
    decomposition: str = _split_default("decomposition")
    iters: int = _split_default("iters")
    basis: str = _split_default("basis")
    warm_start: bool | None = None  # None: on without noise, off with noise (resolved by validate())
    placement: str = _split_default("placement")
    backward: str = _split_default("backward")
    micro_batch: int | None = _split_default("micro_batch")
    noise: float | None = None
    nsr: float | None = None
    epsilon: float | None = None
    delta: float = 1e-5
    clip: float | str = 1.0
    update_clip: float = 1.0
    update_noise: float | None = None
    accountant: str = "rdp"
    out: str | None = None
    resume: str | None = None
    progress: bool = True
    tensorboard: bool = True
    log_every: int = 10
    checkpoint_every_steps: int | None = None
    checkpoint_every_minutes: float | None = 2.0

    # ------------------------------------------------------------------ derived values
    @property
    def noise_on(self) -> bool:
        """Whether released residuals are clipped and noised."""
        return self.noise is not None or self.nsr is not None or self.epsilon is not None

    @property
    def dp_updates(self) -> bool:
        """Whether this run is accounted end to end: noised releases with a fixed clip (``--noise`` or
        ``--epsilon``), protected backward, and DP-SGD on the trusted share of every update, over Poisson
        sampled batches."""
        return ((self.noise is not None or self.epsilon is not None) and not isinstance(self.clip, str)
                and self.backward == "protected" and self.mode in ("asym", "noise-only"))

    @property
    def rank_spec(self) -> int | tuple[int, ...] | str:
        """The rank policy actually used (``--tau`` is shorthand for ``adaptive:TAU``)."""
        return f"adaptive:{self.tau}" if self.tau is not None else self.rank

    def split_options(self, **overrides: Any) -> SplitOptions:
        """The :class:`SplitOptions` of this run: its split fields, with ``--tau`` folded into the rank and an
        automatic ``warm_start`` resolved (on without noise, off with noise), then ``overrides``.  Raises
        :class:`ConfigError` (from SplitOptions' own validation) for a bad value."""
        kw = {o.name: getattr(self, o.name) for o in OPTIONS if o.split is not None}
        kw["rank"] = self.rank_spec
        if kw["warm_start"] is None:
            kw["warm_start"] = not self.noise_on
        kw.update(overrides)
        return SplitOptions(**kw)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], *, source: str = "config") -> TrainConfig:
        """Build from raw values (converted and validated like command-line values)."""
        cfg = cls()
        cfg.update(values, source=source)
        return cfg

    def update(self, values: Mapping[str, Any], *, source: str = "config") -> None:
        """Set options from raw values; unknown names and bad values raise :class:`ConfigError`."""
        for key, raw in values.items():
            name = str(key).replace("-", "_")
            opt = _BY_NAME.get(name)
            if opt is None:
                raise ConfigError(
                    f"{source}: unknown option {_show(key)}; known options: {', '.join(sorted(_BY_NAME))}"
                )
            try:
                setattr(self, name, opt.convert(raw))
            except ValueError as e:
                raise ConfigError(f"{source}: invalid value for {opt.cli}: {e}") from None

    def validate(self) -> TrainConfig:
        """Check the combination of options; raise :class:`ConfigError` naming the conflicting ones."""
        for opt in OPTIONS:  # values set programmatically go through the converters too
            value = getattr(self, opt.name)
            if value is not None or opt.default is not None:
                try:
                    setattr(self, opt.name, opt.convert(value))
                except ValueError as e:
                    raise ConfigError(f"invalid value for {opt.cli}: {e}") from None
        given = [f"--{n}" for n in ("noise", "nsr", "epsilon") if getattr(self, n) is not None]
        if len(given) > 1:
            raise ConfigError(f"conflicting options {' and '.join(given)}: give only one")
        if self.noise_on and self.mode in ("plain", "trusted-only"):
            raise ConfigError(f"{given[0]} has no effect in --mode {self.mode}: use --mode asym or noise-only")
        if self.epsilon is not None and self.backward == "paper":
            raise ConfigError(
                "--epsilon needs --backward protected: paper mode releases full activation gradients "
                "without noise, so no epsilon can be guaranteed"
            )
        if self.epsilon is not None and isinstance(self.clip, str):
            raise ConfigError("--epsilon needs a fixed --clip: an adaptive clip is not formally accounted")
        if self.warm_start is None:
            self.warm_start = not self.noise_on
        elif self.warm_start and self.noise_on:
            raise ConfigError(
                "--warm-start with noise: a warm start begins each decomposition from the previous "
                "sample's (or batch's) factors, so a release would depend on other samples and the per-sample "
                "noise bound would not hold; drop --warm-start (noised runs start cold)"
            )
        if self.norm == "auto":
            self.norm = "group" if self.noise_on else "batch"
        if self.noise_on and self.norm == "batch" and self.epsilon is not None:
            raise ConfigError(
                "--epsilon with --norm batch: BatchNorm's running statistics are computed from private data "
                "without noise and reach the accelerator in evaluation, so no epsilon can cover them; use "
                "--norm group (the default with noise)"
            )
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("--tls-cert and --tls-key go together: give both (and --tls-ca)")
        if any(v is not None for v in (self.tls_cert, self.tls_key, self.tls_ca)) \
                and not self.device.startswith(("tcp://", "unix://")):
            raise ConfigError("--tls-cert/--tls-key/--tls-ca apply to a remote accelerator server only "
                              f"(--device is {self.device})")
        if self.nesterov and self.momentum == 0:
            raise ConfigError("--nesterov needs --momentum > 0")
        if self.tau is not None and self.rank != "schedule":
            raise ConfigError("conflicting options --rank and --tau: --tau TAU means --rank adaptive:TAU")
        if self.scheduler != "step" and self.lr_step is not None:
            raise ConfigError("--lr-step only applies to --scheduler step")
        if not is_cifar_model(self.model):
            from ..models import MODELS, torchvision_models

            name = self.model.strip().lower()
            name = name.split(":", 1)[1] if name.startswith(("tv:", "torchvision:")) else name
            if name not in torchvision_models():
                raise ConfigError(
                    f"unknown model {self.model!r}; CIFAR-style models: {', '.join(MODELS)}; or any torchvision "
                    "classification model (resnet18, mobilenet_v2, ...; see torchvision.models.list_models())"
                )
        if self.width is not None and not is_cifar_model(self.model):
            raise ConfigError(f"--width applies to the CIFAR-style models only, not to {self.model!r}")
        self.split_options()  # SplitOptions validates the split fields together (ConfigError naming the option)
        return self


def is_cifar_model(name: str) -> bool:
    """Whether ``name`` is one of asymml's CIFAR-style models (which take ``width``)."""
    from ..models import MODELS

    return name.strip().lower() in MODELS


# ------------------------------------------------------------------------------------ config files


MAX_CONFIG_BYTES = 1 << 20
"""A config file of options is a few hundred bytes; anything beyond this is refused unread."""


def _yaml_load(text: str) -> Any:
    """``yaml.safe_load`` that refuses anchors and aliases: an option file needs neither, and nested aliases
    expand exponentially (a few hundred bytes can stand for gigabytes: the "billion laughs")."""
    import yaml

    class NoAliasLoader(yaml.SafeLoader):
        def compose_node(self, parent: Any, index: Any) -> Any:
            if self.check_event(yaml.AliasEvent) or getattr(self.peek_event(), "anchor", None) is not None:
                mark = self.peek_event().start_mark
                raise ConfigError(f"YAML anchors and aliases (& and *) are not allowed in a config file "
                                  f"(line {mark.line + 1})")
            return super().compose_node(parent, index)

    return yaml.load(text, Loader=NoAliasLoader)  # noqa: S506 - a SafeLoader subclass


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML (``.yaml``/``.yml``) or TOML (``.toml``) file of options into a dict.

    A TOML file may put the options at the top level or under a ``[train]`` table; likewise a YAML file
    may nest them under ``train:``.  Files over :data:`MAX_CONFIG_BYTES` and YAML anchors/aliases are
    refused (bounded time and memory whatever the file holds).
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} not found")
    suffix = p.suffix.lower()
    try:
        size = p.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ConfigError(f"config file {str(p)!r} is {size} bytes; an option file is at most "
                              f"{MAX_CONFIG_BYTES} bytes")
        raw_text = p.read_text(encoding="utf-8")
        if suffix == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib  # type: ignore[no-redef]
            data = tomllib.loads(raw_text)
        elif suffix in (".yaml", ".yml"):
            data = _yaml_load(raw_text)
        else:
            raise ConfigError(f"config file {str(p)!r}: use a .yaml, .yml or .toml file")
    except ConfigError:
        raise
    except Exception as e:  # parse errors of either format
        msg = " ".join(str(e).split())
        msg = msg if len(msg) <= 300 else msg[:300] + "..."
        raise ConfigError(f"config file {str(p)!r} is not valid {suffix[1:].upper()}: {msg}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r} must hold a mapping of option: value")
    if set(data) == {"train"} and isinstance(data["train"], dict):
        data = data["train"]
    return data


# ---------------------------------------------------------------------------------------- argparse


class OptionType:
    """argparse ``type=`` wrapper: a converter's ValueError becomes a clear argparse error."""

    def __init__(self, opt: Option) -> None:
        self.opt = opt
        self.__name__ = opt.name

    def __call__(self, value: str) -> Any:
        try:
            return self.opt.convert(value)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None


class _BareResumeType(OptionType):
    """``--resume``'s type: the bare option's ``""`` (the checkpoint in --out) stays ``""``."""

    def __call__(self, value: str) -> Any:
        return "" if value == "" else super().__call__(value)


def add_options(parser: argparse.ArgumentParser) -> None:
    """Add every option of :data:`OPTIONS` to ``parser``; unset options stay absent from the namespace."""
    parser.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS,
                        help="YAML or TOML file of options (command-line options win)")
    groups: dict[str, argparse._ArgumentGroup] = {}
    for opt in OPTIONS:
        g = groups.get(opt.group)
        if g is None:
            g = groups[opt.group] = parser.add_argument_group(opt.group)
        help_text = opt.help
        if opt.name in ACCOUNTED_DEFAULTS:
            help_text += f" (default: {opt.default}; {ACCOUNTED_DEFAULTS[opt.name]} with --epsilon or --noise)"
        elif opt.default is not None and not opt.is_flag and "default" not in help_text:
            help_text += f" (default: {opt.default})"
        if opt.is_flag:
            if "default" not in opt.help:
                help_text += f" (default: {'on' if opt.default else 'off'})"
            g.add_argument(opt.cli, dest=opt.name, action=argparse.BooleanOptionalAction,
                           default=argparse.SUPPRESS, help=help_text)
        elif opt.name == "resume":  # bare --resume: const "" (argparse runs it through type= too: keep it "")
            g.add_argument(opt.cli, dest=opt.name, nargs="?", const="", type=_BareResumeType(opt),
                           default=argparse.SUPPRESS, metavar=opt.metavar, help=help_text)
        else:
            g.add_argument(opt.cli, dest=opt.name, type=OptionType(opt), default=argparse.SUPPRESS,
                           metavar=opt.metavar or opt.name.upper(), help=help_text)
    parser.add_argument("--sigma", dest="noise", type=OptionType(_BY_NAME["noise"]), default=argparse.SUPPRESS,
                        help=argparse.SUPPRESS)  # alias of --noise


#: Defaults of a fresh accounted run (``--epsilon``/``--noise`` with a fixed clip: DP-SGD on updates) for the
#: options the user did not set.  Why: every residual release is a Gaussian mechanism on a d-dimensional
#: tensor with sensitivity ``clip``, so its signal-to-noise ratio is at most ``1 / (sigma * sqrt(d))``: the
#: released residual carries nothing useful, and a tiny clip keeps its noise from swamping the trusted
#: low-rank part (the model learns from ``L`` and the low-rank gradient ``δ_L``).  Measured on the default
#: digits model (32 images, release sigma 9.2): cosine of the trusted-share gradient with the exact one
#: 0.014 at clip 1e-2, 0.039 at 1e-3, 0.22 at 1e-4, 0.87 at 1e-5, 0.94 at 1e-6 (the low-rank ceiling).  What the updates need is
#: classic DP-SGD: large Poisson batches and a large learning rate for clipped, averaged gradients; and
#: since the model learns from the low-rank part only, a higher rank (start 8 instead of 2).  Placement
#: ``split``: one-sample micro-batches make the cost model keep every layer trusted on a CPU accelerator;
#: an accounted run keeps the asymmetric split (and accounts its releases) unless asked otherwise.
ACCOUNTED_DEFAULTS: dict[str, Any] = {"clip": 1e-6, "batch_size": 256, "lr": 0.5, "rank": "schedule:8:2:32",
                                      "placement": "split"}


def apply_accounted_defaults(cfg: TrainConfig, given: set[str]) -> TrainConfig:
    """Give a fresh accounted run :data:`ACCOUNTED_DEFAULTS` for every option not in ``given``."""
    if cfg.dp_updates:
        for name, value in ACCOUNTED_DEFAULTS.items():
            if name not in given:
                setattr(cfg, name, value)
    return cfg


def given_options(args: argparse.Namespace) -> dict[str, Any]:
    """The options that were set on the command line (parsed with :func:`add_options`)."""
    return {k: v for k, v in vars(args).items() if k in _BY_NAME}


def resolve_config(
    cli: Mapping[str, Any], file_values: Mapping[str, Any] | None = None, base: TrainConfig | None = None,
    *, source: str = "config file",
) -> TrainConfig:
    """``base`` (default: the defaults) updated by a config file's values, then by the command-line values
    ``cli`` (already converted by argparse)."""
    cfg = dataclasses.replace(base) if base is not None else TrainConfig()
    if file_values:
        cfg.update(file_values, source=source)
    for name, value in cli.items():
        setattr(cfg, name, value)
    return cfg


def config_diff(old: Mapping[str, Any], new: Mapping[str, Any], *, ignore: frozenset[str] = RUNTIME_FIELDS) -> list[str]:
    """``option: old -> new`` for every field (outside ``ignore``) whose value differs."""
    out = []
    for f in fields(TrainConfig):
        if f.name in ignore:
            continue
        a, b = old.get(f.name, f.default), new.get(f.name, f.default)
        if a != b:
            out.append(f"{_BY_NAME[f.name].cli}: {a!r} in the checkpoint, {b!r} now")
    return out
