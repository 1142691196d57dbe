"""Verification of accelerator results (Freivalds-style randomized checks; Slalom, Tramèr & Boneh 2019).

The trusted side knows every program (public data), its parameters and the tensors it released, so it can
check each reply without redoing the accelerator's work:

* **shape, dtype and finiteness** of every returned tensor against the shapes the program implies (inferred
  on shape-only tensors), so nothing broadcasts, truncates or changes type;
* **forward results** ``Y = P(X)``: ``⟨S, Y⟩ = ⟨Pᵀ S, X⟩`` for a secret random test tensor ``S``;
* **intermediate values** the backward returns (inputs of weighted ops): the same identity, with the
  expected projection computed when the forward reply arrives (while the released inputs are at hand);
* **input and intermediate gradients** ``δ = Lᵀ G``: ``⟨S, δ⟩ = ⟨L S, G⟩`` (the program run *forward* on
  the test tensors, from the released output gradients ``G``);
* **weight gradients** ``∇W = Σ δ ⋆ x``: ``⟨T, ∇W⟩ = ⟨δ, conv(x, T)⟩`` with the (already verified) ``δ``
  and ``x``, and a rank-1 ``T = t ⊗ m ⊗ K`` (output channel × input channel × kernel).

Cost. Test tensors are fully rank-1, ``S = r ⊗ u ⊗ vh ⊗ vw`` (batch × channel × height × width; kept
as :class:`Sep`), and ``T = t ⊗ m ⊗ K`` for weight gradients. A convolution moves a rank-1 test tensor, in
either direction, to a *separable* one, ``Σ_{i,j} K[c,i,j]·Mh[i,h]·Mw[j,w]`` (``K`` = the weight contracted
by ``u``, ``Mh``/``Mw`` = ``vh``/``vw`` shifted by the kernel offsets), so no convolution is run at all, and
``⟨r ⊗ S, X⟩`` over a whole batch is one matrix product ``(r ⊗ Mh) @ X`` over ``X`` in its own memory
layout. :class:`_Batch` stacks every test tensor a check applies to the same tensor (all rounds, every
output, the expected values kept for the backward) into that one product, so each tensor that crosses is
read once per check. The product runs over row chunks of about 1 MiB (:func:`_rows`), and a result's
square sum (its norm, for the tolerance, and its finiteness) is taken on each chunk while it is still in
cache, so the norm costs no second read from memory; weight gradients are projected the same way
(:func:`_wproj`). Per-sample programs are checked on the batch collapsed by ``r``; non-separable cases
(grouped convolutions, pooling) fall back to dense test tensors. Measured on VGG-16 224 px, batch 8
(``tests/executors/measure_overhead.py --replay``, 5 paired rounds): with every job checked, 16% (inference)
and 12% (training) of asym trusted time on one thread, 12% and 7% on two (what an in-process CPU executor's
checks use, see ``threads``). What
remains is bounded by reading each result and each released input once (about 12-15 GB/s on one core),
the second read of a weight-gradient check's value and gradient, and one read of a weight per test tensor.

Sampling. By default (``SAMPLE``, ``WARMUP``, ``MAX_GAP``) the randomized checks run on a secret random
subset of each layer's jobs (every job in the warm-up, then each with probability ``sample``, and never
``max_gap`` jobs of a layer in a row unchecked); the basic checks run on every reply.
:meth:`Verifier.detection_probability` and :meth:`Verifier.summary` state what that means for a tampered
result; ``Verifier(sample=1.0)`` checks every job.

Soundness. Test tensors come from a generator seeded from the OS CSPRNG (:mod:`secrets`) that the
accelerator never observes. For a wrong result ``Y + E`` the check misses only if ``|⟨S, E⟩|`` falls under
the floating-point tolerance ``rtol·‖Y‖``; each of ``rounds`` independent test tensors gives an independent
chance. :func:`.detection.measure_detection` estimates the detection rate against concrete tampers and the false-alarm
rate on honest results; :meth:`Verifier.stats` reports the time spent (the trusted overhead).
"""

from __future__ import annotations

import math
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.grad import conv2d_input

from ..errors import IntegrityError, ProtocolError
from .base import BackwardRequest
from .ops import OPS, Instr, infer_shapes

Shapes = dict[str, tuple[tuple[int, ...], torch.dtype] | None]

#: default relative tolerance: float32 on CPU is far below it; GPUs may use TF32 (about 1e-3 per product)
RTOL_CPU = 1e-3
RTOL_GPU = 2e-2
_A = math.sqrt(3 / 7)  # magnitude scale of test entries: E[s²] = 1
#: default sampling of the randomized checks (see :class:`Verifier`): every job of a layer in its first
#: WARMUP jobs, then each job with probability SAMPLE, and never MAX_GAP jobs of a layer in a row unchecked.
#: On VGG-16 224 px batch 8 (2026-11-29, two torch threads as an in-process CPU executor's checks run), replayed
#: checks (tests/executors/measure_overhead.py --replay) cost 12% (inference) and 7% (training) of asym trusted
#: time with every job checked, 8% in inference with a quarter sampled; `asymml bench --verify` measured +3%
#: (inference) and +7% (training) over the same placement.
SAMPLE = 0.25
WARMUP = 2
MAX_GAP = 8


@dataclass
class Fact:
    """A test tensor factored along channels: ``value[b, c, h, w] = u[c] · V[b, 0, h, w]``."""

    u: Tensor   # (C,)
    V: Tensor   # (B', 1, H, W)

    def dense(self) -> Tensor:
        return self.u.view(1, -1, 1, 1) * self.V

    def with_u(self, u: Tensor) -> Fact:
        """The same spatial factor with channel factor ``u``."""
        return Fact(u, self.V)


def _pair(v: Any) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _offsets(n: int, k: int, s: int, p: int, d: int) -> Tensor:
    """``x[j, y] = y·s + j·d − p``: the input index that output ``y`` reads at kernel offset ``j``."""
    return torch.arange(n).unsqueeze(0) * s + (torch.arange(k) * d - p).unsqueeze(1)


def _pull(v: Tensor, n_in: int, k: int, s: int, p: int, d: int) -> Tensor:
    """``M[j, x] = Σ_y v[y]·[x = y·s + j·d − p]`` (k × n_in): a test vector over one spatial axis of a
    convolution's output, moved to its input at kernel offset ``j`` (zero padding drops out)."""
    x = _offsets(v.shape[0], k, s, p, d)
    ok = (x >= 0) & (x < n_in)
    M = torch.zeros(k, n_in, dtype=v.dtype)
    M[torch.arange(k).unsqueeze(1).expand_as(x)[ok], x[ok]] = v.expand(k, -1)[ok]  # x is injective in y
    return M


def _push(v: Tensor, n_out: int, k: int, s: int, p: int, d: int) -> Tensor:
    """``M[j, y] = v[y·s + j·d − p]`` (k × n_out, zero outside): a test vector over one spatial axis of a
    convolution's input, seen from its output at kernel offset ``j``."""
    x = _offsets(n_out, k, s, p, d)
    ok = (x >= 0) & (x < v.shape[0])
    return torch.where(ok, v[x.clamp(0, v.shape[0] - 1)], torch.zeros((), dtype=v.dtype))


