"""The training loop behind ``asymml train``: learning, exactness against plain, checkpoints and resume,
the summary and what it promises (all on tiny digits runs, CPU)."""

from __future__ import annotations

import json
import math
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from asymml.errors import CheckpointError, ConfigError
from asymml.training import TrainConfig, Trainer, load_checkpoint, load_config_file, prepare, train
from asymml.training.config import RUNTIME_FIELDS

# a tiny run: 16x16 digits, narrow VGG, 256 training images in 8 steps of 32 per epoch
# (one torch thread: steady timings on a busy 2-core machine, and the same reduction order in every mode)
TINY: dict[str, Any] = dict(image_size=16, width=0.25, limit_train=256, limit_test=200, batch_size=32,
                            test_batch_size=200, lr=0.05, progress=False, log_every=4, threads=1,
                            noise_seed=7)  # replayable noise: runs are compared step by step


@pytest.fixture(autouse=True, scope="module")
def _restore_threads() -> Iterator[None]:
    """Runs here set torch's thread count; give the next test module the count it had."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _run(out: Path, callback: Any = None, **options: Any) -> tuple[dict[str, Any], list[float]]:
    """Train (or resume, with ``resume=...``) and return the summary and the per-step losses."""
    losses: list[float] = []

    def record(trainer: Trainer, info: dict[str, Any]) -> None:
        losses.append(info["loss"])
        if callback is not None:
            callback(trainer, info)

    summary = train({**TINY, "out": str(out), **options}, callback=record, echo=lambda s: None)
    return summary, losses


class Killed(Exception):
    """Stands for the process dying (no handler runs, nothing is saved)."""


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """An uninterrupted asym run without noise (2 epochs, 16 steps): what resumed runs must equal bit for bit
    (a noised run cannot: a resumed run draws fresh noise by design)."""
    out = tmp_path_factory.mktemp("ref")
    summary, losses = _run(out, epochs=2)
    return {"out": out, "summary": summary, "losses": losses}


@pytest.fixture(scope="module")
def noised(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A release-noised run with an adaptive clip (not accounted end to end: no DP on updates)."""
    out = tmp_path_factory.mktemp("noised")
    summary, losses = _run(out, epochs=1, noise=0.05, clip="auto", limit_train=64)
    return {"out": out, "summary": summary, "losses": losses}


def test_asym_learns_and_equals_plain_without_noise(tmp_path: Path) -> None:
    asym, asym_losses = _run(tmp_path / "asym", mode="asym", epochs=2, tensorboard=False)
    plain, plain_losses = _run(tmp_path / "plain", mode="plain", epochs=2, tensorboard=False)
    assert asym["status"] == "completed" and len(asym_losses) == 2 * 8
    assert asym_losses[-1] < 0.6 * asym_losses[0]
    assert asym["test_accuracy"] > 0.4, asym["history"]  # chance is 0.1
    # same seed, noise off: the split changes nothing but round-off (measured: <= 3e-7 relative). Longer
    # runs at this learning rate are chaotic: plain itself with 1 vs 2 threads drifts apart after ~10 steps
    a, p = torch.tensor(asym_losses, dtype=torch.float64), torch.tensor(plain_losses, dtype=torch.float64)
    assert torch.allclose(a, p, rtol=1e-4, atol=0), ((a - p).abs() / p).max()
    assert abs(asym["test_accuracy"] - plain["test_accuracy"]) <= 2 / 200


def test_summary_has_every_promised_field(reference: dict[str, Any]) -> None:
    out, s = reference["out"], reference["summary"]
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["test_accuracy"] == s["test_accuracy"]
    for key in ("config", "test_accuracy", "best_test_accuracy", "epoch_seconds", "time_split", "privacy",
                "history", "status", "train_loss", "files", "accelerator"):
        assert key in on_disk, key
    assert on_disk["config"]["model"] == "vgg11_bn" and on_disk["config"]["noise"] is None
    assert len(on_disk["epoch_seconds"]) == 2 and all(t > 0 for t in on_disk["epoch_seconds"])
    split = on_disk["time_split"]
    assert split["trusted_s"] > 0 and split["accelerator_s"] > 0
    assert 0 <= on_disk["test_accuracy"] <= on_disk["best_test_accuracy"] <= 1
    priv = on_disk["privacy"]
    assert set(priv) == {"epsilon", "delta", "covers", "notes"}  # SPEC §7
    assert priv["epsilon"] is None and priv["covers"] == [] and "no noise" in priv["notes"][0]
    assert on_disk["accelerator"] == "cpu" and on_disk["model"]["norm"] == "batch"
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))


