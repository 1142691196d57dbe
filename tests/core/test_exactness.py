"""Exactness: with noise off, split outputs and every parameter gradient equal the unsplit model's."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torchvision
from conftest import compare_with_reference, roundoff_sensitivity

import asymml
from asymml.models import get_model

TOL = 1e-4

# (backward, decomposition, rank) combinations rotated over the models so that every model sees both
# backward modes and, across the suite, every decomposition and rank policy is exercised.
COMBOS = [
    ("protected", "power", "schedule"),
    ("paper", "eigh", 4),
    ("protected", "rsvd", "adaptive:0.1"),
    ("paper", "svd", [1, 2, 3, 4]),
    ("protected", "eigh", 3),
    ("paper", "power", "adaptive:0.2"),
]

TORCHVISION = ["vgg11", "vgg13", "vgg16", "vgg19", "vgg11_bn", "vgg13_bn", "vgg16_bn", "vgg19_bn",
               "resnet18", "resnet34", "resnet50", "mobilenet_v2"]
CIFAR = ["vgg11", "vgg16_bn", "resnet20"]


def _tv(name: str, small_head: bool = False) -> torch.nn.Module:
    m = torchvision.models.get_model(name, weights=None, num_classes=10)
    if small_head and name.startswith("vgg"):
        # same head structure (avgpool 7×7 → flatten → Linear/ReLU/Dropout ×2 → Linear) with 64 hidden units
        # instead of 4096, so that three float64 copies of the model fit CI memory (the head runs trusted)
        m.classifier[0] = torch.nn.Linear(512 * 7 * 7, 64)
        m.classifier[3] = torch.nn.Linear(64, 64)
        m.classifier[6] = torch.nn.Linear(64, 10)
    return m


CASES = [(f"tv-{n}", lambda n=n: _tv(n, small_head=True)) for n in TORCHVISION] + [
    (f"cifar-{n}", lambda n=n: get_model(n, num_classes=10)) for n in CIFAR
]


@pytest.mark.parametrize("case", range(len(CASES)), ids=[c[0] for c in CASES])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_models_exact_float64(case: int, train: bool) -> None:
    """Every supported architecture, BN in train and eval mode, both backward modes (float64: the
    algorithm is exact, so only round-off of the unsplit model's own arithmetic remains)."""
    name, make = CASES[case]
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(case))
    for k in range(2):
        backward, decomposition, rank = COMBOS[(2 * case + k + train) % len(COMBOS)]
        torch.manual_seed(case)
        m = make().double().train(train)
        out_err, grad_err, _, _ = compare_with_reference(m, x, backward=backward, decomposition=decomposition,
                                                         rank=rank)
        assert out_err <= TOL, (name, backward, decomposition, rank, out_err)
        assert grad_err <= TOL, (name, backward, decomposition, rank, grad_err)


@pytest.mark.parametrize("backward,decomposition,rank", list(itertools.product(
    ["protected", "paper"], ["power", "eigh", "svd", "rsvd"], [2, "schedule", "adaptive:0.1", [1, 3]])))
def test_full_matrix_float32_resnet20(backward: str, decomposition: str, rank) -> None:
    """The full option matrix in float32 on a CIFAR ResNet-20 (eval-mode BN) at the 1e-4 bar."""
    torch.manual_seed(0)
    model = get_model("resnet20", num_classes=10).eval()
    x = torch.randn(4, 3, 32, 32)
    out_err, grad_err, _, _ = compare_with_reference(model, x, backward=backward, decomposition=decomposition,
                                                     rank=rank)
    assert out_err <= TOL and grad_err <= TOL, (out_err, grad_err)


@pytest.mark.parametrize("name", ["resnet18", "vgg11_bn"])
@pytest.mark.parametrize("backward", ["protected", "paper"])
def test_float32_train_mode(name: str, backward: str) -> None:
    """float32 with train-mode BatchNorm (batch 8, 64×64): outputs to 1e-4; parameter gradients to 1e-4 or,
    where the unsplit model itself is ill-conditioned at round-off level, to within 4× of its own
    round-off sensitivity (ResNet-18 here moves its gradients by 1.8% when its convolution outputs are
    perturbed by 3e-7, and the split rounds differently with the thread count). Exactness proper is
    asserted in float64 (test_models_exact_float64)."""
    torch.manual_seed(0)
    model = _tv(name)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    x = torch.randn(8, 3, 64, 64)
    sensitivity = roundoff_sensitivity(model, x)
    out_err, grad_err, _, _ = compare_with_reference(model, x, backward=backward)
    assert out_err <= TOL and grad_err <= max(TOL, 4 * sensitivity), (out_err, grad_err, sensitivity)


@pytest.mark.parametrize("mode", ["trusted-only", "plain", "noise-only"])
def test_other_modes_exact(mode: str) -> None:
    torch.manual_seed(0)
    model = get_model("resnet20", num_classes=10).eval()
    x = torch.randn(3, 3, 32, 32)
    out_err, grad_err, _, _ = compare_with_reference(model, x, mode=mode)
    assert out_err <= TOL and grad_err <= TOL, (out_err, grad_err)


