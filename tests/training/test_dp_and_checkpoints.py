"""DP-SGD on updates, the privacy summary, mid-epoch checkpoints and a lost accelerator, checkpoint and
config hygiene (tiny CPU runs, bounded)."""

from __future__ import annotations

import copy
import json
import os
import pickle
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn as nn

import asymml
from asymml.errors import AcceleratorConnectionError, CheckpointError, ConfigError
from asymml.training import TrainConfig, Trainer, load_checkpoint, load_config_file, prepare, train
from asymml.training.batches import Batches, PoissonBatches
from asymml.training.dp import UpdatePrivatizer, trusted_generator

TINY: dict[str, Any] = dict(image_size=16, width=0.25, limit_train=128, limit_test=100, batch_size=16,
                            test_batch_size=100, lr=0.05, progress=False, log_every=4, threads=1,
                            tensorboard=False)


@pytest.fixture(autouse=True, scope="module")
def _restore_threads() -> Iterator[None]:
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _run(out: Path, callback: Any = None, echo: list[str] | None = None, **options: Any
         ) -> tuple[dict[str, Any], list[float]]:
    losses: list[float] = []

    def record(trainer: Trainer, info: dict[str, Any]) -> None:
        losses.append(info["loss"])
        if callback is not None:
            callback(trainer, info)

    sink = echo.append if echo is not None else (lambda s: None)
    return train({**TINY, "out": str(out), **options}, callback=record, echo=sink), losses


def _net() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                         nn.Linear(32, 4))


# ----------------------------------------------------------------------------------- DP-SGD on updates


def test_dp_step_without_noise_equals_the_full_gradient() -> None:
    """Per-sample micro-batches, trusted shares in param.grad, accelerator shares through the sink: with
    no clipping and no noise their sum is exactly the ordinary batch gradient (nothing lost, nothing
    counted twice)."""
    model, ref = _net(), None
    ref = copy.deepcopy(model).double()
    model = model.double()
    x, y = torch.randn(5, 3, 8, 8, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 1])
    import inspect

    force = {"placement": "split"} if "placement" in inspect.signature(asymml.split).parameters else {}
    sm = asymml.split(model, rank=2, warm_start=False, **force)  # split every layer, however small
    priv = UpdatePrivatizer(model.parameters(), clip=1e9, noise_multiplier=0.0, generator=trusted_generator(None))
    public_calls: list[str] = []

    def sink(p: nn.Parameter, g: torch.Tensor) -> None:
        public_calls.append(tuple(p.shape))
        priv.public_sink(p, g)

    sm.public_grad_sink = sink
    for i in range(5):
        nn.functional.cross_entropy(sm(x[i:i + 1]), y[i:i + 1], reduction="sum").backward()
        priv.add_sample()
        assert all(p.grad is None for p in model.parameters())  # taken by the privatizer
    priv.finish(5.0, step=0)
    nn.functional.cross_entropy(ref(x), y, reduction="sum").backward()
    assert public_calls  # the accelerator's share really was kept apart
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.allclose(p.grad, q.grad / 5, rtol=1e-9, atol=1e-12)
    sm.executor.close()


def test_each_sample_is_clipped_to_the_update_clip() -> None:
    w = nn.Parameter(torch.zeros(3))
    b = nn.Parameter(torch.zeros(1))
    priv = UpdatePrivatizer([w, b], clip=1.0, noise_multiplier=0.0, generator=trusted_generator(None))
    w.grad, b.grad = torch.tensor([30.0, 0.0, 0.0]), torch.tensor([40.0])  # norm 50 over all parameters
    assert priv.add_sample() == pytest.approx(50.0)
    w.grad, b.grad = torch.tensor([0.0, 0.3, 0.0]), torch.tensor([0.4])  # norm 0.5: kept as is
    priv.add_sample()
    priv.finish(1.0, step=0)
    assert torch.allclose(w.grad, torch.tensor([0.6, 0.3, 0.0])) and torch.allclose(b.grad, torch.tensor([1.2]))
    assert priv.clipped == 1