def test_release_noise_without_update_noise_reports_null_epsilon(noised: dict[str, Any]) -> None:
    s = json.loads((noised["out"] / "summary.json").read_text())
    priv = s["privacy"]
    assert priv["epsilon"] is None and s["epsilon"] is None
    assert "updates" not in priv["covers"] and "activations" in priv["covers"]
    assert "not fully covered" in priv["notes"][0]
    assert any("weight updates are not noised" in n for n in priv["notes"])
    assert any("adaptive clip" in n for n in priv["notes"])
    assert s["privacy_accounting"]["accountant"]["steps"] == 2  # 64 samples in batches of 32
    assert s["config"]["norm"] == "group" and s["config"]["warm_start"] is False  # noise: per-sample defaults


def test_tensorboard_has_losses_ranks_and_energy_histograms(reference: dict[str, Any]) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(reference["out"] / "tensorboard"), size_guidance={"histograms": 0, "scalars": 0})
    acc.Reload()
    scalars, hists = acc.Tags()["scalars"], acc.Tags()["histograms"]
    for tag in ("train/loss", "train/lr", "epoch/test_accuracy", "epoch/train_loss"):
        assert tag in scalars, (tag, scalars)
    assert any(t.startswith("rank/") for t in scalars)
    assert any(t.startswith("residual_energy/") for t in hists) and "rank/all_layers" in hists


def test_model_pt_is_a_plain_state_dict(reference: dict[str, Any]) -> None:
    from asymml.models import get_model

    state = torch.load(reference["out"] / "model.pt", weights_only=True)
    model = get_model("vgg11_bn", num_classes=10, in_channels=1, image_size=16, width=0.25)
    model.load_state_dict(state)  # strict: the user model's own keys, nothing of asymml
    ckpt = load_checkpoint(reference["out"] / "checkpoint.pt")
    assert all(torch.equal(state[k], v) for k, v in ckpt["model"].items())