@pytest.mark.parametrize("basis", ["batch", "sample"])
def test_batch_shared_basis_exact(basis: str) -> None:
    torch.manual_seed(0)
    model = _tv("resnet18").eval().double()  # float64: the conv1 gradient of a random net cancels heavily
    x = torch.randn(4, 3, 48, 48, dtype=torch.float64)
    out_err, grad_err, _, _ = compare_with_reference(model, x, basis=basis, rank="schedule")
    assert out_err <= TOL and grad_err <= TOL, (out_err, grad_err)


class _Zoo(torch.nn.Module):
    """Grouped/dilated/strided convs, conv→conv chains, avg-pool, scalar scaling, two-operand adds."""

    def __init__(self) -> None:
        super().__init__()
        nn = torch.nn
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=2, bias=False)
        self.c3 = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8)  # depthwise
        self.c4 = nn.Conv2d(8, 16, 1)
        self.c5 = nn.Conv2d(16, 16, (3, 1), padding=(1, 0))
        self.pool = nn.AvgPool2d(2)
        self.bn = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16 * 4 * 4, 5)

    def forward(self, x):
        a = torch.relu(self.c1(x))
        b = self.c2(a)
        c = self.c3(b + a) * 0.5  # add of two split values, then a depthwise conv
        d = self.c5(self.c4(c))  # linear chain without a merge
        d = self.bn(d) + self.c4(c)
        e = self.pool(torch.relu(d))
        return self.fc(torch.flatten(e, 1))


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("backward", ["protected", "paper"])
@pytest.mark.parametrize("decomposition,basis", [("power", "sample"), ("eigh", "sample"), ("power", "batch")])
def test_op_zoo_exact(train: bool, backward: str, decomposition: str, basis: str) -> None:
    torch.manual_seed(0)
    model = _Zoo().double().train(train)
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    out_err, grad_err, sm, _ = compare_with_reference(model, x, backward=backward, decomposition=decomposition,
                                                      rank=2, basis=basis)
    assert out_err <= 1e-10 and grad_err <= 1e-8, (out_err, grad_err)
    assert any(len(r.nodes) >= 3 for r in sm.plan().regions), "linear chains must form multi-op regions"


def test_sgd_momentum_training_matches() -> None:
    """A few SGD+momentum steps give the same parameters as training the unsplit model."""
    torch.manual_seed(0)
    model = get_model("resnet20", num_classes=10).double()
    ref = copy.deepcopy(model)
    sm = asymml.split(model, rank="schedule", backward="protected")
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    g = torch.Generator().manual_seed(3)
    for _ in range(3):
        x = torch.randn(4, 3, 32, 32, generator=g, dtype=torch.float64)
        y = torch.randint(0, 10, (4,), generator=g)
        for m, o in ((sm, opt), (ref, opt_ref)):
            o.zero_grad()
            torch.nn.functional.cross_entropy(m(x), y).backward()
            o.step()
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        assert torch.allclose(p, q, rtol=1e-9, atol=1e-12), n
    for (n, b), (_, c) in zip(model.named_buffers(), ref.named_buffers()):
        assert torch.allclose(b.double(), c.double(), rtol=1e-9, atol=1e-12), n


def test_caller_model_untouched() -> None:
    model = _tv("resnet18")
    before = [(n, type(m), getattr(m, "inplace", None)) for n, m in model.named_modules()]
    params = {n: id(p) for n, p in model.named_parameters()}
    sm = asymml.split(model)
    sm(torch.randn(2, 3, 32, 32)).sum().backward()
    assert [(n, type(m), getattr(m, "inplace", None)) for n, m in model.named_modules()] == before
    assert {n: id(p) for n, p in model.named_parameters()} == params
    assert all(p.grad is not None for p in model.parameters())


def test_inference_no_grad_matches() -> None:
    torch.manual_seed(0)
    model = _tv("resnet18").eval()
    sm = asymml.split(model, rank="schedule")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        a = sm(x)
        b = model(x)
    assert float((a - b).norm() / b.norm()) <= TOL


def test_observed_profiled_run_is_bit_identical() -> None:
    """Profiling is bookkeeping only: with FLOP/memory counting on, an observer attached and a torch
    profiler running (the runtime's record_function labels open), the split model's output and gradients
    are bit-for-bit those of an unobserved split run, and exact against the unsplit model."""
    from asymml.profiling import RuntimeObserver

    torch.manual_seed(0)
    model = get_model("resnet20", num_classes=10).double()
    twin, twin2 = copy.deepcopy(model), copy.deepcopy(model)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    out_err, grad_err, sm, _ = compare_with_reference(model, x, rank=2)
    assert out_err <= 1e-10 and grad_err <= 1e-8, (out_err, grad_err)
    watched = asymml.split(twin, rank=2, placement="split")
    watched.set_profiling(True)
    seen: list[str] = []

    class Regions(RuntimeObserver):
        def region(self, phase: str, layer: str, seconds: float) -> None:
            seen.append(phase)

    watched.add_observer(Regions())
    torch.manual_seed(1)  # compare_with_reference's seed: same cotangent
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = watched(x)
        out.backward(torch.randn_like(out))
    torch.manual_seed(1)
    plain_sm = asymml.split(twin2, rank=2, placement="split")
    ref_out = plain_sm(x)
    ref_out.backward(torch.randn_like(ref_out))
    assert torch.equal(out, ref_out)
    for p, q in zip(twin.parameters(), twin2.parameters()):
        assert torch.equal(p.grad, q.grad)
    assert "forward" in seen and "backward" in seen
    assert any(e.name == "asymml::decompose" for e in prof.events())
    assert watched.profile().total["trusted_flops"] > 0