def test_update_noise_has_std_sigma_times_clip_and_is_fresh() -> None:
    w = nn.Parameter(torch.zeros(40_000))
    gen = trusted_generator(None)
    priv = UpdatePrivatizer([w], clip=0.5, noise_multiplier=2.0, generator=gen)
    priv.finish(4.0, step=0)
    first = w.grad.clone() * 4.0
    assert float(first.std()) == pytest.approx(1.0, rel=0.03) and abs(float(first.mean())) < 0.03
    priv.reset()
    priv.finish(4.0, step=1)
    assert not torch.equal(first, w.grad * 4.0)  # a new draw every step
    other = UpdatePrivatizer([w], clip=0.5, noise_multiplier=2.0, generator=trusted_generator(None))
    other.finish(4.0, step=0)
    assert not torch.equal(first, w.grad * 4.0)  # a new OS key per run: nothing to replay
    torch.manual_seed(0)  # torch's global RNG plays no part
    a = UpdatePrivatizer([w], clip=1.0, noise_multiplier=1.0, generator=trusted_generator(5))
    a.finish(1.0, step=0)
    g = w.grad.clone()
    torch.manual_seed(1)
    UpdatePrivatizer([w], clip=1.0, noise_multiplier=1.0, generator=trusted_generator(5)).finish(1.0, step=0)
    assert torch.equal(g, w.grad)  # --noise-seed: reproducible (and insecure)


def test_poisson_batches_come_from_the_secure_generator() -> None:
    x, y = torch.randn(400, 1, 2, 2), torch.arange(400) % 10
    from asymml.data import ImageTensorDataset

    base = Batches(ImageTensorDataset(x, y), 40)
    a = PoissonBatches(base, trusted_generator(None))
    b = PoissonBatches(base, trusted_generator(None))
    sizes = [len(a.indices(t)) for t in range(20)]
    assert a.steps_per_epoch == 10 and a.sample_rate == 0.1
    assert len(set(sizes)) > 1 and 25 < sum(sizes) / len(sizes) < 55  # Poisson: variable, mean q*n = 40
    torch.manual_seed(0)
    first = a.indices(0)
    torch.manual_seed(0)
    assert not torch.equal(first, b.indices(0))  # unpredictable from torch's (public) seed
    assert torch.equal(first, a.indices(0))  # addressed by step: the same run sees the same batch


def test_accounted_run_covers_updates_and_trains(tmp_path: Path) -> None:
    lines: list[str] = []
    s, losses = _run(tmp_path, echo=lines, epochs=1, epsilon=8.0, limit_train=32, limit_test=50)
    priv = s["privacy"]
    assert set(priv) == {"epsilon", "delta", "covers", "notes"}
    assert {"activations", "gradients", "updates", "sampling"} <= set(priv["covers"])
    assert 0 < priv["epsilon"] <= 8.0 * 1.001 and priv["delta"] == 1e-5
    assert s["model"]["norm"] == "group" and s["config"]["warm_start"] is False
    assert any("1 epoch x 2 steps" in ln for ln in lines), lines  # plural right
    assert s["config"]["clip"] == 1e-6 and s["config"]["placement"] == "split"  # the accounted defaults
    assert any("covers activations, gradients, updates" in ln for ln in lines), lines[-1]
    from asymml.cli.main import main

    assert main(["eval", str(tmp_path), "--json", "--no-progress", "--limit-test", "20"]) == 0  # GroupNorm model
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    # never noise state in a checkpoint: only the decomposition generator and warm-start cache
    assert set(ckpt["split"]) == {"extra_state"}, set(ckpt["split"])
    assert not any("noise" in str(k).lower() for k in ckpt["split"]["extra_state"])


def test_noise_seed_is_marked_insecure_and_gives_no_epsilon(tmp_path: Path) -> None:
    lines: list[str] = []
    s, _ = _run(tmp_path, echo=lines, epochs=1, noise=1.0, limit_train=32, noise_seed=3)
    priv = s["privacy"]
    assert priv["epsilon"] is None and "sampling" not in priv["covers"] and "updates" in priv["covers"]
    assert any("INSECURE" in n for n in priv["notes"]) and any("INSECURE" in ln for ln in lines)


# ------------------------------------------------------------------ checkpoints, lost accelerator