def test_resume_after_a_killed_run_is_bit_for_bit(reference: dict[str, Any], tmp_path: Path) -> None:
    def die(trainer: Trainer, info: dict[str, Any]) -> None:
        if info["global_step"] == 11:  # in the middle of epoch 2
            raise Killed

    with pytest.raises(Killed):
        _run(tmp_path, die, epochs=2)
    assert load_checkpoint(tmp_path / "checkpoint.pt")["epoch"] == 1  # the last epoch checkpoint survives
    summary, losses = _run(tmp_path, resume="")  # bare --resume: the checkpoint in --out
    ref = reference["summary"]
    assert losses == reference["losses"][8:]  # bit for bit, from the first step after the checkpoint
    assert summary["test_accuracy"] == ref["test_accuracy"]
    a = torch.load(tmp_path / "model.pt", weights_only=True)
    b = torch.load(reference["out"] / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_ctrl_c_saves_mid_epoch_and_resumes_bit_for_bit(reference: dict[str, Any], tmp_path: Path) -> None:
    def interrupt(trainer: Trainer, info: dict[str, Any]) -> None:
        if info["global_step"] == 5:
            os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C does

    before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN in a background job
    summary, losses = _run(tmp_path, interrupt, epochs=2)
    assert summary["status"] == "interrupted" and len(losses) == 5
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    assert (ckpt["epoch"], ckpt["step_in_epoch"]) == (0, 5)
    assert signal.getsignal(signal.SIGINT) is before  # handler restored
    summary, losses = _run(tmp_path, resume=str(tmp_path / "checkpoint.pt"))
    assert losses == reference["losses"][5:]
    assert summary["status"] == "completed" and summary["test_accuracy"] == reference["summary"]["test_accuracy"]


def test_checkpoint_from_another_configuration_is_refused(reference: dict[str, Any]) -> None:
    with pytest.raises(CheckpointError) as e:
        prepare({"resume": str(reference["out"]), "model": "vgg13_bn", "lr": 0.1})
    msg = str(e.value)
    assert "--model: 'vgg11_bn' in the checkpoint, 'vgg13_bn' now" in msg and "--lr" in msg
    cfg, ckpt = prepare({"resume": str(reference["out"]), "epochs": 3, "progress": True})  # run-time options
    assert cfg.epochs == 3 and ckpt is not None and cfg.model == "vgg11_bn"


def test_corrupt_and_foreign_checkpoints_are_refused(reference: dict[str, Any], tmp_path: Path) -> None:
    good = (reference["out"] / "checkpoint.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(good[: len(good) // 2])
    (tmp_path / "garbage.pt").write_bytes(os.urandom(4096))
    for name in ("truncated.pt", "garbage.pt"):
        with pytest.raises(CheckpointError, match="not a readable checkpoint"):
            load_checkpoint(tmp_path / name)
    torch.save({"w": torch.zeros(2)}, tmp_path / "bare.pt")
    with pytest.raises(CheckpointError, match="bare state_dict"):
        load_checkpoint(tmp_path / "bare.pt")
    with pytest.raises(CheckpointError, match="no checkpoint"):
        prepare({"resume": str(tmp_path / "missing")})


def test_new_run_refuses_to_overwrite_a_checkpoint(reference: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match="already holds a checkpoint"):
        Trainer(TrainConfig(**{**TINY, "out": str(reference["out"])}))


def test_epsilon_target_solves_sigma_and_is_met(tmp_path: Path) -> None:
    opts = dict(epochs=1, epsilon=50.0, limit_train=64, batch_size=16, tensorboard=False, noise_seed=None)
    summary, losses = _run(tmp_path, **opts)
    priv, acct = summary["privacy"], summary["privacy_accounting"]
    assert acct["noise_multiplier"] > 0 and acct["releases_per_step_planned"] > 1
    assert 0 < priv["epsilon"] <= 50.0 * 1.001 and summary["epsilon"] == priv["epsilon"]
    assert {"activations", "gradients", "updates", "sampling"} <= set(priv["covers"])
    # every step accounts one sample's releases plus its noised update, Poisson sampled at q = 16/64
    assert sum(acct["accountant"]["releases"].values()) == 4 * acct["releases_per_step_planned"]
    assert acct["accountant"]["steps"] == 4 and all(g["amplified"] for g in acct["accountant"]["groups"])
    assert acct["sampling"]["kind"] == "poisson" and acct["sampling"]["sample_rate"] == 0.25
    assert acct["updates"]["clip"] == 1.0 and "SecureGenerator" in acct["sampling"]["generator"]
    assert all(math.isfinite(v) for v in losses)


def test_paper_backward_with_noise_reports_null_epsilon(tmp_path: Path) -> None:
    summary, _ = _run(tmp_path, epochs=1, noise=1.0, backward="paper", limit_train=64, tensorboard=False)
    priv = summary["privacy"]
    assert priv["epsilon"] is None and "gradients" not in priv["covers"] and "updates" not in priv["covers"]
    assert any("released without noise" in n for n in priv["notes"])
    assert json.loads((tmp_path / "summary.json").read_text())["privacy"]["epsilon"] is None  # strict JSON
    with pytest.raises(ConfigError, match="--epsilon needs --backward protected"):
        TrainConfig(epsilon=1.0, backward="paper").validate()


def test_config_files_and_option_validation(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("model: resnet20\nlr: 0.1\nrank: adaptive:0.1\nwarm-start: false\n"
                                     "micro-batch: 8\n")
    (tmp_path / "b.toml").write_text('[train]\nepochs = 3\nmode = "plain"\n')
    cfg, _ = prepare({"lr": 0.2}, str(tmp_path / "a.yaml"))
    assert (cfg.model, cfg.lr, cfg.rank, cfg.warm_start) == ("resnet20", 0.2, "adaptive:0.1", False)
    assert cfg.micro_batch == 8 and cfg.split_options().micro_batch == 8
    cfg, _ = prepare({}, str(tmp_path / "b.toml"))
    assert (cfg.epochs, cfg.mode) == (3, "plain")
    assert load_config_file(tmp_path / "b.toml") == {"epochs": 3, "mode": "plain"}
    (tmp_path / "bad.yaml").write_text("epochs: -1\n")
    with pytest.raises(ConfigError, match="--epochs"):
        prepare({}, str(tmp_path / "bad.yaml"))
    (tmp_path / "unknown.toml").write_text("learning_rate = 0.1\n")
    with pytest.raises(ConfigError, match="unknown option 'learning_rate'"):
        prepare({}, str(tmp_path / "unknown.toml"))
    for bad, match in ((dict(noise=1.0, epsilon=1.0), "conflicting"), (dict(mode="plain", noise=1.0), "no effect"),
                       (dict(model="resnet18", width=0.5), "--width"), (dict(rank="banana"), "--rank"),
                       (dict(tau=0.1, rank="4"), "--tau"), (dict(micro_batch=0), "--micro-batch"),
                       (dict(warm_start="no"), "--warm-start"), (dict(decomposition="qr"), "invalid decomposition")):
        with pytest.raises(ConfigError, match=match):
            TrainConfig(**bad).validate()
    assert "epochs" in RUNTIME_FIELDS and "lr" not in RUNTIME_FIELDS


def test_device_spec_accepts_remote_servers() -> None:
    from asymml.training.config import device_spec

    assert device_spec("tcp://10.0.0.2:7777") == "tcp://10.0.0.2:7777"
    assert device_spec("unix:///tmp/asymml.sock") == "unix:///tmp/asymml.sock"
    assert device_spec("CUDA:1") == "cuda:1"
    for bad in ("tcp://host", "gpu", "unix://relative"):
        with pytest.raises(ValueError, match="invalid device"):
            device_spec(bad)