@dataclass
class Sep:
    """A single-sample test tensor in separable form, ``value[0, c, h, w] = Σ_{i,j} K[c,i,j]·Mh[i,h]·Mw[j,w]``:
    a fully rank-1 test tensor (k = 1), or one moved through a convolution in either direction (k = the
    kernel size, see :func:`_pull`, :func:`_push`). Its inner product with a whole batch weighted by the
    batch factor ``r`` is one matrix product over that batch (:func:`_sep_batch`): neither the moved test
    tensor nor a batch-collapsed copy of the data is ever formed."""

    K: Tensor   # (C, kh, kw)
    Mh: Tensor  # (kh, H)
    Mw: Tensor  # (kw, W)

    @staticmethod
    def rank1(u: Tensor, vh: Tensor, vw: Tensor) -> Sep:
        return Sep(u.view(-1, 1, 1), vh.view(1, -1), vw.view(1, -1))

    def factors(self) -> tuple[Tensor, Tensor, Tensor] | None:
        """``(u, vh, vw)`` when rank-1 (k = 1)."""
        if self.Mh.shape[0] == 1 and self.Mw.shape[0] == 1:
            return self.K[:, 0, 0], self.Mh[0], self.Mw[0]
        return None

    def scaled(self, c: Tensor | float) -> Sep:
        """Channel ``c`` times the value (a per-channel vector or a scalar)."""
        return Sep(self.K * (c.view(-1, 1, 1) if isinstance(c, Tensor) else c), self.Mh, self.Mw)

    def dense(self) -> Tensor:
        return torch.einsum("cij,ih,jw->chw", self.K.double(), self.Mh.double(), self.Mw.double()).unsqueeze(0)

    def fact(self) -> Fact | None:
        f = self.factors()
        return None if f is None else Fact(f[0], torch.outer(f[1], f[2]).view(1, 1, -1, f[2].shape[0]))


#: bytes of data per chunk of a fused pass (:func:`_rows`): small enough to stay in a core's L2 cache
#: between the projection and the square sum that read it, large enough to keep per-call overhead small
_CHUNK_BYTES = 1 << 20