def test_lost_accelerator_names_the_mid_epoch_checkpoint_and_resume_is_bit_exact(tmp_path: Path) -> None:
    ref, ref_losses = _run(tmp_path / "ref", epochs=2)

    def lose(trainer: Trainer, info: dict[str, Any]) -> None:
        if info["global_step"] == 6:
            def gone(*a: Any, **k: Any) -> Any:
                raise AcceleratorConnectionError("connection reset by peer")

            trainer.sm.executor.forward = gone  # the server dies before the next step

    out = tmp_path / "lost"
    with pytest.raises(AcceleratorConnectionError) as e:
        _run(out, lose, epochs=2, checkpoint_every_steps=3)
    msg = str(e.value)
    assert "connection reset by peer" in msg and str(out / "checkpoint.pt") in msg
    assert f"asymml train --resume {out}" in msg and "epoch 1, step 6" in msg and "0 steps since then" in msg
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert (ckpt["epoch"], ckpt["step_in_epoch"]) == (0, 6)  # mid-epoch (8 steps per epoch)
    summary, losses = _run(out, resume="")
    assert losses == ref_losses[6:]  # bit for bit from the mid-epoch checkpoint
    assert summary["test_accuracy"] == ref["test_accuracy"]


def test_a_rejected_result_names_the_checkpoint_too(tmp_path: Path) -> None:
    from asymml.errors import IntegrityError

    def tamper(trainer: Trainer, info: dict[str, Any]) -> None:
        def wrong(*a: Any, **k: Any) -> Any:
            raise IntegrityError("accelerator result for layer 'x' failed verification")

        trainer.sm.executor.forward = wrong

    with pytest.raises(IntegrityError, match="rejected a result of the accelerator cpu at epoch 1, step 2") as e:
        _run(tmp_path, tamper, epochs=1, limit_train=32)
    assert f"asymml train --resume {tmp_path}" in str(e.value) and "failed verification" in str(e.value)


def test_checkpoints_by_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = TrainConfig(**{**TINY, "out": str(tmp_path), "checkpoint_every_minutes": 1.0})
    t = Trainer(cfg, echo=lambda s: None)
    t.save()
    assert not t._checkpoint_due()
    t._ckpt_time -= 61.0
    assert t._checkpoint_due()
    t.sm.executor.close()
    assert TrainConfig().checkpoint_every_minutes is not None  # on by default: a crash loses minutes


def test_checkpoint_writes_fsync_the_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from asymml.training.checkpoint import atomic_save

    kinds: list[bool] = []
    real = os.fsync

    def spy(fd: int) -> None:
        kinds.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    atomic_save({"a": torch.zeros(1)}, tmp_path / "c.pt")
    assert kinds == [False, True]  # the file, then the directory after os.replace


def test_malicious_pickle_is_refused_as_unsafe(tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self) -> Any:
            return (os.system, ("echo owned",))

    torch.save({"format": "asymml-train-checkpoint", "x": Evil()}, tmp_path / "evil.pt")
    (tmp_path / "raw.pt").write_bytes(pickle.dumps({"x": Evil()}))
    for name in ("evil.pt", "raw.pt"):
        with pytest.raises(CheckpointError, match="refused as unsafe") as e:
            load_checkpoint(tmp_path / name)
        assert "corrupt" not in str(e.value)


# ------------------------------------------------------------------------------- configuration


def test_yaml_alias_bomb_and_huge_files_are_refused(tmp_path: Path) -> None:
    bomb = "a: &a [x,x,x,x,x,x,x,x,x]\n" + "".join(
        f"{c}: &{c} [*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p}]\n" for p, c in zip("abcdefgh", "bcdefghi"))
    (tmp_path / "bomb.yaml").write_text(bomb)
    with pytest.raises(ConfigError, match="anchors and aliases"):
        load_config_file(tmp_path / "bomb.yaml")
    (tmp_path / "big.yaml").write_text("lr: 0.1\n" + "#" * (2 << 20))
    with pytest.raises(ConfigError, match="at most"):
        load_config_file(tmp_path / "big.yaml")


