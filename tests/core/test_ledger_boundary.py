"""The privacy boundary, proved from the release ledger on real models and real photos."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision

import asymml
from asymml.models import get_model
from asymml.privacy import NoiseConfig

PRIVATE = ("input", "residual", "activation", "grad_residual", "grad")


def _capture(model, x, y, **kw):
    """Run one training step of ``split(model, audit=True)``; return the split module and what the trusted
    side held: raw input, every full activation and every full activation gradient."""
    acts: dict[str, torch.Tensor] = {}
    grads: dict[str, torch.Tensor] = {}

    def fwd_hook(name):
        def hook(mod, inp, out):
            if isinstance(out, torch.Tensor):
                acts[name] = out.detach().clone()
                if out.requires_grad:
                    out.register_hook(lambda g: grads.__setitem__(name, g.detach().clone()))
        return hook

    handles = [m.register_forward_hook(fwd_hook(n)) for n, m in model.named_modules() if n]
    sm = asymml.split(model, audit=True, **kw)
    out = sm(x)
    loss = F.cross_entropy(out, y)
    loss.backward()
    for h in handles:
        h.remove()
    return sm, out.detach(), acts, grads


def _is_scaled_copy(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-3) -> bool:
    """True if ``a`` equals ``c·b`` for some scalar ``c`` (per sample) up to ``tol`` relative error."""
    if a.shape != b.shape:
        return False
    a2, b2 = a.reshape(a.shape[0], -1).double(), b.reshape(b.shape[0], -1).double()
    for u, v in zip(a2, b2):
        if v.norm() == 0:
            continue
        c = (u @ v) / (v @ v)
        if (u - c * v).norm() <= tol * max(float(u.norm()), 1e-12) and u.norm() > 0:
            return True
    return False


@pytest.mark.parametrize("name,backward", [("resnet18", "protected"), ("vgg11_bn", "protected"),
                                           ("mobilenet_v2", "protected"), ("resnet18", "paper")])
def test_no_private_tensor_released(name: str, backward: str, photo: torch.Tensor) -> None:
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, num_classes=10)
    x = torch.cat([photo, photo.flip(-1), photo.flip(-2)])  # real photos, batch 3
    y = torch.tensor([1, 4, 7])
    sm, logits, acts, grads = _capture(model, x, y, backward=backward)
    ledger = sm.executor.ledger
    private = [r for r in ledger if r.kind in PRIVATE]
    assert private, "nothing was released: the split did not run"
    assert {r.kind for r in private} <= {"residual", "grad_residual", "grad"}
    for r in private:
        t = r.tensor
        assert not _is_scaled_copy(t, x), f"{r.layer}: raw input released"
        for n, a in acts.items():
            assert not _is_scaled_copy(t, a), f"{r.layer}: full activation of {n} released"
        if backward == "protected":
            assert r.kind != "grad"
            for n, g in grads.items():
                assert not _is_scaled_copy(t, g), f"{r.layer}: full activation gradient of {n} released"
        # labels and logits never leave the trusted side
        assert t.shape != logits.shape or not torch.allclose(t, logits)
        assert t.dtype not in (torch.int64, torch.int32)
    # the executor never received integer tensors (labels) or anything with the logits' shape
    assert all(r.shape != tuple(logits.shape) for r in ledger if r.kind != "weight")


def test_input_release_energy_on_natural_photos() -> None:
    """On natural photos the rank-1 input-layer release carries ≤ 10% of the input's energy."""
    from skimage import data, transform

    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    x = torch.stack([
        torch.tensor(transform.resize(p, (64, 64), anti_aliasing=True), dtype=torch.float32).permute(2, 0, 1)
        for p in photos
    ])
    model = torchvision.models.resnet18(num_classes=10)
    sm = asymml.split(model, audit=True, input_rank=1)
    with torch.no_grad():
        sm(x)
    rel = [r for r in sm.executor.ledger if r.layer == "input"]
    assert len(rel) == 1 and rel[0].kind == "residual"
    energy = rel[0].tensor.pow(2).sum((1, 2, 3)) / x.pow(2).sum((1, 2, 3))
    assert float(energy.max()) <= 0.10, energy
    assert torch.allclose(sm.release_stats()["input"]["energy_ratio"], energy, rtol=1e-4, atol=1e-7)


