"""The in-process executor: what it hands the trusted side."""

from __future__ import annotations

import torch
import torch.nn as nn

import asymml


def test_kept_graph_outputs_are_handed_over_as_copies() -> None:
    """An in-process accelerator that keeps its graph for backward hands the trusted side a copy of each
    output, as a transfer from a device would: the trusted side's share dies when the trusted side drops it,
    not with the accelerator's graph (sharing the storage charged the accelerator's graph to trusted
    memory: ~315 MiB of a VGG-16 224 px training step). Without a kept graph nothing is copied."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
    ex = asymml.LocalExecutor("cpu")
    futures: list = []
    forward = ex.forward

    def spy(*a, **k):  # noqa: ANN002, ANN003, ANN202
        fut = forward(*a, **k)
        futures.append((k["keep_graph"], fut))
        return fut

    ex.forward = spy  # type: ignore[method-assign]
    sm = asymml.split(model, rank=2, placement="split", executor=ex)
    x = torch.rand(2, 4, 8, 8)
    out = sm(x)
    kept = {t.untyped_storage().data_ptr() for st in ex._states.values() for t in st.env.values()
            if isinstance(t, torch.Tensor)}
    handed = [t for keep, f in futures if keep for t in f.result().values() if t is not None]
    assert handed and kept
    assert all(t.untyped_storage().data_ptr() not in kept for t in handed)
    out.sum().backward()
    ref = model(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert all(p.grad is not None for p in model.parameters())