def _rows(M: Tensor, *, left: Tensor | None = None, right: Tensor | None = None,
          sq: bool = False) -> tuple[Tensor | None, float]:
    """One pass over the rows of a row-major 2-D view ``M`` (N × D), in chunks of about ``_CHUNK_BYTES``:
    ``left @ M`` (``left``: R × N) or ``M @ right`` (``right``: D × R), and with ``sq`` also ``‖M‖²``,
    taken on each chunk while it is still in cache (so the norm costs no second read from memory). The
    square sum is a float32 dot product per chunk accumulated in float64: a sum of non-negative terms,
    so a NaN or Inf anywhere makes it non-finite (no Inf − Inf can cancel); see :func:`_norm2`."""
    N, D = M.shape
    step = max(1, _CHUNK_BYTES // max(1, D * M.element_size()))
    out: Tensor | None = None
    if left is not None:
        out = torch.zeros(left.shape[0], D, dtype=M.dtype)
    elif right is not None:
        out = torch.empty(N, right.shape[1], dtype=M.dtype)
    s = 0.0
    for i in range(0, N, step):
        c = M[i:i + step]
        if left is not None:
            out.addmm_(left[:, i:i + step], c)
        elif right is not None:
            torch.mm(c, right, out=out[i:i + step])
        if sq:
            f = c.reshape(-1)
            s += float(torch.dot(f, f))
    return out, s


def _wproj(gw: Tensor, T: Tensor, m: Tensor, K: Tensor, sq: bool) -> tuple[Tensor, float | None]:
    """``⟨T_k ⊗ m_k ⊗ K_k, ∇W⟩`` (conv, ``∇W``: O × I × kh × kw) or ``⟨T_k ⊗ m_k, ∇W⟩`` (linear, O × I) for
    every round ``k``, from one pass over ``∇W`` in its own precision (:func:`_rows`: the output-channel
    factor first, a well-shaped product), then small float64 contractions; with ``sq`` also ``‖∇W‖²``."""
    g = gw if gw.is_contiguous() else gw.contiguous()
    fsq = sq and g.dtype in (torch.float32, torch.float64)
    O, I = g.shape[:2]
    R = T.shape[0]
    V, n2 = _rows(g.view(O, -1), left=T.to(g.dtype), sq=fsq)                   # (R, I·k): output factor first
    V = V.view(R, I, -1).double()
    lhs = (V * m.view(R, I, 1)).sum(1)                                          # (R, k)
    lhs = (lhs * K.reshape(R, -1)).sum(1) if g.dim() > 2 else lhs[:, 0]
    return lhs, (n2 if fsq else (_norm2(gw) if sq else None))


def _flat2d(t: Tensor) -> Tensor | None:
    """``t`` as a row-major 2-D view of its own storage (no copy), or None when its layout has none."""
    if t.dim() == 0:
        return t.view(1, 1)
    if t.is_contiguous():
        return t.view(t.shape[0] if t.dim() > 1 else 1, -1)
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return t.permute(0, 2, 3, 1).reshape(t.shape[0], -1)  # a view: channels_last is dense in this order
    return None


def _sep_batch(t: Tensor, items: list[tuple[Sep, Tensor]], sq: bool = False) -> tuple[list[float], float | None]:
    """``⟨r ⊗ S, t⟩`` for every ``(S, r)`` in ``items`` (``t``: (B, C, H, W), ``r``: (B,)): one fused pass over
    ``t`` in its own memory layout for all items (:func:`_rows`), then small contractions of its result;
    with ``sq`` also ``‖t‖²`` from the same pass (None otherwise)."""
    B, C, H, W = t.shape
    out = []
    fsq = sq and t.dtype in (torch.float32, torch.float64)
    if t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous():
        # rows (b, h): L[(item, i), (b, h)] = r[b]·Mh[i, h]; then A = L @ t viewed as (B·H, W·C)
        L = torch.cat([(r.view(1, -1, 1) * s.Mh.view(s.Mh.shape[0], 1, H)).reshape(s.Mh.shape[0], B * H)
                       for s, r in items])
        A, n2 = _rows(t.permute(0, 2, 3, 1).reshape(B * H, W * C), left=L.to(t.dtype), sq=fsq)
        off = 0
        for s, _ in items:
            kh = s.Mh.shape[0]
            Ai = A[off:off + kh].view(kh, W, C).double()
            off += kh
            Z = torch.matmul(s.Mw.double(), Ai)                           # (kh, kw, C)
            out.append(float((Z * s.K.double().permute(1, 2, 0)).sum()))
        return out, (n2 if fsq else (_norm2(t) if sq else None))
    # rows (b, c): L[(item, i, j), (b, c)] = r[b]·K[c, i, j]; then A = L @ t viewed as (B·C, H·W)
    tc = t.contiguous()
    L = torch.cat([(r.view(1, B, 1) * s.K.permute(1, 2, 0).reshape(-1, 1, C)).reshape(-1, B * C)
                   for s, r in items])
    A, n2 = _rows(tc.view(B * C, H * W), left=L.to(t.dtype), sq=fsq)
    off = 0
    for s, _ in items:
        kh, kw = s.Mh.shape[0], s.Mw.shape[0]
        Ai = A[off:off + kh * kw].view(kh, kw, H, W).double()
        off += kh * kw
        P = (Ai * s.Mw.double().view(1, kw, 1, W)).sum(-1)                  # (kh, kw, H)
        out.append(float((P * s.Mh.double().view(kh, 1, H)).sum()))
    return out, (n2 if fsq else (_norm2(t) if sq else None))


Val = Tensor | Fact | Sep | None


def _dense(v: Val) -> Tensor | None:
    return v.dense() if isinstance(v, (Fact, Sep)) else v


def _acc(a: Val, b: Val) -> Val:
    if a is None:
        return b
    if b is None:
        return a
    if isinstance(a, Fact) and isinstance(b, Fact) and a.u is b.u:
        return Fact(a.u, a.V + b.V)
    if isinstance(a, Sep) and isinstance(b, Sep) and a.Mh is b.Mh and a.Mw is b.Mw:
        return Sep(a.K + b.K, a.Mh, a.Mw)
    return _dense(a) + _dense(b)


def _neg(v: Val) -> Val:
    if isinstance(v, Fact):
        return v.with_u(-v.u)
    if isinstance(v, Sep):
        return v.scaled(-1.0)
    return None if v is None else -v


def _scale_vec(ins: Instr, params: dict[str, Tensor]) -> Tensor:
    if ins.op == "scale":
        return params[ins.params[0]]
    s = torch.rsqrt(params[ins.params[0]] + ins.kw["eps"])
    if len(ins.params) > 1:
        s = s * params[ins.params[1]]
    return s


def _generic_vjp(ins: Instr, g: Tensor, shape: tuple[int, ...], params: dict[str, Tensor]) -> Tensor:
    x = torch.zeros(shape, dtype=g.dtype, requires_grad=True)
    with torch.enable_grad():
        y = OPS[ins.op](x, *[params[p] for p in ins.params], **ins.kw)
        (gx,) = torch.autograd.grad(y, x, g.reshape(y.shape))
    return gx


def _unbroadcast(g: Tensor, shape: tuple[int, ...]) -> Tensor:
    while g.dim() > len(shape):
        g = g.sum(0)
    for i, s in enumerate(shape):
        if s == 1 and g.shape[i] != 1:
            g = g.sum(i, keepdim=True)
    return g


def adjoint(program: list[Instr], params: dict[str, Tensor], seeds: dict[str, Val], shapes: Shapes) -> dict[str, Val]:
    """Apply the transpose of the (linear) program to ``seeds`` (cotangents at named values); returns the
    cotangents at every value reached, in particular the program inputs. ``shapes`` are the values' shapes."""
    ct: dict[str, Val] = dict(seeds)
    for ins in reversed(program):
        g = ct.get(ins.out)
        if g is None or shapes.get(ins.out) is None:
            continue
        if isinstance(g, Sep) and ins.op not in ("identity", "scale", "bn_scale", "mul_const", "conv2d"):
            g = g.fact() or g.dense()
        arg_shapes = [shapes.get(a) for a in ins.args]
        op = ins.op
        outs: list[Val]
        if op == "conv2d":
            W, kw = params[ins.params[0]], ins.kw
            xs = arg_shapes[0][0]
            f = g.factors() if isinstance(g, Sep) and kw.get("groups", 1) == 1 else None
            if f is not None:  # rank-1 seed: the transpose stays separable (no convolution at all)
                (s1, s2), (p1, p2), (d1, d2) = (_pair(kw.get(k, d)) for k, d in
                                                (("stride", 1), ("padding", 0), ("dilation", 1)))
                wu = (f[0].to(W.dtype) @ W.reshape(W.shape[0], -1)).view(W.shape[1:])
                outs = [Sep(wu, _pull(f[1], xs[2], W.shape[2], s1, p1, d1), _pull(f[2], xs[3], W.shape[3], s2, p2, d2))]
            elif isinstance(g, Fact) and kw.get("groups", 1) == 1:
                # single-channel transposed convolution in float32 (the fast kernels; float64 convolutions
                # take the slow reference path, and float32 is far below the check's tolerance)
                wu = (g.u.to(W.dtype) @ W.reshape(W.shape[0], -1)).view(1, *W.shape[1:]).float()
                outs = [conv2d_input(xs, wu, g.V.float(), stride=kw.get("stride", 1), padding=kw.get("padding", 0),
                                     dilation=kw.get("dilation", 1))]
            else:
                gd = _dense(g)
                outs = [conv2d_input(xs, W.to(gd.dtype), gd, **kw)]
        elif op == "linear":
            gd = _dense(g)
            W = params[ins.params[0]]
            outs = [(gd.to(W.dtype) @ W).to(gd.dtype)]
        elif op in ("scale", "bn_scale"):
            s = _scale_vec(ins, params)
            outs = [g.with_u(g.u * s.to(g.u.dtype)) if isinstance(g, Fact) else
                    g.scaled(s.to(g.K.dtype)) if isinstance(g, Sep) else OPS["scale"](g, s.to(g.dtype))]
        elif op in ("avg_pool2d", "adaptive_avg_pool2d") and isinstance(g, Fact):
            shp = arg_shapes[0][0]
            outs = [Fact(g.u, _generic_vjp(ins, g.V, (shp[0], 1, *shp[2:]), params))]
        elif op == "identity":
            outs = [g]
        elif op == "mul_const":
            c = ins.kw["c"]
            outs = [g.with_u(g.u * c) if isinstance(g, Fact) else g.scaled(c) if isinstance(g, Sep) else g * c]
        elif op in ("add", "sub"):
            outs = []
            out_shape = shapes[ins.out][0]
            for i, s in enumerate(arg_shapes):
                gi = g if op == "add" or i == 0 else _neg(g)
                if s is not None and tuple(s[0]) != tuple(out_shape):
                    gi = _unbroadcast(_dense(gi), s[0])
                outs.append(gi)
        else:
            outs = [_generic_vjp(ins, _dense(g), arg_shapes[0][0], params)]
        for a, s, c in zip(ins.args, arg_shapes, outs):
            if s is not None and c is not None:
                ct[a] = _acc(ct.get(a), c)
    return ct


def forward_linear(program: list[Instr], params: dict[str, Tensor], injections: dict[str, Val],
                   shapes: Shapes) -> dict[str, Val]:
    """Run the program on ``injections`` added at named values (inputs and intermediate values alike); the
    program is linear, so this is ``Σ_n L_n(injection_n)``. Values that stay zero are ``None``."""
    env: dict[str, Val] = {n: v for n, v in injections.items() if n not in {i.out for i in program}}
    for ins in program:
        if shapes.get(ins.out) is None:
            continue
        args = [env.get(a) for a in ins.args]
        op = ins.op
        y: Val
        if op in ("add", "sub"):
            y = None
            out_shape = shapes[ins.out][0]
            for i, (a, s) in enumerate(zip(args, [shapes.get(n) for n in ins.args])):
                if a is None:
                    continue
                ai = a if op == "add" or i == 0 else _neg(a)
                if s is not None and tuple(s[0]) != tuple(out_shape):
                    ai = _dense(ai).expand(out_shape)
                y = _acc(y, ai)
        elif args[0] is None:
            y = None
        else:
            x = args[0]
            if isinstance(x, Sep) and op not in ("conv2d", "scale", "bn_scale", "mul_const", "identity"):
                x = x.fact() or x.dense()
            f = x.factors() if isinstance(x, Sep) and op == "conv2d" and ins.kw.get("groups", 1) == 1 else None
            if f is not None:  # rank-1 input: the convolution's output stays separable (no convolution at all)
                W, kw = params[ins.params[0]], ins.kw
                (s1, s2), (p1, p2), (d1, d2) = (_pair(kw.get(k, d)) for k, d in
                                                (("stride", 1), ("padding", 0), ("dilation", 1)))
                Wu = (f[0].to(W.dtype) @ W.reshape(*W.shape[:2], -1)).view(W.shape[0], *W.shape[2:])  # batched vecmat
                oh, ow = shapes[ins.out][0][2:]
                y = Sep(Wu, _push(f[1], oh, W.shape[2], s1, p1, d1), _push(f[2], ow, W.shape[3], s2, p2, d2))
            elif op == "conv2d":
                W, kw = params[ins.params[0]], ins.kw
                if isinstance(x, Sep):
                    x = x.fact() or x.dense()
                if isinstance(x, Fact) and kw.get("groups", 1) == 1:
                    wu = x.u.to(W.dtype) @ W.reshape(*W.shape[:2], -1)
                    wu = wu.view(W.shape[0], 1, *W.shape[2:]).float()
                    y = F.conv2d(x.V.float(), wu, None, stride=kw.get("stride", 1), padding=kw.get("padding", 0),
                                 dilation=kw.get("dilation", 1))
                else:
                    xd = _dense(x)
                    y = F.conv2d(xd, W.to(xd.dtype), None, **kw)
            elif op == "linear":
                xd = _dense(x)
                W = params[ins.params[0]]
                y = F.linear(xd.to(W.dtype), W).to(xd.dtype)
            elif op in ("scale", "bn_scale"):
                s = _scale_vec(ins, params)
                y = (x.with_u(x.u * s.to(x.u.dtype)) if isinstance(x, Fact) else
                     x.scaled(s.to(x.K.dtype)) if isinstance(x, Sep) else OPS["scale"](x, s.to(x.dtype)))
            elif op in ("avg_pool2d", "adaptive_avg_pool2d") and isinstance(x, Fact):
                y = Fact(x.u, OPS[op](x.V, **ins.kw))
            elif op == "identity":
                y = x
            elif op == "mul_const":
                c = ins.kw["c"]
                y = x.with_u(x.u * c) if isinstance(x, Fact) else x.scaled(c) if isinstance(x, Sep) else x * c
            else:
                xd = _dense(x)
                y = OPS[op](xd, *[params[p].to(xd.dtype) for p in ins.params], **ins.kw)
        y = _acc(y, injections.get(ins.out))
        env[ins.out] = y
    return env


def _collapse(Rm: Tensor, t: Tensor) -> Tensor:
    """``Rm @ t`` over the batch: (R, B) × (B, …) → (R, …), one pass over ``t`` for all rounds."""
    B = t.shape[0]
    R = Rm.to(t.dtype)
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        tp = t.permute(0, 2, 3, 1)  # a contiguous view: no copy
        out = (R @ tp.reshape(B, -1)).view(Rm.shape[0], *tp.shape[1:])
        return out.permute(0, 3, 1, 2)
    return (R @ t.reshape(B, -1)).view(Rm.shape[0], *t.shape[1:])


def _chan(t: Tensor, M: Tensor) -> Tensor:
    """``out[b, r, h, w] = Σ_c M[r, c] t[b, c, h, w]`` as one matrix product in ``t``'s own memory layout."""
    B, C, H, W = t.shape
    M = M.to(t.dtype)
    if not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return (t.permute(0, 2, 3, 1).reshape(-1, C) @ M.t()).view(B, H, W, -1).permute(0, 3, 1, 2)
    return torch.matmul(M, t.reshape(B, C, H * W)).view(B, -1, H, W)


def _dot(a: Tensor, b: Tensor) -> float:
    """``⟨a, b⟩`` with the products in ``b``'s precision (float32 data stays float32: one pass, no
    conversion copy) and the sum accumulated in float64 over rows of the last dimension."""
    p = a.to(b.dtype) * b
    if p.dim() >= 2:
        return float(p.sum(-1).double().sum())
    return float(p.double().sum())


def _cvec(t: Tensor, u: Tensor) -> Tensor:
    """``out[b, h, w] = Σ_c u[c] t[b, c, h, w]`` as one matrix-vector product in ``t``'s memory layout."""
    u = u.to(t.dtype)
    if not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return t.permute(0, 2, 3, 1) @ u
    B, C = t.shape[:2]
    return (u @ t.reshape(B, C, -1)).view(B, *t.shape[2:])


def _ip(s: Val, t: Tensor | None) -> float:
    """``⟨s, t⟩`` (``t`` already collapsed to the batch of ``s`` where that applies)."""
    if s is None or t is None:
        return 0.0
    if isinstance(s, Fact):
        return float((_cvec(t, s.u).double() * s.V[:, 0]).sum())
    if isinstance(s, Sep):
        return _sep_batch(t, [(s, torch.ones(t.shape[0], dtype=torch.float64))])[0][0]
    return _dot(s, t)


def _norm2(t: Tensor | None) -> float:
    """‖t‖² in one pass over the tensor's own storage (:func:`_rows`: float32 products per chunk, float64
    across chunks). NaN/Inf anywhere make the square sum non-finite: every term is ``x²`` ≥ 0, NaN or +Inf,
    so no cancellation can hide one. A non-finite sum is settled exactly by :func:`_norm2_exact` (an honest
    float32 overflow of the squares is not NaN/Inf): NaN is returned iff ``t`` has a NaN or Inf."""
    if t is None:
        return 0.0
    M = _flat2d(t) if t.dtype in (torch.float32, torch.float64) else None
    n2 = _rows(M, sq=True)[1] if M is not None else float(torch.linalg.vector_norm(t)) ** 2
    return n2 if math.isfinite(n2) else _norm2_exact(t)


def _norm2_exact(t: Tensor) -> float:
    """‖t‖² after a non-finite fast square sum: NaN if ``t`` holds a NaN or Inf (exact element test), else
    the norm recomputed in float64 (finite for any float32 data; ``inf`` only for float64 data beyond it)."""
    if not bool(torch.isfinite(t).all()):
        return math.nan
    return float(torch.linalg.vector_norm(t, dtype=torch.float64)) ** 2


@contextmanager
def _threads(n: int | None) -> Iterator[None]:
    """Run the block with ``n`` torch threads (None: as set)."""
    before = torch.get_num_threads()
    if n is None or n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass
class _Forward:
    program: list[Instr]
    params: dict[str, Tensor]
    shapes: Shapes
    collapsed: bool
    layer: str
    Rm: Tensor | None  # the batch projections (rounds × B) shared by this forward's checks
    value_exp: dict[str, list[tuple[Val, float]]] = field(default_factory=dict)
    full: bool = True  # this job was drawn for the randomized checks (forward and backward alike)


class _Batch:
    """The inner products ``⟨r_k ⊗ S, t⟩`` one check needs, evaluated together: all separable test tensors
    (every round, every output, every expected value) that meet the same tensor are applied in a single
    matrix product over it (:func:`_sep_batch`), so each tensor that crosses is read once per check.
    Anything else (dense or per-sample test tensors, 2-D data) is evaluated at once by the verifier."""

    def __init__(self, verifier: Verifier) -> None:
        self.v = verifier
        self.val: list[float] = []
        self.pending: dict[int, tuple[Tensor, list[tuple[int, Sep, Tensor]]]] = {}

    def add(self, s: Val, t: Tensor | None, Rm: Tensor | None, k: int) -> int:
        """Ask for ``⟨Rm[k] ⊗ s, t⟩`` (``⟨s, t⟩`` when ``Rm`` is None); returns its index in :meth:`run`."""
        i = len(self.val)
        self.val.append(0.0)
        if s is None or t is None:
            return i
        if isinstance(s, Sep) and Rm is not None and t.dim() == 4:
            self.pending.setdefault(id(t), (t, []))[1].append((i, s, Rm[k]))
        else:
            self.val[i] = self.v._ipk(s, t, Rm, k)
        return i

    def run(self) -> list[float]:
        """Evaluate the pending products; a tensor whose norm and finiteness :meth:`Verifier._tensor_ok` left
        to this pass gets its square sum from the same read (:func:`_sep_batch`)."""
        st = self.v._state()
        for t, items in self.pending.values():
            want = id(t) in st.pend and st.pend[id(t)][0] is t
            vals, n2 = _sep_batch(t, [(s, r) for _, s, r in items], sq=want)
            for (i, _, _), x in zip(items, vals):
                self.val[i] = x
            if want:
                st.fused[id(t)] = n2
        self.pending.clear()
        return self.val


@dataclass
class _CheckState:
    """Per-thread state of the check in progress (dropped when it ends)."""

    norms: dict[int, tuple[Tensor, float]] = field(default_factory=dict)  # verified ‖t‖² by id
    coll: dict[tuple[int, int], tuple[Tensor, Tensor]] = field(default_factory=dict)  # batch-collapsed
    pend: dict[int, tuple[Tensor, str]] = field(default_factory=dict)  # norm/finiteness still to settle
    fused: dict[int, float] = field(default_factory=dict)  # ‖t‖² taken in a projection pass
    threads: int | None = None  # the caller's torch threads (for the standalone norm passes)


class Verifier:
    """Checks every accelerator result of one executor; raises :class:`~asymml.errors.IntegrityError`.

    Every reply gets the basic checks (names, shapes, dtypes, finiteness). The randomized (Freivalds)
    checks run on every job of a layer when ``sample`` is 1; with ``sample`` < 1 on a secret random subset
    of jobs (a job = one region's forward and its backward): every job of a layer during its first
    ``warmup`` jobs, then each job independently with probability ``sample`` (drawn from the secret
    generator, so the accelerator cannot tell which results will be checked), and always after
    ``max_gap - 1`` unchecked jobs of that layer in a row. :meth:`detection_probability` states what that
    means for a tampered result; :meth:`stats` reports how many jobs were checked and the time spent.

    Args:
        rounds: independent random test tensors per check (each multiplies the miss probability).
        rtol: tolerance relative to the result's norm; default 1e-3 (CPU float32), 2e-2 for GPUs (TF32).
        device_type: the accelerator's device type (``"cpu"``/``"cuda"``), to pick the default ``rtol``.
        sample: probability that a job after the warm-up gets the randomized checks (1: every job).
        warmup: jobs per layer that are always checked in full.
        max_gap: a layer's job is always checked after ``max_gap - 1`` unchecked ones (None: no bound).
        threads: torch threads while checking (None: as set; default 1, see ``_timed``). Executors pick:
            all threads on an in-process CPU accelerator, one elsewhere (``Executor._new_verifier``).
    """

    def __init__(self, rounds: int = 2, rtol: float | None = None, device_type: str = "cpu", *,
                 sample: float = SAMPLE, warmup: int = WARMUP, max_gap: int | None = MAX_GAP,
                 threads: int | None = 1) -> None:
        if rounds < 1:
            raise ValueError("rounds must be at least 1")
        if not 0.0 < sample <= 1.0:
            raise ValueError("sample must be in (0, 1]")
        if warmup < 0 or (max_gap is not None and max_gap < 1):
            raise ValueError("warmup must be ≥ 0 and max_gap ≥ 1 (or None)")
        self.rounds = rounds
        self.sample = float(sample)
        self.warmup = int(warmup)
        self.max_gap = max_gap
        self.threads = threads
        self._layers: dict[str, tuple[int, int]] = {}  # layer -> (jobs seen, unchecked jobs in a row)
        self.rtol = rtol if rtol is not None else (RTOL_CPU if device_type == "cpu" else RTOL_GPU)
        self._gen = torch.Generator().manual_seed(secrets.randbits(63))
        self._pool, self._pool_pos = torch.empty(0, dtype=torch.float64), 0
        self._lock = threading.Lock()
        self._released: dict[int, Tensor] = {}
        self._forwards: dict[int, _Forward] = {}
        self._shape_cache: dict[tuple, tuple[Shapes, bool]] = {}
        self._stats = self._zero_stats()
        self._local = threading.local()

    def _state(self) -> _CheckState:
        st = getattr(self._local, "st", None)
        if st is None:
            st = self._local.st = _CheckState()
        return st

    def _ipk(self, s: Val, t: Tensor | None, Rm: Tensor | None, k: int) -> float:
        """``⟨S, t⟩`` for ``S = Rm[k] ⊗ s`` (batch-collapsed) or ``S = s`` (``Rm`` is None)."""
        if s is None or t is None:
            return 0.0
        if Rm is not None:
            key = (id(t), id(Rm))
            coll = self._state().coll
            hit = coll.get(key)
            if hit is None or hit[0] is not t:
                hit = (t, _collapse(Rm, t))
                coll[key] = hit
            t = hit[1][k:k + 1]
        return _ip(s, t)

    def _n2(self, t: Tensor | None) -> float:
        """‖t‖² of a tensor already checked by :meth:`_tensor_ok` in this check (computed once)."""
        if t is None:
            return 0.0
        hit = self._state().norms.get(id(t))
        return hit[1] if hit is not None and hit[0] is t else _norm2(t)

    # ------------------------------------------------------------------ bookkeeping
    def release(self, hid: int, tensor: Tensor) -> None:
        """Keep the client's copy of a released tensor (until discarded or consumed)."""
        with self._lock:
            self._released[hid] = tensor.detach()

    def discard(self, hids: list[int]) -> None:
        with self._lock:
            for h in hids:
                self._released.pop(h, None)

    def free(self, key: int) -> None:
        with self._lock:
            self._forwards.pop(key, None)

    @staticmethod
    def _zero_stats() -> dict[str, float]:
        return {"checks": 0, "failures": 0, "seconds": 0.0, "full": 0, "sampled_out": 0}

    def stats(self) -> dict[str, float]:
        """``checks`` (replies verified), ``failures``, ``seconds`` of trusted time spent verifying, and the
        jobs that got the randomized checks (``full``) or only the basic ones (``sampled_out``)."""
        with self._lock:
            return dict(self._stats)

    def reset_stats(self) -> None:
        with self._lock:
            self._stats = self._zero_stats()

    def summary(self) -> dict[str, Any]:
        """What a report should print next to the overhead (``seconds`` per step over asym trusted time):
        the settings, ``detection_per_job`` (a layer's result tampered in one job past the warm-up is caught
        with this probability, when one randomized check catches it, as :func:`.detection.measure_detection` finds for
        tampers above the tolerance), ``caught_within_jobs`` (a tamper in every job of a layer is caught by
        then at the latest; None: no bound; other horizons from :meth:`detection_probability`), and
        :meth:`stats`."""
        return {"rounds": self.rounds, "rtol": self.rtol, "sample": self.sample, "warmup": self.warmup,
                "max_gap": self.max_gap, "detection_per_job": self.detection_probability(1),
                "caught_within_jobs": 1 if self.sample >= 1.0 else self.max_gap, **self.stats()}

    def detection_probability(self, jobs: int = 1, per_check: float = 1.0) -> float:
        """Lower bound on the probability that a layer whose result is tampered in ``jobs`` consecutive jobs
        after its warm-up is caught, where one randomized check catches that tamper with probability
        ``per_check`` (:func:`.detection.measure_detection` estimates it: 1.0 for tampers well above the tolerance).
        ``jobs=1`` is the per-job (per step, per layer) probability, ``sample · per_check``; in the warm-up
        it is ``per_check``. Non-finite values and wrong shapes or dtypes are caught in every job."""
        if jobs < 1:
            raise ValueError("jobs must be at least 1")
        miss = (1.0 - self.sample * per_check) ** jobs  # independent draws
        if self.max_gap is not None:  # at least one forced check in every max_gap jobs
            miss = min(miss, (1.0 - per_check) ** (jobs // self.max_gap))
        return 1.0 - miss

    def shapes(self, program: list[Instr], inputs: dict[str, Tensor | tuple[int, ...]],
               params: dict[str, Tensor], dtype: torch.dtype = torch.float32) -> tuple[Shapes, bool]:
        """(shape, dtype) of every program value, and whether the program is per-sample (batch-collapsible)."""
        ins = {n: (tuple(x.shape) if isinstance(x, Tensor) else tuple(x)) for n, x in inputs.items()}
        dt = next((x.dtype for x in inputs.values() if isinstance(x, Tensor)), dtype)
        key = (id(program), tuple(sorted(ins.items())), tuple((n, tuple(p.shape), p.dtype) for n, p in params.items()), dt)
        hit = self._shape_cache.get(key)
        if hit is not None:
            return hit
        pshapes = {n: (tuple(p.shape), p.dtype) for n, p in params.items()}
        full = infer_shapes(program, {n: (s, dt) for n, s in ins.items()}, pshapes)
        collapsed = False
        batch = {s[0] for s in ins.values() if s}
        if len(batch) == 1 and all(len(s) > 0 for s in ins.values()):
            (B,) = batch
            try:
                one = infer_shapes(program, {n: ((1, *s[1:]), dt) for n, s in ins.items()}, pshapes)
                collapsed = all((a is None and b is None) or (a is not None and b is not None and a[0][0] == B
                                and b[0] == (1, *a[0][1:])) for a, b in ((full[n], one.get(n)) for n in full))
            except ProtocolError:
                collapsed = False
        if len(self._shape_cache) > 4096:
            self._shape_cache.clear()
        self._shape_cache[key] = (full, collapsed)
        return full, collapsed

    # ------------------------------------------------------------------ random test tensors
    def _randn(self, *shape: int) -> Tensor:
        """Random signs times magnitudes uniform in [a, 2a] (unit second moment): continuous, so no fixed
        error cancels with positive probability, and bounded away from 0, so every entry of a rank-1 test
        tensor is at least a⁴ ≈ 0.18 in magnitude (a lone wrong element above the tolerance is always seen).
        Served from a block drawn ahead (a few kernel calls per 64 Ki numbers instead of per test vector);
        never reused."""
        n = math.prod(shape)
        with self._lock:
            if self._pool_pos + n > self._pool.numel():
                m = max(n, 1 << 16)
                mag = torch.rand(m, generator=self._gen, dtype=torch.float64).add_(1.0).mul_(_A)
                sign = torch.randint(0, 2, (m,), generator=self._gen, dtype=torch.int8).mul_(2).sub_(1)
                self._pool, self._pool_pos = mag.mul_(sign), 0
            out = self._pool[self._pool_pos:self._pool_pos + n].view(shape)
            self._pool_pos += n
        return out

    def _test(self, shape: tuple[int, ...], collapsed: bool) -> Val:
        b = 1 if collapsed else shape[0]
        if len(shape) == 4:
            if b == 1:  # rank-1 in space too: a convolution's projection is then one pass (_sep_batch)
                return Sep.rank1(self._randn(shape[1]), self._randn(shape[2]), self._randn(shape[3]))
            return Fact(self._randn(shape[1]), self._randn(b, 1, *shape[2:]))
        return self._randn(b, *shape[1:])

    def _one(self, shapes: Shapes, collapsed: bool) -> Shapes:
        if not collapsed:
            return shapes
        return {n: (None if v is None else ((1, *v[0][1:]), torch.float64)) for n, v in shapes.items()}

    # ------------------------------------------------------------------ checks
    def _fail(self, layer: str, what: str) -> IntegrityError:
        with self._lock:
            self._stats["failures"] += 1
        return IntegrityError(f"accelerator result for layer {layer!r} failed verification: {what}")

    def _tensor_ok(self, layer: str, where: str, t: Any, spec: tuple[tuple[int, ...], torch.dtype] | None,
                   defer: bool = False) -> None:
        """Type, shape and dtype of ``t`` now; its finiteness (and the norm the tolerance needs) now, or with
        ``defer`` at the next :meth:`_settle`, taken from a projection pass over ``t`` if one ran by then."""
        if t is None:
            return
        if not isinstance(t, Tensor):
            raise self._fail(layer, f"{where} is a {type(t).__name__}, not a tensor")
        if spec is None:
            raise self._fail(layer, f"{where} should be absent (all-zero), got a tensor of shape {tuple(t.shape)}")
        shape, dtype = spec
        if tuple(t.shape) != tuple(shape):
            raise self._fail(layer, f"{where} has shape {tuple(t.shape)}, expected {tuple(shape)}")
        if t.dtype != dtype:
            raise self._fail(layer, f"{where} has dtype {t.dtype}, expected {dtype}")
        self._state().pend[id(t)] = (t, where)
        if not defer:
            self._settle(layer)

    def _settle(self, layer: str) -> None:
        """Finiteness and norm of every tensor :meth:`_tensor_ok` accepted so far in this check, in order:
        from a fused projection pass where one ran, else one pass of its own (:func:`_norm2`)."""
        st = self._state()
        for i, (t, where) in list(st.pend.items()):
            n2 = st.fused.pop(i, None)
            if n2 is None:
                with _threads(st.threads):  # one long streaming pass: every core's bandwidth (3x faster)
                    n2 = _norm2(t)
            elif not math.isfinite(n2):
                n2 = _norm2_exact(t)
            del st.pend[i]
            if math.isnan(n2):
                raise self._fail(layer, f"{where} contains NaN or Inf")
            if not math.isfinite(n2):
                raise self._fail(layer, f"{where} has a norm beyond the float64 range")
            st.norms[i] = (t, n2)

    def _compare(self, layer: str, what: str, lhs: float, rhs: float, norm2: float) -> None:
        tol = self.rtol * math.sqrt(norm2) + 1e-30
        if not abs(lhs - rhs) <= tol:
            raise self._fail(layer, f"{what} fail the randomized check (projection {lhs:.6g} vs expected "
                                    f"{rhs:.6g}, tolerance {tol:.3g})")

    def _params(self, params: dict[str, Tensor]) -> dict[str, Tensor]:
        # scale vectors in float64 (small); weights stay as they are (large: contracted in their own precision)
        return {n: (p.detach() if p.dim() >= 2 else p.detach().double()) for n, p in params.items()}

    @contextmanager
    def _timed(self) -> Iterator[None]:
        """Every check: count it, add its time, and drop the per-check caches (norms, collapsed tensors).
        The check runs with ``threads`` torch threads in this thread (its many small kernels would each wait
        for the other threads of a parallel region), except the standalone norm passes of :meth:`_settle`
        (finiteness of every reply), long streaming reads that run about 3x faster on two threads than on one."""
        t0 = time.perf_counter()
        self._state().threads = torch.get_num_threads()
        try:
            with _threads(self.threads):
                yield
        finally:
            self._local.st = None
            with self._lock:
                self._stats["checks"] += 1
                self._stats["seconds"] += time.perf_counter() - t0

    def _draw(self, layer: str) -> bool:
        """Whether this job of ``layer`` gets the randomized checks (see the class docstring): always in the
        warm-up and after ``max_gap - 1`` unchecked jobs in a row, else with probability ``sample``, drawn
        from the secret generator."""
        with self._lock:
            seen, gap = self._layers.get(layer, (0, 0))
            full = (seen < self.warmup or (self.max_gap is not None and gap + 1 >= self.max_gap)
                    or float(torch.rand((), generator=self._gen, dtype=torch.float64)) < self.sample)
            self._layers[layer] = (seen + 1, 0 if full else gap + 1)
            self._stats["full" if full else "sampled_out"] += 1
        return full

    def check_forward(self, key: int, program: list[Instr], inputs: dict[str, int], params: dict[str, Tensor],
                      outputs: list[str], result: Any, *, layer: str, keep_graph: bool) -> None:
        """Verify a forward reply (``inputs`` maps program inputs to released handle ids)."""
        with self._timed():
            with self._lock:
                xs = {n: self._released.get(h) for n, h in inputs.items()}
            if any(x is None for x in xs.values()):
                return  # released before verification was switched on
            shapes, collapsed = self.shapes(program, xs, params)
            if not isinstance(result, dict) or set(result) != set(outputs):
                got = sorted(result) if isinstance(result, dict) else type(result).__name__
                raise self._fail(layer, f"forward returned {got}, expected outputs {sorted(outputs)}")
            for o in outputs:
                self._tensor_ok(layer, f"forward output {o!r}", result[o], shapes.get(o), defer=True)
            full = self._draw(layer)
            rec = _Forward(program, dict(params), shapes, collapsed, layer, None, full=full) if keep_graph else None
            if not full:
                self._settle(layer)
                if rec is not None:
                    with self._lock:
                        self._forwards[key] = rec
                return
            P = self._params(params)
            sh1 = self._one(shapes, collapsed)
            B = shapes[next(iter(xs))][0][0]
            Rm = self._randn(self.rounds, B) if collapsed else None
            bt = _Batch(self)
            # one check per output, each with its own tolerance (a small output is not hidden by a large one):
            # ⟨S, Y⟩ = ⟨Pᵀ S, X⟩
            checks = []
            for o in outputs:
                if shapes.get(o) is None:
                    continue
                for k in range(self.rounds):
                    seed = self._test(shapes[o][0], collapsed)
                    adj = adjoint(program, P, {o: seed}, sh1)
                    checks.append((o, bt.add(seed, result[o], Rm, k),
                                   [bt.add(adj.get(n), x, Rm, k) for n, x in xs.items()]))
            # expected projections of the intermediate values the backward will return (inputs of weighted
            # ops), taken now that the released inputs are at hand, in the same pass over them
            exps: dict[str, list[tuple[Val, list[int]]]] = {}
            if rec is not None:
                rec.Rm = Rm
                for n in {i.args[0] for i in program if i.params and i.args and shapes.get(i.args[0]) is not None}:
                    for k in range(self.rounds):
                        s = self._test(shapes[n][0], collapsed)
                        adj = adjoint(program, P, {n: s}, sh1)
                        exps.setdefault(n, []).append((s, [bt.add(adj.get(m), x, Rm, k) for m, x in xs.items()]))
            val = bt.run()
            self._settle(layer)  # NaN/Inf are reported as such, before any randomized comparison
            for o, lhs, rhs in checks:
                self._compare(layer, f"forward output {o!r}", val[lhs], sum(val[i] for i in rhs), self._n2(result[o]))
            if rec is not None:
                rec.value_exp = {n: [(s, sum(val[i] for i in rhs)) for s, rhs in lst] for n, lst in exps.items()}
                with self._lock:
                    self._forwards[key] = rec

    def check_backward(self, key: int, request: BackwardRequest, result: Any) -> None:
        """Verify a backward reply against the kept forward ``key`` and the released output gradients."""
        with self._timed():
            with self._lock:
                rec = self._forwards.pop(key, None)
                gids = {n: h.id for n, h in request.grad_outputs.items() if h is not None}
                G = {n: self._released.pop(h, None) for n, h in gids.items()}
            if rec is None or any(g is None for g in G.values()):
                return  # forward not verified (verification switched on later)
            layer, shapes, program, collapsed = rec.layer, rec.shapes, rec.program, rec.collapsed
            sections = {"input_grads": request.input_grads, "param_grads": request.param_grads,
                        "value_grads": request.value_grads, "values": request.values}
            if not isinstance(result, dict) or set(result) != set(sections):
                raise self._fail(layer, "backward result must have input_grads/param_grads/value_grads/values")
            pspec = {n: (tuple(p.shape), p.dtype) for n, p in rec.params.items()}
            for sect, names in sections.items():
                got = result[sect]
                if not isinstance(got, dict) or not set(got) <= set(names):
                    raise self._fail(layer, f"backward {sect} has entries {sorted(got) if isinstance(got, dict) else got!r} "
                                            f"that were not requested ({sorted(names)})")
                for n, t in got.items():
                    spec = pspec.get(n) if sect == "param_grads" else shapes.get(n)
                    self._tensor_ok(layer, f"backward {sect}[{n!r}]", t, spec, defer=True)
            if not rec.full:
                self._settle(layer)
                return
            P = self._params(rec.params)
            sh1 = self._one(shapes, collapsed)
            B = next(s[0][0] for s in shapes.values() if s is not None)
            bt = _Batch(self)
            checks: list[tuple[str, int, float | list[int], Tensor | None]] = []
            # intermediate values (forward quantities returned with the backward)
            vals = result["values"]
            for n in request.values:
                exps = rec.value_exp.get(n)
                if exps is None:
                    if vals.get(n) is not None:
                        raise self._fail(layer, f"backward values[{n!r}] should be absent")
                    continue
                for k, (s, exp) in enumerate(exps):
                    checks.append((f"values[{n!r}]", bt.add(s, vals.get(n), rec.Rm, k), exp, vals.get(n)))
            # input and intermediate gradients: ⟨S, δ⟩ = ⟨L S, G⟩
            roots = {n: g for n, g in G.items() if shapes.get(n) is not None}
            claimed = {("input_grads", n): result["input_grads"].get(n) for n in request.input_grads}
            claimed.update({("value_grads", n): result["value_grads"].get(n) for n in request.value_grads})
            claimed = {k: v for k, v in claimed.items() if shapes.get(k[1]) is not None}
            Rm = self._randn(self.rounds, B) if collapsed and claimed else None
            for (sect, n), v in claimed.items():  # one check per gradient, each with its own tolerance
                for k in range(self.rounds):
                    s = self._test(shapes[n][0], collapsed)
                    outs = forward_linear(program, P, {n: s}, sh1)
                    checks.append((f"{sect}[{n!r}] (gradient)", bt.add(s, v, Rm, k),
                                   [bt.add(outs.get(o), g, Rm, k) for o, g in roots.items()], v))
            val = bt.run()
            # weight gradients' projections ⟨T, ∇W⟩ (test weights drawn now), with their norms in the same pass
            st = self._state()
            wtests: dict[str, tuple[Tensor, Tensor, Tensor, Tensor] | None] = {}
            for p in request.param_grads:
                W, gw = rec.params.get(p), result["param_grads"].get(p)
                if W is None or W.dim() < 2:
                    wtests[p] = None  # refused below (only conv/linear weights are verifiable)
                    continue
                T = self._randn(self.rounds, W.shape[0])  # test tensor per round: t ⊗ m ⊗ K (conv), t ⊗ m (linear)
                m = self._randn(self.rounds, W.shape[1])
                K = self._randn(self.rounds, *W.shape[2:])
                if gw is None:
                    lhs = torch.zeros(self.rounds, dtype=torch.float64)
                else:
                    want = id(gw) in st.pend and st.pend[id(gw)][0] is gw
                    lhs, n2 = _wproj(gw, T, m, K, want)
                    if want:
                        st.fused[id(gw)] = n2
                wtests[p] = (T, m, K, lhs)
            self._settle(layer)  # NaN/Inf are reported as such, before any randomized comparison
            for what, lhs, rhs, t in checks:
                exp = rhs if isinstance(rhs, float) else sum(val[i] for i in rhs)
                self._compare(layer, what, val[lhs], exp, self._n2(t))
            # weight gradients: ⟨T, ∇W⟩ = Σ_uses ⟨δ_j, op(x_j, T)⟩ with verified δ_j, x_j
            for p in request.param_grads:
                gw = result["param_grads"].get(p)
                uses = [i for i in program if p in i.params]
                if any(i.op not in ("conv2d", "linear") or i.params[0] != p for i in uses):
                    raise self._fail(layer, f"weight gradient of {p!r} cannot be verified (not a conv/linear weight)")
                wt = wtests[p]
                if wt is None:
                    raise self._fail(layer, f"weight gradient of {p!r} cannot be verified (not a conv/linear weight)")
                T, m, K, lhs = wt
                exp = torch.zeros(self.rounds, dtype=torch.float64)
                for ins in uses:
                    if shapes.get(ins.out) is None:
                        continue
                    if (ins.out not in request.value_grads) or (ins.args[0] not in request.values):
                        raise self._fail(layer, f"weight gradient of {p!r} cannot be verified without the "
                                                "value and gradient at its op (request them)")
                    d, x = result["value_grads"].get(ins.out), vals.get(ins.args[0])
                    if d is not None and x is not None:
                        exp += self._wgrad_proj(ins, x, d, T, m, K)
                for k in range(self.rounds):
                    self._compare(layer, f"weight gradient of {p!r}", float(lhs[k]), float(exp[k]), self._n2(gw))

    @staticmethod
    def _wgrad_proj(ins: Instr, x: Tensor, d: Tensor, T: Tensor, m: Tensor, K: Tensor) -> Tensor:
        """``⟨δ, op(x, T_k)⟩`` for every round ``k``, with the rank-1 test weight ``T_k = T[k] ⊗ m[k] ⊗ K[k]``:
        the input channels are contracted first (one pass over ``x``), then one single-channel convolution
        per round, so the cost is about ``B·H·W·(C + k²)`` instead of a convolution's ``B·H·W·C·k²``."""
        R = T.shape[0]
        if ins.op == "linear":
            dt = d.reshape(-1, d.shape[-1]) @ T.to(d.dtype).t()           # (N, R)
            xm = x.reshape(-1, x.shape[-1]) @ m.to(x.dtype).t()           # (N, R)
            return (dt.double() * xm.double()).sum(0)
        kw = ins.kw
        g = kw.get("groups", 1)
        O = T.shape[1]
        B, C = x.shape[:2]
        # m[k] correlates with the input channels of each output channel's group
        if g == 1:
            xm = _chan(x, m)
        else:
            xm = torch.einsum("bgchw,rc->bgrhw", x.reshape(B, g, C // g, *x.shape[2:]), m.to(x.dtype))
            xm = xm.reshape(B, g * R, *x.shape[2:])
        Kw = K.to(x.dtype).unsqueeze(1).repeat(g, 1, 1, 1)               # (g·R, 1, k, k)
        Z = F.conv2d(xm, Kw, None, stride=kw.get("stride", 1), padding=kw.get("padding", 0),
                     dilation=kw.get("dilation", 1), groups=g * R)     # (B, g·R, H', W'), channel = group·R + k
        Z = Z.contiguous()
        if g == 1:
            dt = _chan(d, T)
        else:
            dt = torch.einsum("bgohw,kgo->bgkhw", d.reshape(B, g, O // g, *d.shape[2:]),
                              T.to(d.dtype).view(R, g, O // g)).reshape(B, g * R, *d.shape[2:])
        return (dt.double() * Z.double()).reshape(B, g, R, -1).sum((0, 1, 3))


def wrap_future(fut: Any, check: Callable[[Any], None]) -> Any:
    """A future resolving to ``fut``'s result once ``check(result)`` passed (its exception otherwise)."""
    from concurrent.futures import Future

    out: Future = Future()

    def done(f: Any) -> None:
        exc = f.exception()
        if exc is not None:
            out.set_exception(exc)
            return
        res = f.result()
        try:
            check(res)
        except BaseException as e:  # noqa: BLE001 - handed to the waiter
            out.set_exception(e)
        else:
            out.set_result(res)

    fut.add_done_callback(done)
    return out
