"""``asymml train`` / ``asymml eval`` from the command line: a tiny run end to end, and every user error
ending in one clear line and a non-zero exit, never a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from asymml.cli.main import main

TINY = ["--image-size", "16", "--width", "0.25", "--limit-train", "128", "--limit-test", "100",
        "--batch-size", "32", "--epochs", "1", "--no-progress", "--threads", "1"]


@pytest.fixture(autouse=True, scope="module")
def _restore_threads() -> Iterator[None]:
    """Runs here set torch's thread count; give the next test module the count it had."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _error(capsys: pytest.CaptureFixture[str], argv: list[str], match: str) -> str:
    """Run ``asymml argv``; expect exit 2 and one error line containing ``match`` (no traceback)."""
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    assert match in err, err
    return err


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", *TINY, "--out", str(out)]) == 0
    return out


def test_train_writes_every_output(run_dir: Path) -> None:
    for name in ("summary.json", "checkpoint.pt", "model.pt", "curves.png"):
        assert (run_dir / name).is_file(), name
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["status"] == "completed" and s["config"]["mode"] == "asym" and s["dataset"]["train_samples"] == 128
    priv = s["privacy"]  # noise off: no epsilon, and the summary says why
    assert priv["epsilon"] is None and priv["covers"] == [] and "no noise" in priv["notes"][0]


def test_help_texts(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["eval", "-h"])
    out = capsys.readouterr().out
    assert "``" not in out
    blocks = out.split("\n  --")
    assert all(b.count("(default") <= 1 for b in blocks), [b for b in blocks if b.count("(default") > 1]
    with pytest.raises(SystemExit):
        main(["train", "-h"])
    out = " ".join(capsys.readouterr().out.split())
    for text in ("tcp://HOST:PORT", "unix:///PATH", "--request-timeout", "--tls-cert", "--tls-key", "--tls-ca",
                 "--checkpoint-every-steps", "--checkpoint-every-minutes", "--update-clip"):
        assert text in out, text


