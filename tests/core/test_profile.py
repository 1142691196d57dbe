"""Profiling: per-layer time and FLOPs on both sides, trusted peak memory against the EPC budget."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

import asymml
from asymml.models import get_model
from asymml.profiling import TrustedMemoryMeter


def test_profile_splits_flops_between_sides() -> None:
    model = get_model("vgg11", num_classes=10).eval()
    x = torch.randn(4, 3, 32, 32)
    sm = asymml.split(model, rank=2)
    sm.set_profiling(True)
    with torch.no_grad():
        sm(x)
    prof = sm.profile()
    tot = prof.total
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model(x)
    full = fc.get_total_flops()
    # the accelerator does the full convolutions on residuals; the trusted side a small fraction
    assert 0.9 * full <= tot["accelerator_flops"] <= 1.1 * full
    assert 0 < tot["trusted_flops"] < 0.5 * full
    assert 0 < tot["trusted_flop_fraction"] < 0.5
    split_layers = [lp for lp in prof.layers if lp.kind == "split"]
    assert split_layers and all(lp.trusted_s.get("forward", 0) > 0 for lp in split_layers)
    assert any(sum(lp.accelerator_s.values()) > 0 for lp in prof.layers)
    assert prof.trusted_peak_bytes is not None and prof.trusted_peak_bytes > x.numel() * 4
    d = prof.to_dict()
    assert d["epc_bytes"] == 128 * 2**20 and isinstance(d["within_epc"], bool)
    assert d["released_bytes"]["residual"] > 0
    assert "total" in prof.table()


def test_profile_training_step_has_backward_times() -> None:
    model = get_model("resnet20", num_classes=10)
    sm = asymml.split(model, rank=2, backward="protected")
    sm.set_profiling(True)
    sm(torch.randn(2, 3, 32, 32)).sum().backward()
    layers = [lp for lp in sm.profile().layers if lp.kind == "split"]
    assert any(lp.trusted_s.get("backward", 0) > 0 for lp in layers)
    assert any(lp.accelerator_s.get("backward", 0) > 0 for lp in sm.profile().layers)
    sm.reset_profile()
    assert sm.profile().total["trusted_s"] == 0


def test_memory_meter_counts_live_tensors_and_excludes_public() -> None:
    meter = TrustedMemoryMeter()
    with meter:
        a = torch.ones(1024, 256)  # 1 MiB
        b = a * 2
        peak1 = meter.peak
        meter.mark_public(b)
        del a
    assert peak1 >= 2 * 2**20
    assert meter.current < 2**20  # a freed, b public


def test_counting_stops_when_switched_off_and_times_stay() -> None:
    """FLOPs and memory are counted only between set_profiling(True) and set_profiling(False); per-layer
    times (split regions and trusted ops) are kept either way, in the order the layers first ran."""
    model = get_model("vgg11", num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    sm = asymml.split(model, rank=2, placement="split")
    sm.set_profiling(True)
    with torch.no_grad():
        sm(x)
    assert sm.profile().total["trusted_flops"] > 0
    sm.set_profiling(False)
    sm.reset_profile()
    with torch.no_grad():
        sm(x)
    prof = sm.profile()
    assert prof.total["trusted_flops"] == 0 and prof.total["trusted_s"] > 0
    kinds = [lp.kind for lp in prof.layers]
    assert "split" in kinds and "trusted" in kinds
    order = [lp.layer for lp in prof.layers if lp.kind != "accelerator"]
    graph = [str(n.target) if n.op == "call_module" else n.name for n in sm._gm.graph.nodes]
    assert order == sorted(order, key=lambda name: graph.index(name) if name in graph else -1)


def test_forward_frees_each_activation_after_its_last_reader() -> None:
    """The trusted interpreter drops a value once no later unit reads it: the first block's full-size
    activation is gone while the forward is still running (it used to stay alive until the forward ended,
    keeping every layer's activations in trusted memory at once), in every mode that walks the plan."""
    import weakref

    nn = torch.nn
    x = torch.randn(2, 3, 16, 16)
    for mode in ("asym", "noise-only"):
        net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                            nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                            nn.Flatten(), nn.Linear(8 * 16, 4)).eval()
        seen: dict[str, object] = {}
        # the first pool's input (the first conv's output, only the pool reads it) and whether it is alive
        # when the second pool runs
        net[2].register_forward_hook(lambda m, i, o, seen=seen: seen.__setitem__("ref", weakref.ref(i[0])))
        net[5].register_forward_hook(lambda m, i, o, seen=seen: seen.__setitem__("alive", seen["ref"]() is not None))
        sm = asymml.split(net, mode=mode, rank=2, placement="split")
        with torch.no_grad():
            out = sm(x)
        assert out.shape == (2, 4)
        assert seen["alive"] is False, mode


