"""The split options: one frozen type, one definition per option, validated in one place.

:class:`SplitOptions` holds every option that decides how :func:`asymml.split` splits a model. Each field
carries its help text, command-line metavar and a converter from raw text (command line, YAML/TOML
config files), so that ``split()``, the training and bench configs and the command line all embed or
generate from it instead of repeating the option:

* ``SplitOptions(...)`` takes typed Python values and refuses anything else (a bool where an int is
  expected, ``warm_start="no"``), raising :class:`~asymml.errors.ConfigError` with a message naming the
  option;
* :meth:`SplitOptions.from_dict` takes raw values (strings from a file or the command line) and converts
  them with the same converters the command line uses;
* :func:`option_specs` / :func:`add_arguments` / :meth:`SplitOptions.from_namespace` generate and read
  ``argparse`` arguments (``--rank``, ``--warm-start/--no-warm-start``, ...).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .decomposition import BASES, METHODS, RankPolicy, parse_rank
from .errors import ConfigError
from .executors.verify import SAMPLE as VERIFY_SAMPLE
from .planner import PLACEMENTS
from .profiling import EPC_DEFAULT_BYTES

__all__ = [
    "BACKWARDS", "MODES", "OptionSpec", "SplitOptions", "add_arguments", "option_specs",
]

#: Execution modes: split, all on the accelerator, all trusted, whole activations + noise released.
MODES = ("asym", "plain", "trusted-only", "noise-only")
#: Backward modes: only gradient residuals released (protected), or full gradients (the prototype's).
BACKWARDS = ("protected", "paper")
SEED_BOUND = 2**63  # torch.Generator.manual_seed takes a 64-bit value; keep seeds non-negative int64


# ------------------------------------------------------------------------------------ type checks
# Each takes a typed value and returns it (possibly normalised) or raises ConfigError naming the option.


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _positive_int(name: str, v: Any) -> int:
    if not _is_int(v) or v < 1:
        raise ConfigError(f"{name} must be a positive integer, got {v!r}")
    return v


def _seed(name: str, v: Any) -> int:
    if not _is_int(v) or not 0 <= v < SEED_BOUND:
        raise ConfigError(f"{name} must be an integer in [0, 2**63) (at most 2**63 - 1), got {v!r}")
    return v


def _bool(name: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise ConfigError(f"{name} must be True or False, got {v!r}")
    return v


def _choice(name: str, v: Any, allowed: tuple[str, ...]) -> str:
    if not isinstance(v, str) or v not in allowed:
        raise ConfigError(f"invalid {name} {v!r}; allowed: {', '.join(allowed)}")
    return v


def _rank(name: str, v: Any) -> tuple[Any, RankPolicy]:
    """A rank as given (lists become tuples) and its policy."""
    if isinstance(v, list):
        v = tuple(v)
    try:
        policy = parse_rank(v)
    except ValueError as e:  # decomposition.parse_rank raises ValueError (it has no ConfigError)
        msg = str(e)
        raise ConfigError(msg if name == "rank" else f"{name}: {msg}") from None
    return v, policy


# -------------------------------------------------------------------------- raw-value converters
# From text (command line, config files) or any YAML/TOML scalar to the typed value; ConfigError on failure.


def _parse_int(v: Any) -> int:
    if _is_int(v):
        return v
    if isinstance(v, float) and v.is_integer() and math.isfinite(v):
        return int(v)
    if isinstance(v, str):
        try:
            return int(v.strip())
        except ValueError:
            pass
    raise ConfigError(f"expected an integer, got {v!r}")


def _parse_float(v: Any) -> float:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    if isinstance(v, str):
        try:
            return float(v.strip())
        except ValueError:
            pass
    raise ConfigError(f"expected a number, got {v!r}")


def _parse_bool(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    s = str(v).strip().lower() if isinstance(v, (str, int)) else None
    if s in ("true", "yes", "on", "1"):
        return True
    if s in ("false", "no", "off", "0"):
        return False
    raise ConfigError(f"expected true or false, got {v!r}")


def _parse_text(v: Any) -> str:
    if not isinstance(v, str):
        raise ConfigError(f"expected a string, got {v!r}")
    return v.strip().lower()


def _parse_rank(v: Any) -> Any:
    """A rank spec as text (``8``, ``2,4,8``, ``schedule``, ``adaptive:0.1``) or a YAML/TOML int or list,
    checked now so that a bad one is reported where it was given."""
    if isinstance(v, (list, tuple)):
        v = tuple(_parse_int(x) for x in v)
    elif isinstance(v, str):
        v = v.strip().lower()
    elif not _is_int(v):
        raise ConfigError(f"invalid rank {v!r}")
    _rank("rank", v)
    return v


def _is_none(v: Any) -> bool:
    return v is None or isinstance(v, str) and v.strip().lower() in ("none", "null", "")


def _optional(conv: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def parse(v: Any) -> Any:
        return None if _is_none(v) else conv(v)

    return parse


# ------------------------------------------------------------------------------------- the type


def _opt(default: Any, help: str, parse: Callable[[Any], Any], metavar: str | None = None,
         choices: tuple[str, ...] | None = None, on_cli: bool = True) -> Any:
    return field(default=default, metadata={"help": help, "parse": parse, "metavar": metavar, "choices": choices,
                                            "on_cli": on_cli})


@dataclass(frozen=True)
class SplitOptions:
    """Every option of :func:`asymml.split` (except the model, the noise and the executor, which are
    objects rather than options). Validated on construction; frozen: derive variants with
    :meth:`replace`."""

    rank: int | tuple[int, ...] | str | RankPolicy = _opt(
        "schedule", "rank of the trusted low-rank part: N, a per-point list 2,4,8, schedule (2, x2 per conv, "
        "cap 32), schedule:START:GROWTH:CAP, adaptive[:TAU[:MAX]]", _parse_rank, "SPEC")
    decomposition: str = _opt("power", "power (light subspace iteration), eigh, svd or rsvd", _parse_text,
                              choices=METHODS)
    backward: str = _opt("protected", "protected: only gradient residuals reach the accelerator; paper: full "
                         "activation gradients, as the prototype", _parse_text, choices=BACKWARDS)
    mode: str = _opt("asym", "asym (split), plain (all on the accelerator), trusted-only (all trusted), "
                     "noise-only (whole activations + noise to the accelerator)", _parse_text, choices=MODES)
    iters: int = _opt(2, "power-iteration rounds", _parse_int, "N")
    basis: str = _opt("sample", "one low-rank basis per sample, or one per batch", _parse_text, choices=BASES)
    input_rank: int | None = _opt(1, "rank of the raw input's decomposition ('none': use the rank policy)",
                                  _optional(_parse_int), "R")
    grad_rank: int | tuple[int, ...] | str | RankPolicy | None = _opt(
        None, "rank policy of gradient decompositions in protected backward (default: the layer's forward "
        "rank)", _optional(_parse_rank), "SPEC")
    warm_start: bool = _opt(True, "warm-start power iterations from the previous step's basis", _parse_bool)
    strict: bool = _opt(False, "refuse ops that have no split rule and are not known to run trusted",
                        _parse_bool)
    epc_bytes: int = _opt(EPC_DEFAULT_BYTES, "trusted memory budget (EPC) the profile compares against, bytes",
                          _parse_int, "BYTES")
    seed: int = _opt(0, "seed of the decompositions' random starts", _parse_int, "N")
    noise_seed: int | None = _opt(None, "seed of the DP noise, for reproducible experiments only (default: OS "
                                  "entropy; an accelerator that knows the seed can subtract the noise)",
                                  _optional(_parse_int), "N")
    verify: bool | None = _opt(None, "check every accelerator result (shape, dtype, finiteness and a randomized "
                               "projection check); default: on for remote accelerators, off for local ones",
                               _optional(_parse_bool))
    verify_sample: float = _opt(VERIFY_SAMPLE, "with verify on: share of each layer's accelerator jobs that also get "
                                "the randomized projection check (a secret draw; a layer's first jobs and one in "
                                "every 8 always do; shape, dtype and finiteness are checked on every job); 1 checks "
                                "every job", _parse_float, "P")
    placement: str = _opt("auto", "auto (a cost model calibrated on this machine keeps a layer fully trusted when "
                          "splitting it would not save trusted time), split (every layer that can be), or trusted",
                          _parse_text, choices=PLACEMENTS)
    micro_batch: int | None = _opt(None, "micro-batches of this many samples, so the trusted side holds one "
                                   "micro-batch's activations at a time (what fits an enclave's memory): inference "
                                   "(no autograd) runs micro-batch by micro-batch; training steps accumulate gradients "
                                   "over micro-batches (asymml.accumulate, used by train and bench), exactly the "
                                   "whole batch's; train-mode BatchNorm is refused",
                                   _optional(_parse_int), "B")
    noise_grads: bool = _opt(True, "also noise released gradient residuals when noise is on", _parse_bool,
                             on_cli=False)
    audit: bool = _opt(False, "record a snapshot of every release in the executor's ledger", _parse_bool,
                       on_cli=False)

    _rank_policy: RankPolicy = field(init=False, repr=False, compare=False, default=None)  # type: ignore[assignment]
    _grad_rank_policy: RankPolicy | None = field(init=False, repr=False, compare=False, default=None)

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        rank, policy = _rank("rank", self.rank)
        set_(self, "rank", rank)
        set_(self, "_rank_policy", policy)
        if self.grad_rank is not None:
            grank, gpolicy = _rank("grad_rank", self.grad_rank)
            set_(self, "grad_rank", grank)
            set_(self, "_grad_rank_policy", gpolicy)
        _choice("mode", self.mode, MODES)
        _choice("backward", self.backward, BACKWARDS)
        _choice("decomposition", self.decomposition, METHODS)
        _choice("basis", self.basis, BASES)
        _choice("placement", self.placement, PLACEMENTS)
        _positive_int("iters", self.iters)
        if self.input_rank is not None and (not _is_int(self.input_rank) or self.input_rank < 1):
            raise ConfigError(f"input_rank must be a positive integer or None, got {self.input_rank!r}")
        _positive_int("epc_bytes", self.epc_bytes)
        if isinstance(self.verify_sample, bool) or not isinstance(self.verify_sample, (int, float)) or not (
                0.0 < self.verify_sample <= 1.0):
            raise ConfigError(f"verify_sample must be a number in (0, 1], got {self.verify_sample!r}")
        if self.micro_batch is not None:
            _positive_int("micro_batch", self.micro_batch)
        _seed("seed", self.seed)
        if self.noise_seed is not None:
            _seed("noise_seed", self.noise_seed)
        for name in ("warm_start", "strict", "noise_grads", "audit"):
            _bool(name, getattr(self, name))
        if self.verify is not None and not isinstance(self.verify, bool):
            raise ConfigError(f"verify must be True, False or None (automatic), got {self.verify!r}")

    # ------------------------------------------------------------------ derived values
    @property
    def rank_policy(self) -> RankPolicy:
        """The forward rank policy."""
        return self._rank_policy

    @property
    def grad_rank_policy(self) -> RankPolicy | None:
        """The gradient rank policy (``None``: each layer's forward rank)."""
        return self._grad_rank_policy

    # ------------------------------------------------------------------ construction helpers
    def replace(self, **changes: Any) -> SplitOptions:
        """A copy with ``changes`` applied (validated)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The option names, in definition order."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.init)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], *, source: str = "config", ignore_unknown: bool = False
                  ) -> SplitOptions:
        """Build from raw values (a config file's mapping, or command-line strings): names may use dashes;
        values are converted like command-line text; unknown names raise :class:`ConfigError` unless
        ``ignore_unknown`` (for configs that hold other options too)."""
        specs = {s.name: s for s in option_specs(cli_only=False)}
        kw: dict[str, Any] = {}
        for key, raw in values.items():
            name = str(key).replace("-", "_")
            spec = specs.get(name)
            if spec is None:
                if ignore_unknown:
                    continue
                raise ConfigError(f"{source}: unknown split option {key!r}; known: {', '.join(specs)}")
            try:
                kw[name] = spec.parse(raw)
            except ConfigError as e:
                raise ConfigError(f"{source}: invalid value for {spec.cli}: {e}") from None
        return cls(**kw)

    @classmethod
    def from_namespace(cls, ns: argparse.Namespace, **overrides: Any) -> SplitOptions:
        """Build from parsed arguments added by :func:`add_arguments` (absent ones keep their defaults)."""
        kw = {n: getattr(ns, n) for n in cls.names() if hasattr(ns, n)}
        kw.update(overrides)
        return cls(**kw)

    @classmethod
    def from_attrs(cls, obj: Any, **overrides: Any) -> SplitOptions:
        """Build from the same-named attributes of ``obj`` (a training or bench config that carries typed
        split fields), then ``overrides``; validated like any construction."""
        kw = {n: getattr(obj, n) for n in cls.names() if hasattr(obj, n)}
        kw.update(overrides)
        return cls(**kw)

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-friendly values (a rank policy object becomes its description)."""
        out = {n: getattr(self, n) for n in self.names()}
        for n in ("rank", "grad_rank"):
            v = out[n]
            if isinstance(v, RankPolicy):
                out[n] = v.describe()
            elif isinstance(v, tuple):
                out[n] = list(v)
        return out


# ------------------------------------------------------------------------------ command line


@dataclass(frozen=True)
class OptionSpec:
    """One option as the command line and config files see it (generated from :class:`SplitOptions`)."""

    name: str
    default: Any
    help: str
    parse: Callable[[Any], Any]
    metavar: str | None
    choices: tuple[str, ...] | None
    is_flag: bool

    @property
    def cli(self) -> str:
        return "--" + self.name.replace("_", "-")


def option_specs(include: Iterable[str] | None = None, exclude: Iterable[str] = (), *, cli_only: bool = True
                 ) -> tuple[OptionSpec, ...]:
    """The options of :class:`SplitOptions` as :class:`OptionSpec` (in definition order), for configs that
    embed them in their own option tables. ``cli_only`` leaves out options that only make sense in Python
    (``audit``, ``noise_grads``)."""
    inc = None if include is None else set(include)
    exc = set(exclude)
    known = set(SplitOptions.names())
    unknown = ((inc or set()) | exc) - known
    if unknown:
        raise ConfigError(f"unknown split option(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}")
    out = []
    for f in dataclasses.fields(SplitOptions):
        if not f.init or (inc is not None and f.name not in inc) or f.name in exc:
            continue
        if cli_only and not f.metadata["on_cli"]:
            continue
        out.append(OptionSpec(f.name, f.default, f.metadata["help"], f.metadata["parse"], f.metadata["metavar"],
                              f.metadata["choices"], isinstance(f.default, bool)))
    return tuple(out)


class _Flag(argparse.Action):
    """``--X`` / ``--no-X`` (like ``argparse.BooleanOptionalAction``, which appends its own default text)."""

    def __init__(self, option_strings: list[str], dest: str, **kw: Any) -> None:
        opts = [*option_strings, *("--no-" + o[2:] for o in option_strings if o.startswith("--"))]
        super().__init__(opts, dest, nargs=0, **kw)

    def __call__(self, parser: argparse.ArgumentParser, ns: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        setattr(ns, self.dest, not (option_string or "").startswith("--no-"))

    def format_usage(self) -> str:
        return " | ".join(self.option_strings)


class _ArgType:
    """argparse ``type=``: a converter's ConfigError becomes an argparse error with its message."""

    def __init__(self, spec: OptionSpec) -> None:
        self.spec = spec
        self.__name__ = spec.name

    def __call__(self, value: str) -> Any:
        try:
            return self.spec.parse(value)
        except ConfigError as e:
            raise argparse.ArgumentTypeError(str(e)) from None


def add_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup, include: Iterable[str] | None = None,
                  exclude: Iterable[str] = (), *, suppress_defaults: bool = False) -> None:
    """Add ``--rank``, ``--decomposition``, ... to ``parser`` (booleans as ``--X/--no-X``).

    With ``suppress_defaults``, options not given stay absent from the namespace (so a config file can
    fill them before the defaults apply); :meth:`SplitOptions.from_namespace` reads either form.
    """
    for spec in option_specs(include, exclude):
        shown = "automatic" if spec.default is None and spec.name == "verify" else spec.default
        if isinstance(shown, bool):
            shown = "on" if shown else "off"
        kw: dict[str, Any] = {"dest": spec.name, "help": f"{spec.help} [default: {shown}]"}
        kw["default"] = argparse.SUPPRESS if suppress_defaults else spec.default
        if spec.is_flag or spec.name == "verify":
            kw["action"] = _Flag
        else:
            kw["type"] = _ArgType(spec)
            if spec.choices:
                kw["choices"] = spec.choices
            if spec.metavar:
                kw["metavar"] = spec.metavar
        parser.add_argument(spec.cli, **kw)