def test_plain_mode_releases_input_and_trusted_only_releases_nothing() -> None:
    model = get_model("resnet20", num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    sm = asymml.split(model, mode="plain", audit=True)
    sm(x).sum().backward()
    assert [r.kind for r in sm.executor.ledger if r.kind != "weight"][0] == "input"
    sm = asymml.split(model, mode="trusted-only", audit=True)
    sm(x).sum().backward()
    assert len(sm.executor.ledger) == 0


def test_noise_only_releases_noised_whole_activations() -> None:
    model = asymml.fix(get_model("resnet20", num_classes=10), privacy=True)  # GroupNorm: samples independent
    x = torch.rand(2, 3, 32, 32)
    sm = asymml.split(model, mode="noise-only", audit=True, noise=NoiseConfig(sigma=1.0, clip=1.0))
    sm(x).sum().backward()
    acts = [r for r in sm.executor.ledger if r.kind == "activation"]
    assert acts and all(r.kind in ("activation", "grad_residual", "weight") for r in sm.executor.ledger)
    first = acts[0].tensor
    assert not _is_scaled_copy(first, x, tol=0.5)  # σ·c noise on a norm-≤c signal: far from the input


def test_weights_released_once_per_value() -> None:
    """Weights are public: sent when their value changes (once per optimizer step), not per call."""
    model = get_model("resnet20", num_classes=10)
    sm = asymml.split(model, audit=True, rank=2)  # every conv input split: every conv weight is sent
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(2, 3, 32, 32)
    for _ in range(2):
        sm(x).sum().backward()
        sm(x)  # a second forward with the same weights releases no weight again
        opt.step()
        opt.zero_grad()
    w = [r for r in sm.executor.ledger if r.kind == "weight"]
    n_conv = sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    assert len(w) == 2 * n_conv


def test_eval_outputs_stay_exact_when_running_stats_change() -> None:
    """Weights are cached by identity+version: changed BatchNorm statistics must reach the accelerator."""
    torch.manual_seed(0)
    model = get_model("resnet20", num_classes=10).eval()
    sm = asymml.split(model, rank=2)
    x = torch.randn(2, 3, 32, 32)
    for k in range(3):
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.running_var.copy_(torch.rand_like(m.running_var) * 0.02 + 0.01 * (k + 1))
                    m.running_mean.normal_(0, 0.01)
            a, b = sm(x), model(x)
        assert b.norm() > 1e-3
        assert float((a - b).norm() / b.norm()) < 1e-5, k


def test_weight_cache_is_not_fooled_by_reused_ids() -> None:
    """A new tensor may get the id of a freed one: the cache must not hand out the stale copy."""
    ex = asymml.LocalExecutor("cpu")
    for k in range(50):
        w = torch.full((4,), float(k))
        got = ex._weights({"w": w}, "layer")["w"]
        assert torch.equal(got, w), k
        del w
    assert len(ex._weight_versions) <= 1


def test_noise_with_coupled_samples_is_refused() -> None:
    """With noise on, a train-mode BatchNorm (each release would depend on the whole batch) is refused
    before anything is released, with a message that says what to do."""
    model = get_model("resnet20", num_classes=10).train()
    ex = asymml.LocalExecutor("cpu", audit=True)
    with pytest.raises(asymml.PrivacyConfigError, match=r"BatchNorm.*asymml\.fix\(model, privacy=True\)"):
        asymml.split(model, noise=NoiseConfig(sigma=1.0, clip=1.0), executor=ex)
    model.eval()  # eval-mode BatchNorm uses running statistics: accepted
    sm = asymml.split(model, noise=NoiseConfig(sigma=1.0, clip=1.0), executor=ex)
    model.train()  # and switching back to training is refused at the next forward, before any release
    with pytest.raises(asymml.PrivacyConfigError):
        sm(torch.rand(2, 3, 32, 32))
    assert len(ex.ledger) == 0


def test_noised_power_starts_are_secret_and_fresh() -> None:
    """With noise on, the power iteration's random starts are drawn from OS entropy for every call, not by
    batch position from the publicly seeded stream (which would make a sample's release depend on which
    other samples are in the batch), and warm starts are off; without noise the seeded stream is used."""
    model = asymml.fix(get_model("resnet20", num_classes=10), privacy=True)
    noised = asymml.split(model, noise=NoiseConfig(sigma=1.0, clip=1.0))
    a, b = noised.release_path.starts(), noised.release_path.starts()
    assert a is not noised.release_path.generator and a.initial_seed() != b.initial_seed()
    assert not noised.release_path.warm_starts
    plain = asymml.split(model)
    assert plain.release_path.starts() is plain.release_path.generator and plain.release_path.warm_starts


def test_updated_weights_and_running_statistics_are_private_derived() -> None:
    """A weight's first release is its public initial value; released again after an optimizer step it
    derives from the private batch, and eval-mode BatchNorm statistics always do: the ledger says so."""
    model = get_model("resnet20", num_classes=10)
    sm = asymml.split(model, audit=True, rank=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.rand(2, 3, 32, 32)
    sm(x).sum().backward()
    first = [r for r in sm.executor.ledger if r.kind == "weight"]
    assert first and not any(r.private_derived for r in first)
    opt.step()
    n = len(sm.executor.ledger)
    sm(x).sum().backward()
    again = [r for r in sm.executor.ledger[n:] if r.kind == "weight"]
    assert again and all(r.private_derived for r in again)
    model.eval()
    n = len(sm.executor.ledger)
    with torch.no_grad():
        sm(x)
    stats = [r for r in sm.executor.ledger[n:] if r.kind == "weight" and r.layer.endswith("running_var")]
    assert stats and all(r.private_derived for r in stats)
    assert sm.executor.ledger.derived_weight_bytes > 0
