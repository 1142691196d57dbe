"""Split rules: how each linear op runs on a (trusted part, residual) pair.

A registry keyed by what torch.fx sees (module types, functions, method names), like Opacus'
``register_grad_sampler``. A rule gives, for one op ``y = A x + b``:

* the accelerator instruction computing ``A R`` (bias-free, public weights);
* ``trusted_forward``: ``A T + b`` on the trusted part, exploiting low-rank factors where that is cheaper;
* ``input_grad``: ``Aᵀ d`` for a trusted gradient part (low-rank where possible);
* ``param_grads``: the trusted share of the parameter gradients.

Trusted parts (``TPart``) are ``None`` (zero), :class:`Low` (factors ``U V``) or a dense tensor.
Ops that are not linear have no rule here and run in the trusted context; ``NONLINEAR`` lists the ones
known to be non-linear on purpose, so that strict mode can tell them apart from unknown ops.
"""

from __future__ import annotations

import operator
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.nn.grad import conv2d_input, conv2d_weight

from .decomposition import Factors


@dataclass
class Low:
    """A low-rank trusted part: per sample ``U_b V_b`` reshaped to ``B×C×H×W``."""

    f: Factors
    spatial: tuple[int, ...]

    @property
    def shape(self) -> tuple[int, ...]:
        C = self.f.U.shape[-2]
        return (self.f.V.shape[0], C, *self.spatial)

    def dense(self) -> Tensor:
        return self.f.dense().reshape(self.shape)

    @property
    def Vmaps(self) -> Tensor:
        return self.f.V.reshape(self.f.V.shape[0], self.f.V.shape[1], *self.spatial)


TPart = Low | Tensor | None


def dense(t: TPart, shape: tuple[int, ...] | None = None, like: Tensor | None = None) -> Tensor | None:
    """Materialise a trusted part (``None`` stays ``None`` unless ``shape`` is given)."""
    if t is None:
        if shape is None:
            return None
        return torch.zeros(shape, dtype=like.dtype if like is not None else torch.float32)
    if isinstance(t, Low):
        return t.dense()
    return t


def tadd(a: TPart, b: TPart) -> TPart:
    if a is None:
        return b
    if b is None:
        return a
    return dense(a) + dense(b)


@dataclass
class Bound:
    """A rule bound to one graph node: the op's module (if any) and its static arguments."""

    rule: SplitRule
    module: nn.Module | None
    kw: dict[str, Any]
    n_inputs: int