@pytest.mark.parametrize("mode", ["asym", "plain", "trusted-only", "noise-only"])
def test_eval_in_any_mode(run_dir: Path, mode: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", str(run_dir), "--mode", mode, "--json", "--no-progress"]) == 0
    res = json.loads(capsys.readouterr().out)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert res["mode"] == mode and res["samples"] == 100
    assert res["test_accuracy"] == pytest.approx(summary["test_accuracy"], abs=0.011)  # noise off: round-off


def test_eval_of_the_bare_state_dict(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", str(run_dir / "model.pt"), "--mode", "plain"]) == 0
    assert "test accuracy" in capsys.readouterr().out


def test_resume_continues_and_config_file_options(run_dir: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "run.yaml"
    cfg.write_text("epochs: 2\nlog-every: 2\n")
    assert main(["train", "--resume", str(run_dir), "--config", str(cfg), "--out", str(tmp_path / "more")]) == 0
    s = json.loads((tmp_path / "more" / "summary.json").read_text())
    assert s["epochs_completed"] == 2 and len(s["history"]) == 2 and s["config"]["log_every"] == 2
    assert "resuming at epoch 2" in capsys.readouterr().out


def test_batch_size_larger_than_the_training_set(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _error(capsys, ["train", *TINY, "--batch-size", "5000", "--out", str(tmp_path)], "larger than the training set")


def test_bad_option_values(capsys: pytest.CaptureFixture[str]) -> None:
    _error(capsys, ["train", "--epochs", "0"], "argument --epochs: must be a positive integer")
    _error(capsys, ["train", "--lr", "fast"], "argument --lr: expected a number")
    _error(capsys, ["train", "--mode", "turbo"], "argument --mode: invalid mode 'turbo'; allowed: asym")
    _error(capsys, ["train", "--micro-batch", "0"], "argument --micro-batch: micro_batch must be a positive integer")
    _error(capsys, ["train", "--input-rank", "0"], "argument --input-rank: input_rank must be a positive integer")
    _error(capsys, ["train", "--rank", "adaptive:x"], "argument --rank")
    _error(capsys, ["train", "--clip", "-1"], "argument --clip")
    _error(capsys, ["train", "--noise", "1", "--epsilon", "2"], "conflicting options --noise and --epsilon")
    _error(capsys, ["train", "--mode", "plain", "--nsr", "0.1"], "no effect in --mode plain")
    _error(capsys, ["train", "--model", "nonet", *TINY], "unknown model 'nonet'")


def test_diverging_run_stops_with_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _error(capsys, ["train", *TINY, "--lr", "1e4", "--epochs", "2", "--out", str(tmp_path)], "lower --lr")


def test_missing_dataset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = _error(capsys, ["train", "--dataset", "cifar10", "--data-dir", str(tmp_path), "--out",
                          str(tmp_path / "o")], "cifar10 not found")
    assert str(tmp_path) in err and "--download" in err
    assert err.count("\n") == 1


def test_corrupt_and_mismatched_checkpoints(run_dir: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "checkpoint.pt"
    bad.write_bytes((run_dir / "checkpoint.pt").read_bytes()[:1000])
    _error(capsys, ["eval", str(bad)], "not a readable checkpoint")
    _error(capsys, ["train", "--resume", str(bad)], "not a readable checkpoint")
    _error(capsys, ["train", "--resume", str(run_dir), "--model", "resnet20", "--width", "0.5"],
           "--model: 'vgg11_bn' in the checkpoint, 'resnet20' now")
    _error(capsys, ["train", "--resume", str(tmp_path / "nothing")], "no checkpoint at")
    _error(capsys, ["train", *TINY, "--out", str(run_dir)], "already holds a checkpoint")
    torch.save({"weight": torch.zeros(3)}, tmp_path / "other.pt")
    _error(capsys, ["eval", str(tmp_path / "other.pt")], "does not fit model")


def test_console_script_error_has_no_traceback(tmp_path: Path) -> None:
    exe = Path(sys.executable).with_name("asymml")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "asymml.cli.main"]
    p = subprocess.run([*cmd, "train", "--batch-size", "-3"], capture_output=True, text=True, timeout=120,
                       cwd=tmp_path, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "argument --batch-size: must be a positive integer" in p.stderr


def test_nproc_per_node_forwards_the_options() -> None:
    """``asymml train --nproc-per-node N ...`` hands each rank the same options (parsed back identically)."""
    from asymml.cli.main import build_parser
    from asymml.cli.train import forward_argv
    from asymml.training.config import given_options

    argv = ["train", "--nproc-per-node", "2", "--batch-size", "16", "--no-progress", "--rank", "2,4",
            "--device", "tcp://gpu{rank}:7777", "--clip", "auto", "--trusted-interconnect", "--resume"]
    args = build_parser().parse_args(argv)
    assert args.nproc_per_node == 2
    forwarded = forward_argv(args)
    assert "--nproc-per-node" not in " ".join(forwarded) and forwarded[-1] == "--resume"
    again = build_parser().parse_args(["train", *forwarded])
    assert given_options(again) == given_options(args) and again.nproc_per_node is None


def test_nproc_per_node_propagates_a_failure(tmp_path: Path) -> None:
    """The shortcut runs torchrun (``-m asymml train`` per rank) and exits non-zero when the ranks fail."""
    missing = tmp_path / "no-such-run"
    proc = subprocess.run([sys.executable, "-m", "asymml", "train", "--nproc-per-node", "2", "--resume", str(missing)],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0, proc.stderr[-2000:]
    # the rank that fails first says why; torchrun then stops the other one, which may not get to say it too
    assert proc.stderr.count("no checkpoint at") >= 1, proc.stderr[-2000:]


def test_split_options_are_split_options_own(monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """Every split option of ``asymml train`` is generated from :class:`SplitOptions`: same names, defaults
    (but warm_start's automatic None), help text, converter and validation; a new or changed split option
    that training does not take over fails here."""
    import dataclasses

    from asymml.options import SplitOptions, option_specs
    from asymml.training.config import OPTIONS, SPLIT_OPTIONS_NOT_IN_TRAINING, TrainConfig

    specs = {s.name: s for s in option_specs()}
    split = {o.name: o for o in OPTIONS if o.split is not None}
    assert set(split) | set(SPLIT_OPTIONS_NOT_IN_TRAINING) == set(specs)
    assert not set(split) & set(SPLIT_OPTIONS_NOT_IN_TRAINING)
    assert "micro_batch" in split
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    for name, opt in split.items():
        spec = specs[name]
        assert opt.split == spec and opt.help.startswith(spec.help) and opt.metavar == spec.metavar, name
        assert opt.default == defaults[name] == (None if name == "warm_start" else spec.default), name
    assert TrainConfig().validate().split_options() == SplitOptions()  # warm start: on without noise
    assert TrainConfig(noise=1.0).validate().split_options().warm_start is False
    assert TrainConfig(tau=0.2).split_options().rank == "adaptive:0.2"
    for name, raw in (("rank", "2,4,8"), ("rank", [2, 4]), ("grad_rank", "adaptive:0.1"), ("iters", "3"),
                      ("seed", "7"), ("verify_sample", "0.5"), ("input_rank", "none"), ("micro_batch", "8"),
                      ("decomposition", "EIGH")):
        assert split[name].convert(raw) == getattr(SplitOptions.from_dict({name: raw}), name), (name, raw)
    monkeypatch.setenv("COLUMNS", "100000")  # one line per option: help texts compare whole
    for cmd in ("train", "eval"):
        with pytest.raises(SystemExit):
            main([cmd, "-h"])
        out = capsys.readouterr().out
        for name in split if cmd == "train" else ("rank", "iters", "micro_batch", "verify_sample"):
            assert specs[name].cli in out, (cmd, name)
            if cmd == "train":
                assert split[name].help in out, name


def test_micro_batch_and_split_options_reach_the_split_model(tmp_path: Path) -> None:
    """``--micro-batch`` (a plain int field), config-file keys of the split options, old configurations
    without the field, and ``build_split`` handing ``cfg.split_options()`` to the runtime."""
    from asymml.cli.main import build_parser
    from asymml.training.builders import build_split, noise_config
    from asymml.training.config import TrainConfig, config_diff, given_options
    from asymml.training.run import prepare

    args = build_parser().parse_args(["train", "--micro-batch", "8", "--no-warm-start", "--rank", "4"])
    assert given_options(args) == {"micro_batch": 8, "warm_start": False, "rank": "4"}
    (tmp_path / "c.yaml").write_text("micro-batch: 16\niters: 3\nbasis: batch\nplacement: split\n")
    cfg, _ = prepare({"rank": "4"}, str(tmp_path / "c.yaml"))
    assert (cfg.micro_batch, cfg.iters, cfg.basis, cfg.rank) == (16, 3, "batch", "4")
    old = {k: v for k, v in TrainConfig().to_dict().items() if k != "micro_batch"}  # a pre-micro_batch run
    assert TrainConfig.from_dict(old).micro_batch is None and config_diff(old, TrainConfig().to_dict()) == []
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 2, 1))
    sm = build_split(model, cfg)
    try:
        got = {k: getattr(sm.cfg, k) for k in ("micro_batch", "iters", "basis", "placement", "warm_start")}
        assert got == {"micro_batch": 16, "iters": 3, "basis": "batch", "placement": "split", "warm_start": True}
        assert sm.cfg.rank == cfg.split_options().rank_policy
    finally:
        sm.executor.close()
    from asymml.errors import ConfigError

    with pytest.raises(ConfigError, match="invalid value for --iters"):
        TrainConfig(iters=0).validate()
    with pytest.raises(ConfigError, match="sigma must be a finite number >= 0") as info:
        noise_config(TrainConfig(noise=-1.0))
    assert info.value.__cause__ is None and info.value.__context__ is None  # raised directly, not re-wrapped
