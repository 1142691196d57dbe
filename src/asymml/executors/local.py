"""In-process accelerator: a torch device driven from a worker thread.

The trusted context and this executor run concurrently (the worker thread releases the GIL inside torch
kernels). Every tensor handed over is recorded in the ledger; weights are recorded when their value
changes (an accelerator caches weights between steps, so an unchanged weight is not released again).
"""

from __future__ import annotations

import itertools
import threading
import time
import weakref
from collections import defaultdict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode

from ..errors import ConfigError
from ..ledger import Ledger
from .base import BackwardRequest, Executor, Handle
from .ops import Instr, run_program
from .verify import Verifier, wrap_future


class _State:
    __slots__ = ("env", "inputs", "gparams", "outputs", "layer")

    def __init__(self, env, inputs, gparams, outputs, layer):
        self.env = env
        self.inputs = inputs
        self.gparams = gparams
        self.outputs = outputs
        self.layer = layer


class LocalExecutor(Executor):
    """Accelerator = ``device`` in this process (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"auto"``)."""

    can_verify = True

    def __init__(self, device: str | torch.device = "cpu", *, audit: bool = False, verify: bool = False) -> None:
        if isinstance(device, str) and device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            self.device = torch.device(device)
        except RuntimeError as e:
            raise ConfigError(f"invalid accelerator device {device!r}: {e}") from None
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"accelerator device {device!r} requested but CUDA is not available")
        self.home = torch.device("cpu")
        self.shares_trusted_cores = self.device.type == "cpu"
        self.ledger = Ledger(audit)
        # touch torch's thread settings in the worker at start, so that it honours torch.set_num_threads
        # from its first op on (results must not depend on the worker thread's history)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="asymml-accel",
                                        initializer=torch.get_num_threads)
        self._store: dict[int, Tensor] = {}
        self._states: dict[int, _State] = {}
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._weight_versions: dict[int, tuple[int, Tensor, Any]] = {}
        self._profiling = False
        self._stats: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self.verifier: Verifier | None = None
        self.verify = verify

    # ------------------------------------------------------------------ helpers
    def forget_weight(self, t: Tensor) -> None:
        """Drop the cached device copy of weight ``t`` (a caller that frees the tensor may call this so a
        later tensor reusing its ``id`` is never mistaken for it)."""
        self._weight_versions.pop(id(t), None)

    @property
    def audit(self) -> bool:
        return self.ledger.audit

    @audit.setter
    def audit(self, on: bool) -> None:
        self.ledger.audit = on

    def _to_dev(self, t: Tensor) -> Tensor:
        if t.device == self.device:
            return t
        return t.to(self.device, non_blocking=True)

    def _home(self, t: Tensor | None, *, own: bool = False) -> Tensor | None:
        """``t`` on the trusted side's device. ``own``: the accelerator keeps ``t`` (a kept graph's output), so
        an accelerator on the trusted side's own device hands over a copy, as a transfer from a device would:
        the trusted side's result then dies when the trusted side drops it, not when the accelerator's graph
        does (the copy is the accelerator's work)."""
        if t is None:
            return None
        t = t.detach()
        if t.device == self.home:
            return t.clone() if own else t
        return t.to(self.home)

    def _weights(self, params: dict[str, Tensor], layer: str) -> dict[str, Tensor]:
        out = {}
        for name, p in params.items():
            key = id(p)
            ver = p._version
            cached = self._weight_versions.get(key)
            # ids are reused after a tensor dies: an entry only counts if it still refers to this tensor
            if cached is None or cached[2]() is not p or cached[0] != ver or cached[1].shape != p.shape:
                self.ledger.record(f"{layer}.{name}", "weight", p)
                dev = p.detach().to(self.device, copy=p.device != self.device)
                table = self._weight_versions
                ref = weakref.ref(p, lambda _r, k=key, d=table: d.pop(k, None))
                cached = (ver, dev, ref)
                table[key] = cached
            out[name] = cached[1]
        return out

    def _timed(self, layer: str, phase: str, fn):
        def run():
            t0 = time.perf_counter()
            if self._profiling:
                with FlopCounterMode(display=False) as fc:
                    res = fn()
                self._stats[layer][f"{phase}_flops"] += fc.get_total_flops()
            else:
                res = fn()
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self._stats[layer][f"{phase}_s"] += time.perf_counter() - t0
            return res

        return run

    # ------------------------------------------------------------------ interface
    def release(self, tensor: Tensor, *, layer: str, kind: str) -> Handle:
        self.ledger.record(layer, kind, tensor)
        hid = next(self._ids)
        dev = self._to_dev(tensor.detach())
        with self._lock:
            self._store[hid] = dev
        v = self.verifier
        if v is not None:
            v.release(hid, tensor)
        return Handle(hid, tuple(tensor.shape))

    def discard(self, handles: list[Handle]) -> None:
        with self._lock:
            for h in handles:
                self._store.pop(h.id, None)
        v = self.verifier
        if v is not None:
            v.discard([h.id for h in handles])

    def forward(
        self,
        key: int,
        program: list[Instr],
        inputs: dict[str, Handle],
        params: dict[str, Tensor],
        outputs: list[str],
        *,
        layer: str,
        keep_graph: bool,
        grad_params: tuple[str, ...] = (),
    ) -> Future[dict[str, Tensor | None]]:
        weights = self._weights(params, layer)
        with self._lock:
            xs = {n: self._store[h.id] for n, h in inputs.items()}

        def work() -> dict[str, Tensor | None]:
            if keep_graph:
                env: dict[str, Any] = {n: x.detach().requires_grad_(True) for n, x in xs.items()}
                gp = {n: (w.detach().requires_grad_(True) if n in grad_params else w) for n, w in weights.items()}
                with torch.enable_grad():
                    run_program(program, env, gp)
                self._states[key] = _State(env, dict(env), gp, outputs, layer)
            else:
                env = dict(xs)
                with torch.no_grad():
                    run_program(program, env, weights)
            return {o: self._home(env.get(o), own=keep_graph) for o in outputs}

        fut = self._pool.submit(self._timed(layer, "forward", work))
        v = self.verifier
        if v is None:
            return fut
        hids = {n: h.id for n, h in inputs.items()}
        return wrap_future(fut, lambda res: v.check_forward(key, program, hids, params, outputs, res, layer=layer,
                                                             keep_graph=keep_graph))

    def backward(self, key: int, request: BackwardRequest) -> Future[dict[str, dict[str, Tensor | None]]]:
        with self._lock:
            grads_in = {n: (None if h is None else self._store.pop(h.id)) for n, h in request.grad_outputs.items()}
        st = self._states.get(key)
        layer = st.layer if st is not None else "?"

        def work() -> dict[str, dict[str, Tensor | None]]:
            st = self._states.pop(key, None)
            if st is None:
                raise RuntimeError(f"accelerator has no kept graph for forward {key} (backward called twice?)")
            roots, gs = [], []
            for name, g in grads_in.items():
                v = st.env.get(name)
                if g is not None and v is not None and v.requires_grad:
                    roots.append(v)
                    gs.append(g)
            targets: list[tuple[str, str, Tensor]] = []
            for n in request.input_grads:
                if st.inputs.get(n) is not None:
                    targets.append(("input_grads", n, st.inputs[n]))
            for n in request.param_grads:
                if st.gparams.get(n) is not None and st.gparams[n].requires_grad:
                    targets.append(("param_grads", n, st.gparams[n]))
            for n in request.value_grads:
                v = st.env.get(n)
                if v is not None and v.requires_grad:
                    targets.append(("value_grads", n, v))
            res: dict[str, dict[str, Tensor | None]] = {
                "input_grads": {}, "param_grads": {}, "value_grads": {}, "values": {}
            }
            if roots and targets:
                got = torch.autograd.grad(roots, [t[2] for t in targets], gs, allow_unused=True)
                for (sect, n, _), g in zip(targets, got):
                    res[sect][n] = self._home(g)
            for n in request.values:
                res["values"][n] = self._home(st.env.get(n))
            return res

        fut = self._pool.submit(self._timed(layer, "backward", work))
        v = self.verifier
        if v is None:
            return fut
        return wrap_future(fut, lambda res: v.check_backward(key, request, res))

    def free(self, key: int) -> None:
        self._states.pop(key, None)
        v = self.verifier
        if v is not None:
            v.free(key)

    def run_module(self, module: torch.nn.Module, inputs: tuple[Any, ...], *, layer: str = "model") -> Any:
        """``plain`` mode: the whole model on the accelerator (inputs and weights released)."""
        for x in inputs:
            if isinstance(x, Tensor):
                self.ledger.record(layer, "input", x)
        named = dict(module.named_parameters())
        self._weights(named, layer)
        t0 = time.perf_counter()
        if all(p.device == self.device for p in named.values()):
            out = module(*[self._to_dev(x) if isinstance(x, Tensor) else x for x in inputs])
        else:
            from torch.func import functional_call

            state = {n: p.to(self.device) for n, p in named.items()}
            bufs = dict(module.named_buffers())
            dev_bufs = {n: b.to(self.device) for n, b in bufs.items()}
            state.update(dev_bufs)
            out = functional_call(module, state, tuple(self._to_dev(x) if isinstance(x, Tensor) else x for x in inputs))
            with torch.no_grad():
                for n, b in bufs.items():
                    if dev_bufs[n] is not b:
                        b.copy_(dev_bufs[n])
        if isinstance(out, Tensor):
            if out.requires_grad:
                out.register_hook(lambda g: self.ledger.record(layer, "grad", g))
            out = out.to(self.home)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self._stats[layer]["forward_s"] += time.perf_counter() - t0
        return out

    def stats(self) -> dict[str, dict[str, float]]:
        return {k: dict(v) for k, v in self._stats.items()}

    def reset_stats(self) -> None:
        self._stats.clear()

    def set_profiling(self, on: bool) -> None:
        self._profiling = on

    def synchronize(self) -> None:
        """Wait until every submitted job has finished."""
        self._pool.submit(lambda: None).result()

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def __repr__(self) -> str:
        return f"LocalExecutor({str(self.device)!r})"
