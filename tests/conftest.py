"""Shared helpers for the test-suite."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def _deterministic_machine_model() -> None:
    """The cost-aware placement (``placement="auto"``) decides from rates measured on the machine, so a
    test model's layers could split or stay trusted depending on the load of the moment. The suite runs
    on a fixed machine model instead (a calibration file in a private cache directory, inherited by the
    command-line tests' subprocesses) in which dense convolution is slow: every layer that can be split
    is split, which is what the exactness, ledger and privacy tests need to see. The planner's own tests
    (tests/core/test_planner.py) install other rates."""
    import json
    import os
    import tempfile

    cache = Path(tempfile.mkdtemp(prefix="asymml-test-cache-"))
    from asymml.planner import CALIBRATION_VERSION

    rates = {"conv_flops": 1e6, "gemm_flops": 1e15, "bandwidth": 1e15, "op_overhead": 0.0, "pilot": False,
             "version": CALIBRATION_VERSION}
    (cache / "calibration.json").write_text(json.dumps({str(t): {**rates, "threads": t} for t in range(1, 257)}))
    os.environ["ASYMML_CACHE"] = str(cache)


_deterministic_machine_model()

torch.set_num_threads(max(1, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _collect_garbage():
    """Split modules hold executor threads and weight caches in reference cycles: free them per test."""
    yield
    import gc

    gc.collect()


def rel_err(a: torch.Tensor, b: torch.Tensor, floor: float = 0.0) -> float:
    """‖a − b‖ / max(‖b‖, floor)."""
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / max(float(b.norm()), floor, 1e-300))


def compare_with_reference(model, x, *, seed: int = 1, **split_kwargs):
    """Run ``asymml.split(model)`` and an untouched deep copy on ``x`` with the same RNG state; backprop
    the same loss. Returns (output error, worst parameter-gradient error, split module, ref model).

    Gradient errors are relative per parameter, against max(‖own gradient‖, 1% of the global gradient
    norm): gradients that are mathematically zero (a conv bias followed by train-mode BatchNorm) are pure
    round-off in *both* models (a sum of values that cancel, reduced in a different order), so they are
    compared to the model's gradient scale instead of to their own round-off.
    """
    import asymml

    ref = copy.deepcopy(model)
    # every layer split: the cost-aware default may keep a small test model's layers trusted, and the
    # exactness of the *split* is what is tested here
    split_kwargs.setdefault("placement", "split")
    sm = asymml.split(model, **split_kwargs)
    out, out_ref = backprop_pair(sm, ref, x, seed)
    return rel_err(out, out_ref), grad_error(model, ref), sm, ref


def backprop_pair(a, b, x, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``a`` and ``b`` on ``x`` from the same RNG state and backprop the same random cotangent."""
    torch.manual_seed(seed)
    out_a = a(x)
    torch.manual_seed(seed)
    out_b = b(x)
    g = torch.randn(out_a.shape, generator=torch.Generator().manual_seed(7), dtype=out_a.dtype)
    (out_a * g).sum().backward()
    (out_b * g).sum().backward()
    return out_a, out_b


def grad_error(model, ref) -> float:
    """Worst relative parameter-gradient error of ``model`` against ``ref`` (floor: 1% of the global
    gradient norm, see :func:`compare_with_reference`)."""
    ref_grads = [q.grad for q in ref.parameters() if q.grad is not None]
    global_norm = float(torch.sqrt(sum((q.double() ** 2).sum() for q in ref_grads)))
    worst = 0.0
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        if q.grad is None:
            assert p.grad is None or p.grad.abs().max() == 0, f"{n}: unexpected gradient"
            continue
        assert p.grad is not None, f"{n}: gradient missing"
        worst = max(worst, rel_err(p.grad, q.grad, 1e-2 * global_norm))
    return worst


@pytest.fixture
def photo() -> torch.Tensor:
    """A real RGB photo from scikit-image (ships with the package), 64×64, values in [0, 1]."""
    from skimage import data, transform

    img = transform.resize(data.astronaut(), (64, 64), anti_aliasing=True)
    return torch.tensor(img, dtype=torch.float32).permute(2, 0, 1).unsqueeze(0)


def roundoff_sensitivity(model, x, *, rel: float = 3e-7, seed: int = 1) -> float:
    """How far the unsplit model's own parameter gradients move when every convolution output is perturbed
    at float32 round-off level (relative ``rel``), measured like :func:`compare_with_reference`.

    A float32 model in train-mode BatchNorm can be ill-conditioned at round-off level (measured: ResNet-18
    at batch 8, 64 px moves its gradients by 1.8% under 3e-7 perturbations): no computation that rounds
    differently — the split, another thread count, another conv algorithm — can match it closer than this.
    """
    ref = copy.deepcopy(model)
    pert = copy.deepcopy(model)
    g = torch.Generator().manual_seed(3)

    def hook(mod, inp, out):
        return out * (1 + rel * torch.randn(out.shape, generator=g, dtype=out.dtype))

    for mod in pert.modules():
        if isinstance(mod, torch.nn.Conv2d):
            mod.register_forward_hook(hook)
    backprop_pair(pert, ref, x, seed)
    return grad_error(pert, ref)
