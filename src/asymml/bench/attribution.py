"""Where the trusted time goes: one step under ``torch.profiler``, charged to the engine's own labels.

While a torch profiler runs, the split runtime opens ``record_function`` labels around its steps
(:data:`asymml.profiling.LABELS`: decomposition, the split rules' trusted forward / input-gradient /
weight-gradient, the trusted non-linear ops, region bodies, releases); nothing is patched. Every aten op's
*self* CPU time in the trusted thread is charged to the innermost label it ran under (ops inside autograd
nodes of trusted non-linear ops go to ``non-linear bwd``) and classified by kind (convolution, GEMM,
copy, element-wise, …). Time the profiler does not see as an op (Python, dispatch, waiting) is the
difference to the step's trusted time.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch

from ..profiling import LABELS

OP_CLASSES: dict[str, tuple[str, ...]] = {
    "conv": ("convolution", "mkldnn_convolution", "convolution_backward", "conv2d", "_convolution",
             "thnn_conv", "slow_conv"),
    "gemm": ("bmm", "mm", "addmm", "baddbmm", "matmul", "addbmm", "einsum", "linear"),
    "copy": ("copy_", "clone", "contiguous", "_to_copy", "to", "flip", "cat", "stack", "repeat",
             "index_select", "_unsafe_view"),
    "linalg": ("linalg_cholesky", "linalg_solve", "linalg_qr", "linalg_eigh", "linalg_svd", "linalg_eig",
               "_linalg_", "cholesky", "solve_triangular", "tril", "triu", "geqrf", "orgqr", "svd"),
    "pool": ("pool",),
    "random": ("normal_", "randn", "uniform_", "bernoulli"),
}
#: attribution category -> the runtime's label (asymml.profiling.LABELS) it collects
CATEGORY_LABELS = {
    "decompose": LABELS["decompose"],
    "conv fwd": LABELS["conv.trusted_forward"],
    "conv input-grad": LABELS["conv.input_grad"],
    "conv weight-grad": LABELS["conv.param_grads"],
    "other split fwd": LABELS["rule.trusted_forward"],
    "other split input-grad": LABELS["rule.input_grad"],
    "other split weight-grad": LABELS["rule.param_grads"],
    "non-linear fwd": LABELS["trusted_op"],
    "region fwd glue (merge)": LABELS["region.forward"],
    "region bwd glue (merge, accumulate)": LABELS["region.backward"],
    "release (+noise)": LABELS["release"],
    "decompose glue": LABELS["decomposed"],
}
_LABEL_TO_CAT = {v: k for k, v in CATEGORY_LABELS.items()}


def op_class(name: str) -> str:
    """Kind of an aten op by name (``aten::`` prefix stripped); an in-place variant (``baddbmm_``) is of its
    op's kind."""
    n = name.split("::")[-1]
    base = n[:-1] if n.endswith("_") and not n.startswith("_") else n
    for cls, keys in OP_CLASSES.items():
        for k in keys:
            if n == k or base == k or (k.endswith("_") and n.startswith(k)) or (cls in ("pool", "linalg") and k in n):
                return cls
    return "elementwise/other"


def _category(ev: Any) -> str:
    q = ev.cpu_parent
    while q is not None:
        cat = _LABEL_TO_CAT.get(q.name)
        if cat is not None:
            return cat
        if q.name.startswith("autograd::engine::evaluate_function") and "RegionFunction" not in q.name:
            return "non-linear bwd (autograd)"
        q = q.cpu_parent
    return "outside (loss, autograd glue)"


def attribute(step: Callable[[], Any]) -> dict[str, Any]:
    """Run ``step`` once under the profiler; returns ``{"by_category": {cat: {op_class: s}}, "op_s",
    "top_ops", "step_wall_s"}`` for the calling (trusted) thread."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        step()
        wall = time.perf_counter() - t0
    events = prof.events()
    labels = set(_LABEL_TO_CAT)
    # the trusted thread is the one that ran the region bodies (or, without regions, the busiest one)
    per_thread: dict[int, float] = defaultdict(float)
    for e in events:
        per_thread[e.thread] += e.self_cpu_time_total
    region_threads = {e.thread for e in events if e.name in labels}
    tid = next(iter(region_threads)) if len(region_threads) == 1 else max(per_thread, key=per_thread.get)
    by_cat: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    ops: dict[str, float] = defaultdict(float)
    for e in events:
        if e.thread != tid or e.name in labels or e.name.startswith("autograd::engine") or \
                e.name.endswith("Backward0") or e.name.startswith(("RegionFunction", "torch::autograd")):
            continue
        s = e.self_cpu_time_total / 1e6
        by_cat[_category(e)][op_class(e.name)] += s
        ops[e.name] += s
    top = sorted(ops.items(), key=lambda kv: -kv[1])[:15]
    return {"by_category": {k: dict(v) for k, v in by_cat.items()},
            "op_s": sum(ops.values()), "top_ops": [{"op": k, "s": v} for k, v in top], "step_wall_s": wall}


def attribution_table(att: dict[str, Any], trusted_s: float | None = None) -> str:
    """Markdown: categories × op kinds (ms)."""
    classes = list(OP_CLASSES) + ["elementwise/other"]
    rows = ["| trusted-thread category | total ms | " + " | ".join(classes) + " |",
            "|---|---|" + "---|" * len(classes)]
    cats = sorted(att["by_category"].items(), key=lambda kv: -sum(kv[1].values()))
    for cat, d in cats:
        rows.append(f"| {cat} | {1e3 * sum(d.values()):.1f} | "
                    + " | ".join(f"{1e3 * d.get(c, 0.0):.1f}" for c in classes) + " |")
    colsum = {c: sum(d.get(c, 0.0) for d in att["by_category"].values()) for c in classes}
    rows.append(f"| **all ops** | {1e3 * att['op_s']:.1f} | "
                + " | ".join(f"{1e3 * colsum[c]:.1f}" for c in classes) + " |")
    if trusted_s is not None:
        rows.append(f"| not in ops (Python, dispatch; profiled step) | {1e3 * (trusted_s - att['op_s']):.1f} |"
                    + " |" * len(classes))
    return "\n".join(rows)