@pytest.mark.parametrize("bad, match", [
    (dict(seed=2**70), "at most 2\\*\\*63"), (dict(seed="a"), "--seed"), (dict(warm_start="no"), "a boolean"),
    (dict(epochs=True), "expected a number"), (dict(batch_size=True), "expected a number"),
    (dict(noise_seed=-1), "--noise-seed"), (dict(request_timeout=0), "--request-timeout"),
    (dict(tls_cert="a.pem"), "go together"), (dict(tls_cert="a", tls_key="b"), "remote accelerator"),
    (dict(noise=1.0, warm_start=True), "--warm-start with noise"),
    (dict(epsilon=8.0, norm="batch"), "--norm group"),
])
def test_invalid_values_raise_config_error(bad: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        TrainConfig(**bad).validate()


def test_long_invalid_values_are_not_echoed(tmp_path: Path) -> None:
    (tmp_path / "long.yaml").write_text(f"mode: {'x' * 5000}\n")
    with pytest.raises(ConfigError) as e:
        prepare({}, str(tmp_path / "long.yaml"))
    assert len(str(e.value)) < 400 and "5002 characters" in str(e.value)


def test_batch_larger_than_the_training_set_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="larger than the training set"):
        Trainer(TrainConfig(**{**TINY, "out": str(tmp_path), "batch_size": 500}))


def test_remote_executor_gets_timeout_and_tls_options(monkeypatch: pytest.MonkeyPatch) -> None:
    import asymml.executors.remote as remote
    from asymml.training.builders import accelerator_name, build_executor

    seen: dict[str, Any] = {}

    class Fake:
        def __init__(self, address: str) -> None:
            self.address = remote.parse_address(address)
            self.device = torch.device("cpu")

    def fake_make_executor(spec: str, *, audit: bool = False, tls_cert: str | None = None, tls_key: str | None = None,
                           tls_ca: str | None = None, insecure: bool = False, timeout: float | None = 300.0,
                           verify: bool | None = None) -> Fake:
        seen.update(spec=spec, timeout=timeout, tls=(tls_cert, tls_key, tls_ca), insecure=insecure, verify=verify)
        return Fake(spec)

    monkeypatch.setattr(remote, "make_executor", fake_make_executor)
    cfg = TrainConfig(device="tcp://127.0.0.1:7777", request_timeout=7.5, tls_cert="c.pem", tls_key="k.pem",
                      tls_ca="ca.pem", verify=False).validate()
    ex = build_executor(cfg)
    assert seen == {"spec": "tcp://127.0.0.1:7777", "timeout": 7.5, "tls": ("c.pem", "k.pem", "ca.pem"),
                    "insecure": False, "verify": False}
    assert accelerator_name(ex) == "tcp://127.0.0.1:7777 (cpu)"  # the connection, not "cpu"
    seen.clear()
    build_executor(TrainConfig(device="unix:///tmp/a.sock", insecure=True).validate())
    assert seen["tls"] == (None, None, None) and seen["timeout"] == 60.0 and seen["insecure"] is True


def test_checkpoint_cadence_and_connection_options_may_change_on_resume() -> None:
    from asymml.training.config import RUNTIME_FIELDS

    for name in ("checkpoint_every_steps", "checkpoint_every_minutes", "request_timeout", "tls_cert", "tls_key",
                 "tls_ca", "insecure", "verify", "device"):
        assert name in RUNTIME_FIELDS


def test_config_file_sets_the_new_options(tmp_path: Path) -> None:
    (tmp_path / "c.toml").write_text('checkpoint-every-steps = 50\ncheckpoint_every_minutes = 0.5\n'
                                     'request-timeout = 12\nupdate-clip = 0.5\n')
    cfg, _ = prepare({}, str(tmp_path / "c.toml"))
    assert (cfg.checkpoint_every_steps, cfg.checkpoint_every_minutes, cfg.request_timeout, cfg.update_clip) == \
        (50, 0.5, 12.0, 0.5)
    assert json.loads(json.dumps(cfg.to_dict()))["update_clip"] == 0.5


def test_training_reaches_no_private_members_of_the_runtime() -> None:
    """Issue 8 item 3: state goes through public interfaces (SplitModule.get_extra_state, the mechanism's
    state_dict, executor.synchronize), never the runtime's or the executor's private members."""
    import re

    import asymml.training as training

    never = re.compile(r"\._(gen|warm|noise_gen|pool|counts|clip_state|norms|multipliers|rng)\b")
    for f in Path(training.__file__).parent.glob("*.py"):
        match = never.search(f.read_text())
        assert match is None, (f.name, match)