def test_weight_relayouts_are_public_model_state() -> None:
    """Re-layouts of public weights cached by the split rules are public like the weights: the trusted
    memory meter does not count them, and they are listed for the bench's EPC placement."""
    from asymml.profiling import public_state_storages

    model = get_model("vgg11", num_classes=10).eval()
    sm = asymml.split(model, rank=2, placement="split")
    x = torch.randn(2, 3, 32, 32)
    meter = TrustedMemoryMeter()
    with torch.no_grad(), meter:
        sm(x)
    public = {st.data_ptr() for st in public_state_storages()}
    assert public, "the low-rank convolutions cache re-laid-out weights"
    assert not public & set(meter.live)


def test_inplace_gemms_are_counted() -> None:
    """``baddbmm_``/``addmm_`` (the residual written over X, conv(L) added into conv(R)) count their FLOPs
    like the out-of-place GEMMs: trusted FLOPs and the FLOP limit would otherwise be understated."""
    from asymml.profiling import count_flops

    y, a, b = torch.zeros(3, 4, 5), torch.randn(3, 4, 6), torch.randn(3, 6, 5)
    assert count_flops(lambda: y.baddbmm_(a, b))[1] == 2 * 3 * 4 * 5 * 6
    m = torch.zeros(4, 5)
    assert count_flops(lambda: m.addmm_(a[0], b[0]))[1] == 2 * 4 * 5 * 6


class Ops(TorchDispatchMode):
    """Records the names of the aten ops run inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        self.names.add(func.__name__)
        return func(*args, **(kwargs or {}))


def test_max_pool_without_autograd_writes_no_indices() -> None:
    """A 2×2 max-pool run by the trusted interpreter without autograd gives F.max_pool2d's result (NaN
    included) without writing the int64 indices PyTorch's CPU kernel writes anyway: they were 49 MiB of
    VGG-16's 184 MiB trusted inference peak at 224 px, batch 8. With autograd the pool runs as written."""
    from asymml.interpreter import max_pool_2x2

    for shape in [(2, 8, 16, 16), (3, 5, 7, 9), (1, 4, 2, 3)]:
        x = torch.randn(shape).contiguous(memory_format=torch.channels_last)
        x.permute(0, 2, 3, 1).view(-1)[::7] = float("nan")
        ref = torch.nn.functional.max_pool2d(x, 2)
        got = max_pool_2x2(x)
        assert got.shape == ref.shape and got.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(torch.isnan(got), torch.isnan(ref))
        assert torch.equal(got.nan_to_num(0.0), ref.nan_to_num(0.0))

    nn = torch.nn
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Flatten(), nn.Linear(8 * 16, 4)).eval()
    x = torch.randn(2, 3, 16, 16)
    sm = asymml.split(net, rank=2, placement="split")
    with torch.no_grad(), Ops() as ops:
        out = sm(x)
    torch.testing.assert_close(out, net(x), rtol=1e-4, atol=1e-5)
    assert not any(n.startswith("max_pool2d_with_indices") for n in ops.names)
    with Ops() as ops:  # training: the pool's backward needs its indices
        sm(x).sum().backward()
    assert any(n.startswith("max_pool2d_with_indices") for n in ops.names)
    hooked = []  # hooks on the pool still run (only the op is replaced), also under FLOP counting's hooks
    h = net[2].register_forward_hook(lambda m, i, o: hooked.append(1))
    with torch.no_grad(), FlopCounterMode(display=False), Ops() as ops:
        sm(x)
    h.remove()
    assert hooked and not any(n.startswith("max_pool2d_with_indices") for n in ops.names)


def test_trusted_only_gets_the_same_indexless_pool() -> None:
    """The baseline runs the model as written; its 2×2 max-pools get the same index-free pool without
    autograd (a speed-up against a baseline slower than it need be is not a speed-up), hooks still run."""
    nn = torch.nn
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                        nn.Linear(8 * 64, 4)).eval()
    hooked = []
    net[2].register_forward_hook(lambda m, i, o: hooked.append(1))
    x = torch.randn(2, 3, 16, 16)
    sm = asymml.split(net, mode="trusted-only")
    with torch.no_grad(), Ops() as ops:
        out = sm(x)
    torch.testing.assert_close(out, net(x))
    assert hooked and not any(n.startswith("max_pool2d_with_indices") for n in ops.names)
    with Ops() as ops:
        sm(x).sum().backward()
    assert any(n.startswith("max_pool2d_with_indices") for n in ops.names)


def test_interpreter_runs_inplace_add_out_of_place() -> None:
    """``x += y`` runs out of place in the trusted interpreter: the runtime keeps values other ops still
    read (and region outputs saved for backward are version-checked), so the left operand must not change."""
    import operator

    import torch.fx as fx

    from asymml.interpreter import TrustedInterpreter
    from asymml.profiling import Recorder

    g = fx.Graph()
    x = g.placeholder("x")
    a = g.call_function(operator.mul, (x, 1.0))
    b = g.call_function(operator.iadd, (a, x))
    g.output(g.call_function(operator.add, (a, b)))
    gm = fx.GraphModule(torch.nn.Module(), g)
    t = torch.ones(3)
    torch.testing.assert_close(TrustedInterpreter(gm, Recorder()).run(t), 3 * t)  # in place: 4 * t