class SplitRule:
    """Base class. ``heavy`` rules own a weight whose gradient is split between the two sides."""

    heavy = False
    accel_op = "identity"

    # ---- binding
    def bind(self, node: Any, module: nn.Module | None) -> Bound | None:
        """Return a binding, or ``None`` if this node is not linear after all (then it runs trusted)."""
        return Bound(self, module, {}, 1)

    # ---- parameters
    def params(self, b: Bound) -> dict[str, nn.Parameter]:
        return {}

    def accel_params(self, b: Bound) -> dict[str, Tensor]:
        """Public tensors the accelerator needs (by value)."""
        return {}

    def accel_kw(self, b: Bound) -> dict[str, Any]:
        return dict(b.kw)

    # ---- forward
    def forward_dense(self, b: Bound, xs: list[Tensor], with_bias: bool = True) -> Tensor:
        raise NotImplementedError

    def trusted_forward(self, b: Bound, ts: list[TPart], shapes: list[tuple[int, ...]]) -> TPart:
        if all(t is None for t in ts) and not self.has_bias(b):
            return None
        xs = [dense(t, s) for t, s in zip(ts, shapes)]
        return self.forward_dense(b, xs)

    def has_bias(self, b: Bound) -> bool:
        return False

    def out_shape(self, b: Bound, shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
        """Output shape from input shapes (default: run the bias-free op on meta tensors)."""
        return tuple(self.forward_dense(b, [torch.empty(s, device="meta") for s in shapes], with_bias=False).shape)

    # ---- backward
    def input_grad(self, b: Bound, d: TPart, shapes: list[tuple[int, ...]]) -> list[TPart]:
        """``Aᵀ d`` for each input (the linear part only)."""
        if d is None:
            return [None] * len(shapes)
        dd = dense(d)
        zs = [torch.zeros(s, dtype=dd.dtype, requires_grad=True) for s in shapes]
        with torch.enable_grad():
            y = self.forward_dense(b, zs, with_bias=False)
            gs = torch.autograd.grad(y, zs, dd, allow_unused=True)
        return list(gs)

    def param_grads(
        self, b: Bound, t_in: TPart, r_in: Tensor | None, delta: Tensor, d_t: TPart, shape: tuple[int, ...]
    ) -> dict[str, Tensor]:
        """Trusted share of the parameter gradients (the accelerator adds ``R̃ ⋆ δ_A`` for heavy weights)."""
        return {}


REGISTRY_MODULES: dict[type, SplitRule] = {}
REGISTRY_FUNCTIONS: dict[Any, SplitRule] = {}
REGISTRY_METHODS: dict[str, SplitRule] = {}


def register_split_rule(*targets: Any) -> Callable[[type[SplitRule]], type[SplitRule]]:
    """Register a rule class for module types, functions, or method names (strings)."""

    def deco(cls: type[SplitRule]) -> type[SplitRule]:
        inst = cls()
        for t in targets:
            if isinstance(t, type) and issubclass(t, nn.Module):
                REGISTRY_MODULES[t] = inst
            elif isinstance(t, str):
                REGISTRY_METHODS[t] = inst
            else:
                REGISTRY_FUNCTIONS[t] = inst
        return cls

    return deco


# ------------------------------------------------------------------------------------------ conv2d


def _conv_geom(m: nn.Conv2d) -> dict[str, Any]:
    if isinstance(m.padding, str):
        raise ValueError("string padding")
    return dict(stride=m.stride, padding=m.padding, dilation=m.dilation, groups=m.groups)


@register_split_rule(nn.Conv2d)
class Conv2dRule(SplitRule):
    """Conv2d of any stride/padding/dilation/groups. Folds ``U`` into the weights when that is cheaper."""

    heavy = True
    accel_op = "conv2d"

    def bind(self, node: Any, module: nn.Module | None) -> Bound | None:
        m = module
        if m.padding_mode != "zeros" or isinstance(m.padding, str):
            return None
        return Bound(self, m, _conv_geom(m), 1)

    def params(self, b: Bound) -> dict[str, nn.Parameter]:
        p = {"weight": b.module.weight}
        if b.module.bias is not None:
            p["bias"] = b.module.bias
        return p

    def accel_params(self, b: Bound) -> dict[str, Tensor]:
        return {"weight": b.module.weight}

    def has_bias(self, b: Bound) -> bool:
        return b.module.bias is not None

    def out_shape(self, b: Bound, shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
        B, _, H, W = shapes[0]
        return (B, b.module.out_channels, *self._out_hw(b.module, H, W))

    def forward_dense(self, b: Bound, xs: list[Tensor], with_bias: bool = True) -> Tensor:
        m = b.module
        return F.conv2d(xs[0], m.weight, m.bias if with_bias else None, **b.kw)

    # cost model (multiply-accumulates) ------------------------------------------------------
    @staticmethod
    def _out_hw(m: nn.Conv2d, h: int, w: int) -> tuple[int, int]:
        k, s, p, d = m.kernel_size, m.stride, m.padding, m.dilation
        ho = (h + 2 * p[0] - d[0] * (k[0] - 1) - 1) // s[0] + 1
        wo = (w + 2 * p[1] - d[1] * (k[1] - 1) - 1) // s[1] + 1
        return ho, wo

    def _fold_cheaper(self, m: nn.Conv2d, B: int, r: int, shared: bool, hw_in: int, hw_out: int) -> bool:
        C, O, g = m.in_channels, m.out_channels, m.groups
        kk = m.kernel_size[0] * m.kernel_size[1]
        fold = (1 if shared else B) * O * (C // g) * r * kk + B * O * r * kk * hw_out
        direct = B * C * r * hw_in + B * O * (C // g) * kk * hw_out
        return fold < direct

    def _gfold_cheaper(self, m: nn.Conv2d, B: int, r: int, hw_in: int, hw_out: int) -> bool:
        """Cost model for folding a low-rank *gradient* ``P Q`` (output side) into the weights."""
        C, O, g = m.in_channels, m.out_channels, m.groups
        kk = m.kernel_size[0] * m.kernel_size[1]
        fold = B * r * O * (C // g) * kk + B * r * C * kk * hw_out
        direct = B * O * r * hw_out + B * O * (C // g) * kk * hw_out
        return fold < direct

    def _fold_weight(self, m: nn.Conv2d, U: Tensor) -> Tensor:
        """``W'[o, j] = Σ_{c ∈ group(o)} W[o, c] U[c, j]`` → ``(…, O, r, kh, kw)``."""
        g, O, C = m.groups, m.out_channels, m.in_channels
        W = m.weight.view(g, O // g, C // g, *m.kernel_size)
        if U.dim() == 2:
            Ug = U.view(g, C // g, -1)
            return torch.einsum("gocxy,gcj->gojxy", W, Ug).reshape(O, -1, *m.kernel_size)
        B = U.shape[0]
        r = U.shape[-1]
        if g == 1:
            # one GEMM against the weight laid out as (O·k², C), cached per weight version: much faster
            # than the equivalent einsum, which re-lays out the weight for every call
            y = torch.matmul(self._weight_okc(m), U)  # B × O·k² × r
            return y.view(B, O, *m.kernel_size, r).permute(0, 1, 4, 2, 3).reshape(B * O, r, *m.kernel_size)
        Ug = U.view(B, g, C // g, -1)
        return torch.einsum("gocxy,bgcj->bgojxy", W, Ug).reshape(B * O, -1, *m.kernel_size)

    _okc_cache: dict[int, tuple[int, Any, Tensor]] = {}

    def _weight_okc(self, m: nn.Conv2d) -> Tensor:
        """The weight as an ``(O·kh·kw, C)`` matrix, cached per weight tensor and version (the entry
        dies with the weight)."""
        w = m.weight
        key = id(w)
        hit = self._okc_cache.get(key)
        if hit is not None and hit[0] == w._version and hit[1]() is w:
            return hit[2]
        okc = w.detach().permute(0, 2, 3, 1).reshape(-1, w.shape[1]).contiguous()
        if hit is None or hit[1]() is not w:
            weakref.finalize(w, self._okc_cache.pop, key, None)
        self._okc_cache[key] = (w._version, weakref.ref(w), okc)
        return okc

    @staticmethod
    def _conv_t(m: nn.Conv2d, Wf: Tensor, Q: Tensor, in_shape: tuple[int, ...], groups: int) -> Tensor:
        """Transposed conv of the ``r`` maps ``Q`` with folded weights ``Wf`` (``groups·r × C × k × k``).

        A stride-1 transposed conv is a conv with the flipped, transposed kernel; oneDNN's forward conv
        is 3–5× faster than its backward-data kernel at these shapes."""
        k, p, dl = m.kernel_size, m.padding, m.dilation
        pad = (dl[0] * (k[0] - 1) - p[0], dl[1] * (k[1] - 1) - p[1])
        if m.stride == (1, 1) and min(pad) >= 0:
            r = Wf.shape[0] // groups
            C = Wf.shape[1]
            Wt = Wf.view(groups, r, C, *k).transpose(1, 2).flip(-1, -2).reshape(groups * C, r, *k)
            return F.conv2d(Q, Wt, None, padding=pad, dilation=dl, groups=groups)
        return conv2d_input(in_shape, Wf, Q, stride=m.stride, padding=m.padding, dilation=m.dilation, groups=groups)

    def trusted_forward(self, b: Bound, ts: list[TPart], shapes: list[tuple[int, ...]]) -> TPart:
        m, t = b.module, ts[0]
        if t is None:
            if m.bias is None:
                return None
            B, _, H, W = shapes[0]
            ho, wo = self._out_hw(m, H, W)
            return m.bias.view(1, -1, 1, 1).expand(B, -1, ho, wo).contiguous()
        if isinstance(t, Low):
            B, C, H, W = t.shape
            r = t.f.rank
            ho, wo = self._out_hw(m, H, W)
            if self._fold_cheaper(m, B, r, t.f.shared, H * W, ho * wo):
                kw = dict(stride=m.stride, padding=m.padding, dilation=m.dilation)
                Wf = self._fold_weight(m, t.f.U)
                if t.f.shared:
                    return F.conv2d(t.Vmaps, Wf, m.bias, **kw)
                bias = None if m.bias is None else m.bias.repeat(B)  # added inside the conv: no extra pass
                y = F.conv2d(t.Vmaps.reshape(1, B * r, H, W), Wf, bias, groups=B, **kw)
                return y.view(B, m.out_channels, ho, wo)
            t = t.dense()
        return self.forward_dense(b, [t])

    def input_grad(self, b: Bound, d: TPart, shapes: list[tuple[int, ...]]) -> list[TPart]:
        m = b.module
        if d is None:
            return [None]
        B, C, H, W = shapes[0]
        if isinstance(d, Low) and d.f.shared:
            r = d.f.rank
            ho, wo = d.spatial
            if self._gfold_cheaper(m, 1, r, H * W, ho * wo):
                g, O = m.groups, m.out_channels
                Wv = m.weight.view(g, O // g, C // g, *m.kernel_size)
                Wf = torch.einsum("goj,gocxy->jgcxy", d.f.U.view(g, O // g, r), Wv).reshape(r, C, *m.kernel_size)
                return [self._conv_t(m, Wf, d.Vmaps, (B, C, H, W), 1)]
        if isinstance(d, Low) and not d.f.shared:
            r = d.f.rank
            ho, wo = d.spatial
            # convT(P Q, W) = convT(Q, Σ_o P[o,j] W[o,c]) — the same fold, on the gradient side
            if not d.f.shared and self._gfold_cheaper(m, B, r, H * W, ho * wo):
                g, O = m.groups, m.out_channels
                Wv = m.weight.view(g, O // g, C // g, *m.kernel_size)
                P = d.f.U.view(B, g, O // g, r)
                Wf = torch.einsum("bgoj,gocxy->bjgcxy", P, Wv).reshape(B * r, C, *m.kernel_size)
                gx = self._conv_t(m, Wf, d.Vmaps.reshape(1, B * r, ho, wo), (1, B * C, H, W), B)
                return [gx.view(B, C, H, W)]
            d = d.dense()
        return [conv2d_input(shapes[0], m.weight, d, stride=m.stride, padding=m.padding,
                             dilation=m.dilation, groups=m.groups)]

    def param_grads(
        self, b: Bound, t_in: TPart, r_in: Tensor | None, delta: Tensor, d_t: TPart, shape: tuple[int, ...]
    ) -> dict[str, Tensor]:
        m = b.module
        g, O, C = m.groups, m.out_channels, m.in_channels
        kw = dict(stride=m.stride, padding=m.padding, dilation=m.dilation)
        B, _, H, W = shape
        ho, wo = delta.shape[-2:]
        gw = torch.zeros_like(m.weight)
        # T ⋆ δ  (T low-rank: per-sample correlations of the r maps of V with δ, then expand by U)
        if isinstance(t_in, Low) and self._fold_cheaper(m, B, t_in.f.rank, t_in.f.shared, H * W, ho * wo):
            r = t_in.f.rank
            if t_in.f.shared:
                G = conv2d_weight(t_in.Vmaps, (O, r, *m.kernel_size), delta, **kw)
                Ug = t_in.f.U.view(g, C // g, r)
                gw += torch.einsum("gojxy,gcj->gocxy", G.view(g, O // g, r, *m.kernel_size), Ug).reshape(gw.shape)
            else:
                G = conv2d_weight(t_in.Vmaps.reshape(1, B * r, H, W), (B * O, r, *m.kernel_size),
                                  delta.reshape(1, B * O, ho, wo), groups=B, **kw)
                G = G.view(B, g, O // g, r, *m.kernel_size)
                Ug = t_in.f.U.view(B, g, C // g, r)
                gw += torch.einsum("bgojxy,bgcj->gocxy", G, Ug).reshape(gw.shape)
        elif t_in is not None:
            gw += conv2d_weight(dense(t_in), m.weight.shape, delta, groups=g, **kw)
        # R̃ ⋆ δ_T  (δ_T low-rank: correlate R̃ with the r maps of Q, then expand by P)
        if r_in is not None and d_t is not None:
            if isinstance(d_t, Low) and d_t.f.shared and self._gfold_cheaper(m, 1, d_t.f.rank, H * W, ho * wo):
                r = d_t.f.rank
                Hm = conv2d_weight(r_in, (r, C, *m.kernel_size), d_t.Vmaps, **kw)
                P = d_t.f.U.view(g, O // g, r)
                gw += torch.einsum("goj,jgcxy->gocxy", P, Hm.view(r, g, C // g, *m.kernel_size)).reshape(gw.shape)
            elif isinstance(d_t, Low) and not d_t.f.shared and self._gfold_cheaper(m, B, d_t.f.rank, H * W, ho * wo):
                r = d_t.f.rank
                Hm = conv2d_weight(r_in.reshape(1, B * C, H, W), (B * r, C, *m.kernel_size),
                                   d_t.Vmaps.reshape(1, B * r, ho, wo), groups=B, **kw)
                Hm = Hm.view(B, r, g, C // g, *m.kernel_size)
                P = d_t.f.U.view(B, g, O // g, r)
                gw += torch.einsum("bjgcxy,bgoj->gocxy", Hm, P).reshape(gw.shape)
            else:
                gw += conv2d_weight(r_in, m.weight.shape, dense(d_t), groups=g, **kw)
        out = {"weight": gw}
        if m.bias is not None:
            out["bias"] = delta.sum((0, 2, 3))
        return out


# ------------------------------------------------------------------------------------------ linear


@register_split_rule(nn.Linear)
class LinearRule(SplitRule):
    """Linear layers: the trusted share is dense (a per-sample low-rank input saves nothing here)."""

    heavy = True
    accel_op = "linear"

    def bind(self, node: Any, module: nn.Module | None) -> Bound | None:
        return Bound(self, module, {}, 1)

    def params(self, b: Bound) -> dict[str, nn.Parameter]:
        p = {"weight": b.module.weight}
        if b.module.bias is not None:
            p["bias"] = b.module.bias
        return p

    def accel_params(self, b: Bound) -> dict[str, Tensor]:
        return {"weight": b.module.weight}

    def has_bias(self, b: Bound) -> bool:
        return b.module.bias is not None

    def out_shape(self, b: Bound, shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
        return (*shapes[0][:-1], b.module.out_features)

    def forward_dense(self, b: Bound, xs: list[Tensor], with_bias: bool = True) -> Tensor:
        return F.linear(xs[0], b.module.weight, b.module.bias if with_bias else None)

    def input_grad(self, b: Bound, d: TPart, shapes: list[tuple[int, ...]]) -> list[TPart]:
        if d is None:
            return [None]
        return [dense(d) @ b.module.weight]

    def param_grads(
        self, b: Bound, t_in: TPart, r_in: Tensor | None, delta: Tensor, d_t: TPart, shape: tuple[int, ...]
    ) -> dict[str, Tensor]:
        m = b.module
        d2 = delta.reshape(-1, delta.shape[-1])
        gw = torch.zeros_like(m.weight)
        if t_in is not None:
            gw += d2.t() @ dense(t_in).reshape(-1, m.in_features)
        if r_in is not None and d_t is not None:
            gw += dense(d_t).reshape(-1, m.out_features).t() @ r_in.reshape(-1, m.in_features)
        out = {"weight": gw}
        if m.bias is not None:
            out["bias"] = d2.sum(0)
        return out


# ------------------------------------------------------------------------------- eval BatchNorm


@register_split_rule(nn.BatchNorm2d, nn.BatchNorm1d)
class BatchNormEvalRule(SplitRule):
    """Eval-mode BatchNorm is per-channel affine: ``s·x + (β − s·μ)``. Train mode is trusted."""

    accel_op = "bn_scale"

    def bind(self, node: Any, module: nn.Module | None) -> Bound | None:
        m = module
        if m.training or not m.track_running_stats or m.running_var is None:
            return None
        return Bound(self, m, {"eps": float(m.eps)}, 1)

    def _scale(self, m: nn.Module) -> Tensor:
        s = torch.rsqrt(m.running_var + m.eps)
        return s * m.weight if m.weight is not None else s

    def params(self, b: Bound) -> dict[str, nn.Parameter]:
        m = b.module
        return {k: v for k, v in (("weight", m.weight), ("bias", m.bias)) if v is not None}

    def accel_params(self, b: Bound) -> dict[str, Tensor]:
        """The public running variance and affine weight; the accelerator forms the scale itself."""
        m = b.module
        p = {"running_var": m.running_var}
        if m.weight is not None:
            p["weight"] = m.weight
        return p

    def has_bias(self, b: Bound) -> bool:
        return True

    def out_shape(self, b: Bound, shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
        return tuple(shapes[0])

    def forward_dense(self, b: Bound, xs: list[Tensor], with_bias: bool = True) -> Tensor:
        m = b.module
        if with_bias:
            return F.batch_norm(xs[0], m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps)
        shape = (1, -1) + (1,) * (xs[0].dim() - 2)
        return xs[0] * self._scale(m).view(shape)

    def input_grad(self, b: Bound, d: TPart, shapes: list[tuple[int, ...]]) -> list[TPart]:
        if d is None:
            return [None]
        d = dense(d)
        shape = (1, -1) + (1,) * (d.dim() - 2)
        return [d * self._scale(b.module).view(shape)]

    def param_grads(
        self, b: Bound, t_in: TPart, r_in: Tensor | None, delta: Tensor, d_t: TPart, shape: tuple[int, ...]
    ) -> dict[str, Tensor]:
        m = b.module
        x = dense(t_in, shape, delta)
        if r_in is not None:
            x = x + r_in
        dims = [0] + list(range(2, x.dim()))
        shp = (1, -1) + (1,) * (x.dim() - 2)
        xhat = (x - m.running_mean.view(shp)) * torch.rsqrt(m.running_var + m.eps).view(shp)
        out = {}
        if m.weight is not None:
            out["weight"] = (delta * xhat).sum(dims)
        if m.bias is not None:
            out["bias"] = delta.sum(dims)
        return out


# ------------------------------------------------------------------------ parameter-free linear ops


def _const_args(node: Any, start: int = 1) -> bool:
    from torch.fx import Node

    flat = list(node.args[start:]) + list(node.kwargs.values())

    def ok(a: Any) -> bool:
        if isinstance(a, Node):
            return False
        if isinstance(a, (list, tuple)):
            return all(ok(x) for x in a)
        return True

    return all(ok(a) for a in flat)


def _call_args(node: Any, names: list[str], defaults: dict[str, Any]) -> dict[str, Any]:
    """Map a node's positional/keyword args (after the tensor) to names."""
    kw = dict(defaults)
    for n, v in zip(names, node.args[1:]):
        kw[n] = v
    kw.update({k: v for k, v in node.kwargs.items() if k in names})
    return kw


class _PoolLike(SplitRule):
    """Per-channel spatial linear ops commute with channel mixing: ``pool(U V) = U pool(V)``."""

    def trusted_forward(self, b: Bound, ts: list[TPart], shapes: list[tuple[int, ...]]) -> TPart:
        t = ts[0]
        if t is None:
            return None
        if isinstance(t, Low):
            pv = self.forward_dense(b, [t.Vmaps])
            f = Factors(t.f.U, pv.reshape(pv.shape[0], pv.shape[1], -1))
            return Low(f, tuple(pv.shape[2:]))
        return self.forward_dense(b, [t])


@register_split_rule(nn.AvgPool2d, F.avg_pool2d)
class AvgPoolRule(_PoolLike):
    accel_op = "avg_pool2d"
    NAMES = ["kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override"]

    def bind(self, node: Any, module: nn.Module | None) -> Bound | None:
        if module is not None:
            m = module
            kw = dict(kernel_size=m.kernel_size, stride=m.stride, padding=m.padding, ceil_mode=m.ceil_mode,
                      count_include_pad=m.count_include_pad, divisor_override=m.divisor_override)
        else:
            if not _const_args(node):
                return None
            kw = _call_args(node, self.NAMES, {})
        return Bound(self, module, kw, 1)

    def forward_dense(self, b: Bound, xs: list[Tensor], with_bias: bool = True) -> Tensor:
        return F.avg_pool2d(xs[0], **b.kw)


@register_split_rule(nn.AdaptiveAvgPool2d, F.adaptive_avg_pool2d)
class AdaptiveAvgPoolRule(_PoolLike):
    accel_op = "adaptive_avg_pool2d"

    def bind(self, node: Any, module: nn.Module | None) -> Bound | None:
        if module is not None:
            kw = {"output_size": module.output_size}
        else:
            if not _const_args(node):
                return None
            kw = _call_args(node, ["output_size"], {})
        return Bound(self, module, kw, 1)

    def forward_dense(self, b: Bound, xs: list[Tensor], with_bias: bool = True) -> Tensor:
        return F.adaptive_avg_pool2d(xs[0], **b.kw)


@register_split_rule(nn.Flatten, torch.flatten, "flatten")
class FlattenRule(SplitRule):
    accel_op = "flatten"

    def bind(self, node: Any, module: nn.Module | None) -> Bound | None:
        if module is not None:
            kw = {"start_dim": module.start_dim, "end_dim": module.end_dim}
        else:
            if not _const_args(node):
                return None
            kw = _call_args(node, ["start_dim", "end_dim"], {"start_dim": 0, "end_dim": -1})
        if kw["start_dim"] == 0:
            return None  # would mix samples
        return Bound(self, module, kw, 1)

    def forward_dense(self, b: Bound, xs: list[Tensor], with_bias: bool = True) -> Tensor:
        return torch.flatten(xs[0], **b.kw)


@register_split_rule("view", "reshape", torch.reshape)
class ReshapeRule(SplitRule):
    """``view``/``reshape`` with constant sizes that keep the batch dimension."""

    accel_op = "reshape"

    def bind(self, node: Any, module: nn.Module | None) -> Bound | None:
        if node.kwargs or not _const_args(node):
            return None
        shape = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (tuple, list)) else node.args[1:]
        shape = tuple(shape)
        if not shape or shape[0] != -1 and not isinstance(shape[0], int):
            return None
        return Bound(self, None, {"shape": shape}, 1)

    def forward_dense(self, b: Bound, xs: list[Tensor], with_bias: bool = True) -> Tensor:
        return xs[0].reshape(b.kw["shape"])


@register_split_rule("mean", torch.mean)
class MeanRule(SplitRule):
    """Spatial means (``x.mean([2, 3])``), a global average pool."""

    accel_op = "mean"

    def bind(self, node: Any, module: nn.Module | None) -> Bound | None:
        if not _const_args(node):
            return None
        kw = _call_args(node, ["dim", "keepdim"], {"keepdim": False})
        dim = kw.get("dim")
        dims = (dim,) if isinstance(dim, int) else tuple(dim or ())
        if not dims or any(d == 0 for d in dims) or "dtype" in node.kwargs:
            return None
        return Bound(self, None, {"dim": dim, "keepdim": kw["keepdim"]}, 1)

    def forward_dense(self, b: Bound, xs: list[Tensor], with_bias: bool = True) -> Tensor:
        return xs[0].mean(**b.kw)


@register_split_rule(operator.add, operator.iadd, torch.add, "add", "add_", "__add__", "__iadd__")
class AddRule(SplitRule):
    """Sums of activations (residual connections) are linear in every operand."""

    accel_op = "add"

    def bind(self, node: Any, module: nn.Module | None) -> Bound | None:
        from torch.fx import Node

        if node.kwargs or len(node.args) != 2 or not all(isinstance(a, Node) for a in node.args):
            return None  # alpha=…, or adding a constant: trusted
        return Bound(self, None, {}, 2)

    def out_shape(self, b: Bound, shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
        return tuple(torch.broadcast_shapes(shapes[0], shapes[1]))

    def forward_dense(self, b: Bound, xs: list[Tensor], with_bias: bool = True) -> Tensor:
        return xs[0] + xs[1]

    def trusted_forward(self, b: Bound, ts: list[TPart], shapes: list[tuple[int, ...]]) -> TPart:
        return tadd(ts[0], ts[1])

    def input_grad(self, b: Bound, d: TPart, shapes: list[tuple[int, ...]]) -> list[TPart]:
        if d is None:
            return [None, None]
        d = dense(d)
        return [_unbroadcast(d, shapes[0]), _unbroadcast(d, shapes[1])]


def _unbroadcast(g: Tensor, shape: tuple[int, ...]) -> Tensor:
    if tuple(g.shape) == tuple(shape):
        return g
    while g.dim() > len(shape):
        g = g.sum(0)
    for i, s in enumerate(shape):
        if s == 1 and g.shape[i] != 1:
            g = g.sum(i, keepdim=True)
    return g


@register_split_rule(operator.mul, operator.truediv, "mul", "div", torch.mul)
class ScalarMulRule(SplitRule):
    """Multiplication/division by a Python number (a product of two activations is *not* linear)."""

    accel_op = "mul_const"

    def bind(self, node: Any, module: nn.Module | None) -> Bound | None:
        from torch.fx import Node

        if node.kwargs or len(node.args) != 2:
            return None
        a, c = node.args
        if not isinstance(a, Node) or isinstance(c, Node) or not isinstance(c, (int, float)):
            return None
        if node.target in (operator.truediv, "div"):
            if c == 0:
                return None
            c = 1.0 / c
        return Bound(self, None, {"c": float(c)}, 1)

    def out_shape(self, b: Bound, shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
        return tuple(shapes[0])

    def forward_dense(self, b: Bound, xs: list[Tensor], with_bias: bool = True) -> Tensor:
        return xs[0] * b.kw["c"]

    def trusted_forward(self, b: Bound, ts: list[TPart], shapes: list[tuple[int, ...]]) -> TPart:
        t = ts[0]
        if isinstance(t, Low):
            return Low(Factors(t.f.U * b.kw["c"], t.f.V), t.spatial)
        return None if t is None else t * b.kw["c"]


# ------------------------------------------------------------------- ops that are non-linear on purpose

NONLINEAR_MODULES: tuple[type, ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh,
    nn.ELU, nn.Mish, nn.Hardtanh, nn.PReLU, nn.MaxPool2d, nn.AdaptiveMaxPool2d, nn.Dropout, nn.Dropout2d,
    nn.BatchNorm1d, nn.BatchNorm2d, nn.Softmax, nn.LogSoftmax, nn.Identity, nn.LayerNorm, nn.GroupNorm,
)
NONLINEAR_FUNCTIONS: tuple[Any, ...] = (
    F.relu, F.relu6, F.leaky_relu, F.gelu, F.silu, F.hardswish, F.hardsigmoid, torch.sigmoid, torch.tanh,
    torch.relu, F.max_pool2d, F.adaptive_max_pool2d, F.dropout, F.softmax, F.log_softmax, torch.softmax,
    operator.getitem, getattr, torch.cat, operator.mul, torch.mul, F.batch_norm, F.layer_norm,
)
NONLINEAR_METHODS: tuple[str, ...] = (
    "relu", "relu_", "sigmoid", "tanh", "softmax", "size", "dim", "contiguous", "mul", "mul_", "clamp",
    "view", "reshape", "flatten", "mean", "chunk", "split", "transpose", "permute",
)
INPLACE_MODULES: tuple[type, ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.ELU, nn.Hardtanh, nn.Mish,
    nn.Dropout, nn.Dropout2d,
)


def lookup(node: Any, module: nn.Module | None) -> tuple[Bound | None, bool]:
    """Resolve a node to a bound rule. Returns ``(bound or None, known)``; ``known`` is False for ops
    that are neither registered nor known to be non-linear (strict mode refuses those)."""
    rule = None
    if node.op == "call_module":
        for cls in type(module).__mro__:
            if cls in REGISTRY_MODULES:
                rule = REGISTRY_MODULES[cls]
                break
        known = rule is not None or isinstance(module, NONLINEAR_MODULES)
    elif node.op == "call_function":
        rule = REGISTRY_FUNCTIONS.get(node.target)
        known = rule is not None or node.target in NONLINEAR_FUNCTIONS
    elif node.op == "call_method":
        rule = REGISTRY_METHODS.get(node.target)
        known = rule is not None or node.target in NONLINEAR_METHODS
    else:
        return None, True
    if rule is None:
        return None, known
    try:
        return rule.bind(node, module), True
    except (ValueError, TypeError, AttributeError, IndexError):
        return None, True

