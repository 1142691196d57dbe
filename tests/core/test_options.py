"""SplitOptions: one definition per split option, validated once, raising ConfigError directly."""

from __future__ import annotations

import argparse
import dataclasses

import pytest
import torch

import asymml
from asymml.errors import ConfigError
from asymml.options import BACKWARDS, MODES, SplitOptions, add_arguments, option_specs


def _tiny() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 2, 1))


@pytest.mark.parametrize("kw,match", [
    ({"iters": True}, "iters must be a positive integer"),
    ({"input_rank": True}, "input_rank"),
    ({"epc_bytes": True}, "epc_bytes must be a positive integer"),
    ({"epc_bytes": 1.5}, "epc_bytes"),
    ({"seed": True}, r"seed must be an integer in \[0, 2\*\*63\)"),
    ({"seed": 2**63}, "seed must be"),
    ({"seed": 2**70}, "seed must be"),
    ({"seed": -1}, "seed must be"),
    ({"seed": "a"}, "seed must be"),
    ({"noise_seed": 2**64}, "noise_seed must be"),
    ({"warm_start": "no"}, "warm_start must be True or False"),
    ({"warm_start": 0}, "warm_start must be True or False"),
    ({"strict": "yes"}, "strict must be True or False"),
    ({"verify": "on"}, "verify must be"),
    ({"rank": True}, "invalid rank"),
    ({"grad_rank": 0}, "grad_rank: rank must be a positive integer"),
    ({"placement": "gpu"}, "invalid placement"),
])
def test_invalid_values_raise_config_error(kw: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        SplitOptions(**kw)
    if "rank" not in kw and "grad_rank" not in kw:  # raised directly, not re-wrapped from a ValueError
        assert info.value.__cause__ is None and info.value.__context__ is None


@pytest.mark.parametrize("kw", [{"seed": 2**70}, {"warm_start": "no"}, {"epc_bytes": True}, {"seed": "a"},
                                {"verify": "yes"}, {"placement": "fast"}])
def test_split_validates_through_options(kw: dict) -> None:
    with pytest.raises(ConfigError):
        asymml.split(_tiny(), **kw)


def test_split_passes_verify_and_placement_through() -> None:
    sm = asymml.split(_tiny(), verify=True, placement="split")
    assert sm.executor.verify is True and sm.cfg.placement == "split"
    assert asymml.split(_tiny()).executor.verify is False  # None keeps the local executor's default


def test_valid_values_and_frozen() -> None:
    o = SplitOptions(rank=[2, 3], grad_rank="adaptive:0.2", seed=2**63 - 1, noise_seed=0, verify=False)
    assert o.rank == (2, 3) and o.rank_policy.rank_for(5, None) == 3
    assert o.grad_rank_policy is not None and o.to_dict()["rank"] == [2, 3]
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.iters = 3  # type: ignore[misc]
    assert o.replace(iters=3).iters == 3 and o.iters == 2
    with pytest.raises(ConfigError, match="iters"):
        o.replace(iters=0)


def test_from_dict_converts_text_like_the_command_line() -> None:
    o = SplitOptions.from_dict({"rank": "2,4", "warm-start": "no", "input_rank": "none", "seed": "3",
                                "grad_rank": 2, "verify": "true", "epc_bytes": 2**20})
    assert (o.rank, o.warm_start, o.input_rank, o.seed, o.grad_rank, o.verify) == ("2,4", False, None, 3, 2, True)
    with pytest.raises(ConfigError, match="unknown split option 'bogus'"):
        SplitOptions.from_dict({"bogus": 1})
    with pytest.raises(ConfigError, match="invalid value for --iters"):
        SplitOptions.from_dict({"iters": "two"}, source="run.yaml")
    with pytest.raises(ConfigError, match="--rank"):
        SplitOptions.from_dict({"rank": "bogus"})
    assert SplitOptions.from_dict({"lr": 0.1, "iters": 3}, ignore_unknown=True).iters == 3


def test_from_attrs_of_another_config() -> None:
    @dataclasses.dataclass
    class Other:
        rank: str = "4"
        iters: int = 3
        lr: float = 0.1
        warm_start: str = "no"  # typed construction: a string is not a bool

    assert SplitOptions.from_attrs(Other(), warm_start=False).iters == 3
    with pytest.raises(ConfigError, match="warm_start"):
        SplitOptions.from_attrs(Other())


def test_generated_arguments() -> None:
    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args(["--rank", "4", "--no-warm-start", "--iters", "3", "--verify", "--input-rank", "none"])
    o = SplitOptions.from_namespace(args)
    assert (o.rank, o.warm_start, o.iters, o.verify, o.input_rank) == ("4", False, 3, True, None)
    assert SplitOptions.from_namespace(p.parse_args([])) == SplitOptions()
    with pytest.raises(SystemExit):
        p.parse_args(["--iters", "x"])
    with pytest.raises(SystemExit):
        p.parse_args(["--decomposition", "qr"])
    q = argparse.ArgumentParser()
    add_arguments(q, include=["rank", "strict"], suppress_defaults=True)
    assert vars(q.parse_args([])) == {}
    assert "--iters" not in q.format_help() and "[default: schedule]" in q.format_help()


def test_one_definition_per_option() -> None:
    """Every field the runtime reads comes from SplitOptions, and the CLI specs are generated from it."""
    from asymml import runtime

    runtime_fields = {f.name for f in dataclasses.fields(runtime.SplitConfig)}
    assert runtime_fields <= set(SplitOptions.names()), runtime_fields - set(SplitOptions.names())
    assert (runtime.MODES, runtime.BACKWARDS) == (MODES, BACKWARDS)
    assert {s.name for s in option_specs()} == set(SplitOptions.names()) - {"audit", "noise_grads"}