def test_cpu_executor_merges_inside_the_gemm() -> None:
    """With the accelerator on the trusted side's own CPU cores, inference waits for ``conv(R)`` and adds
    ``conv(L)`` into it in one GEMM (no separate merge): exact, used for the plain convolutions, and the
    same result as the concurrent path an off-core accelerator takes."""
    import asymml.rules.conv_linear as cl

    torch.manual_seed(0)
    model = get_model("vgg11", num_classes=10).eval().double()
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        ref = model(x)
    used: list[bool] = []
    orig = cl.Conv2dRule.trusted_forward_into

    def spy(self, *a):  # type: ignore[no-untyped-def]
        used.append(orig(self, *a))
        return used[-1]

    cl.Conv2dRule.trusted_forward_into = spy
    try:
        outs = {}
        for shares in (True, False):
            sm = asymml.split(model, rank=2, placement="split")
            assert sm.executor.shares_trusted_cores  # a CPU LocalExecutor
            sm.executor.shares_trusted_cores = shares
            used.clear()
            with torch.no_grad():
                outs[shares] = sm(x)
            assert (sum(used) > 0) == shares
        for out in outs.values():
            assert torch.allclose(out, ref, atol=1e-10, rtol=0)
    finally:
        cl.Conv2dRule.trusted_forward_into = orig


class _BigAdds(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the sizes of out-of-place ``aten.add.Tensor`` results at least ``floor`` elements big."""

    def __init__(self, floor: int) -> None:
        super().__init__()
        self.floor = floor
        self.sizes: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten.add.Tensor and isinstance(out, torch.Tensor) and out.numel() >= self.floor:
            self.sizes.append(out.numel())
        return out


@pytest.mark.parametrize("backward", ["protected", "paper"])
def test_split_backward_adds_the_accelerators_share_in_place(backward: str) -> None:
    """The protected backward of a split conv chain writes no full-size sum of its own: the weight gradient
    reads the output gradient as autograd gave it (not rebuilt as ``δ_L + δ_R``) and the accelerator's
    input-gradient share is added into the trusted one in place. Gradients stay exact; with gradient noise
    the weight gradient still reads the noised ``δ_L + δ̃_R`` the accelerator saw."""
    torch.manual_seed(0)
    nn = torch.nn
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(16, 16, 3, padding=1), nn.Flatten(), nn.Linear(16 * 12 * 12, 5)).double()
    x = torch.randn(4, 8, 12, 12, dtype=torch.float64)
    ref = copy.deepcopy(model)
    ref(x).square().sum().backward()
    sm = asymml.split(model, rank=2, placement="split", backward=backward)
    out = sm(x)
    counter = _BigAdds(floor=1000)  # activations (9,216 elements) and weights (2,304 and 11,520)
    with counter:
        out.square().sum().backward()
    assert counter.sizes == []
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-9, rtol=1e-9), name


def test_noised_gradient_release_gives_the_gradient_of_what_was_released() -> None:
    """With noise on released gradient residuals, the whole output gradient is *not* what the accelerator
    saw. The trusted weight-gradient share must then read ``δ_L + δ̃_R``, so that every gradient is the exact
    gradient of the perturbed ``δ + n`` (here a known shift ``n`` on each released gradient), not a mix of
    ``X⋆δ`` and the accelerator's ``R̃⋆n``."""
    torch.manual_seed(0)
    nn = torch.nn
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1),
                          nn.Flatten(), nn.Linear(16 * 12 * 12, 5)).double()
    x = torch.randn(4, 8, 12, 12, dtype=torch.float64)
    shift = 0.25

    def mechanism(rel: torch.Tensor, *, layer: str) -> torch.Tensor:  # a known "noise" on gradients only
        return rel + shift if layer.endswith(":grad") else rel

    def shifted(mod: nn.Module, inp: tuple, out: torch.Tensor) -> None:
        out.register_hook(lambda g: g + shift)  # the gradient at the conv's output, shifted like the release

    ref = copy.deepcopy(model)
    ref[0].register_forward_hook(shifted)  # the one released gradient (conv 2, flatten, linear: one region)
    ref(x).square().sum().backward()
    sm = asymml.split(model, rank=2, placement="split", noise=mechanism)
    sm(x).square().sum().backward()
    assert sm.executor.ledger.count_by_kind["grad_residual"] == 1
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-8, rtol=1e-8), name
