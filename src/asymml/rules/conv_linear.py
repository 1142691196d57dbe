"""Convolution and linear layers: the two ops with a weight matrix, the bulk of the FLOPs.

Conv2d folds the low-rank factor ``U`` into its weights when that is cheaper (cost model below) and
correlates the ``r`` maps of ``V`` instead of full activations for the weight gradient.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.nn.grad import conv2d_input, conv2d_weight

from ..profiling import public_state
from .base import Bound, Low, TPart, WeightedRule, dense
from .registry import register_split_rule


def _conv_geom(m: nn.Conv2d) -> dict[str, Any]:
    if isinstance(m.padding, str):
        raise ValueError("string padding")
    return dict(stride=m.stride, padding=m.padding, dilation=m.dilation, groups=m.groups)


def _im2col(maps: Tensor, k: tuple[int, int], padding: tuple[int, int], stride: tuple[int, int] = (1, 1),
            dilation: tuple[int, int] = (1, 1), ones_row: bool = False, flip_taps: bool = False) -> Tensor:
    """``F.unfold`` of the few maps of a low-rank factor, as one strided copy of a padded view.

    Same layout as ``F.unfold`` (``B × r·kh·kw × Ho·Wo``); measured 4× faster than ``aten::im2col``
    at VGG shapes, which walks the kernel positions one by one. ``ones_row`` appends a row of ones, so
    that a bias row appended to the weight matrix adds the bias inside the GEMM (no pass of its own).
    ``flip_taps`` lists the kernel positions in reverse (row ``(j, t)`` holds tap ``k−1−t``): the
    transposed convolution's matrix, which then pairs with the weight's own tap order (no flipped copy of
    the weight, nor of a weight gradient)."""
    B, r, H, W = maps.shape
    ph, pw = padding
    Ho = (H + 2 * ph - dilation[0] * (k[0] - 1) - 1) // stride[0] + 1
    Wo = (W + 2 * pw - dilation[1] * (k[1] - 1) - 1) // stride[1] + 1
    P = F.pad(maps, (pw, pw, ph, ph)).contiguous()
    sB, sr, sH, sW = P.stride()
    win = P.as_strided((B, r, k[0], k[1], Ho, Wo),
                       (sB, sr, sH * dilation[0], sW * dilation[1], sH * stride[0], sW * stride[1]))
    rows = r * k[0] * k[1]
    cols = torch.empty((B, rows + int(ones_row), Ho * Wo), dtype=maps.dtype)
    dst = cols[:, :rows].view(B, r, k[0], k[1], Ho, Wo)
    if flip_taps:
        for i in range(k[0]):
            for j in range(k[1]):
                dst[:, :, i, j].copy_(win[:, :, k[0] - 1 - i, k[1] - 1 - j])
    else:
        dst.copy_(win)
    if ones_row:
        cols[:, rows].fill_(1.0)
    return cols


def _transposed_im2col(d: Low, k: tuple[int, int], padding: tuple[int, int]) -> Tensor:
    """``_im2col`` of a low-rank gradient's maps at the transposed conv's padding ``k−1−p``, taps flipped,
    made once per gradient: the input gradient and the weight gradient of one backward read the same
    matrix. Row ``(j, t)`` holds ``Q_j`` shifted by weight tap ``t``: ``Q_j[xy + p − t]``."""
    pad = (k[0] - 1 - padding[0], k[1] - 1 - padding[1])
    key = ("im2col_flipped", k, pad)
    cols = d.memo.get(key)
    if cols is None:
        cols = d.memo[key] = _im2col(d.Vmaps, k, pad, flip_taps=True)  # B × r·k² × H·W
    return cols


COLS_CHUNK_BYTES = 8 * 2**20
"""Largest im2col of a low-rank forward made at once (trusted memory); larger ones go a few samples at a time."""


@register_split_rule(nn.Conv2d)
class Conv2dRule(WeightedRule):
    """Conv2d of any stride/padding/dilation/groups. Folds ``U`` into the weights when that is cheaper."""

    decomposes_input = True
    accel_op = "conv2d"
    fresh_grads = True

    def bind(self, node: Any, module: nn.Module | None) -> Bound | None:
        m = module
        if m.padding_mode != "zeros" or isinstance(m.padding, str):
            return None
        return Bound(self, m, _conv_geom(m), 1)

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

    def trusted_forward_into(self, b: Bound, ts: list[TPart], shapes: list[tuple[int, ...]], out: Tensor) -> bool:
        """The per-sample low-rank path accumulated into ``out`` (channels-last, ``B×O×H'×W'``): the GEMM
        of :meth:`_lowrank_unfold` with ``beta = 1`` adds ``conv(L)`` to the accelerator's ``conv(R)``
        where it lies."""
        m, t = b.module, ts[0]
        if not isinstance(t, Low) or t.f.shared or m.groups != 1 or out.dtype != t.f.U.dtype:
            return False
        B, C, H, W = t.shape
        ho, wo = self._out_hw(m, H, W)
        if (tuple(out.shape) != (B, m.out_channels, ho, wo) or out._is_view()
                or not out.is_contiguous(memory_format=torch.channels_last)
                or not self._fold_cheaper(m, B, t.f.rank, False, H * W, ho * wo)):
            return False
        self._lowrank_unfold(m, t, ho, wo, into=out)
        return True

    def _lowrank_unfold(self, m: nn.Conv2d, t: Low, ho: int, wo: int, into: Tensor | None = None) -> Tensor:
        """``conv(U_b V_b, W) + bias`` per sample as one batched GEMM, channels-last out.

        ``unfold(V_b)`` (``L × r·k²``) times the per-sample folded weight (``r·k² × O``): a grouped
        convolution with ``groups=B`` and ``r`` input channels per group runs memory-bound in oneDNN
        (1.3–2.5× slower at VGG shapes), and this GEMM writes the output directly in channels-last
        layout, the one the following merge, activation and pooling are fastest in."""
        U, B, r, O = t.f.U, t.f.V.shape[0], t.f.rank, m.out_channels
        k = m.kernel_size
        kk = k[0] * k[1]
        C = U.shape[1]
        # one GEMM (B·r × C)·(C × k²·O) for the whole batch (far faster than B skinny ones), whose result is
        # already laid out (b, j, tap, o) as the batched GEMM below reads it: no transposing copy of the fold
        fold = torch.mm(U.transpose(1, 2).reshape(B * r, C), self._weight_cache(m, "kkoc").t())  # B·r × k²·O
        bias = m.bias is not None
        Wf = torch.empty((B, r * kk + int(bias), O), dtype=fold.dtype)
        Wf[:, : r * kk].copy_(fold.view(B, r * kk, O))
        if bias:
            Wf[:, r * kk] = m.bias.detach()
        # into: accumulated into the accelerator's share (the merge happens in the GEMM); else written
        # straight into a fresh channels-last tensor (not a view), so the merge can add in place
        y = into if into is not None else torch.empty((B, O, ho, wo), dtype=Wf.dtype,
                                                      memory_format=torch.channels_last)
        yv = y.permute(0, 2, 3, 1).view(B, ho * wo, O)
        # the im2col is made a few samples at a time: at VGG-16's 224 px layer the whole batch's is 29 MiB of
        # trusted memory beside the 98 MiB output (a chunk's GEMM still has thousands of rows)
        per_sample = (r * kk + int(bias)) * ho * wo * Wf.element_size()
        step = max(1, min(B, COLS_CHUNK_BYTES // max(1, per_sample)))
        for b0 in range(0, B, step):
            b1 = min(B, b0 + step)
            cols = _im2col(t.Vmaps[b0:b1], k, m.padding, m.stride, m.dilation, ones_row=bias)
            if into is not None:
                yv[b0:b1].baddbmm_(cols.transpose(1, 2), Wf[b0:b1])
            else:
                torch.bmm(cols.transpose(1, 2), Wf[b0:b1], out=yv[b0:b1])
        return y

    @staticmethod
    def _unfold_transposable(m: nn.Conv2d) -> bool:
        """A stride-1, undilated, ungrouped conv whose transpose is a conv with padding ``k−1−p ≥ 0``."""
        k, p = m.kernel_size, m.padding
        return (m.groups == 1 and m.stride == (1, 1) and m.dilation == (1, 1)
                and k[0] - 1 - p[0] >= 0 and k[1] - 1 - p[1] >= 0)

    def _lowrank_convT_unfold(self, m: nn.Conv2d, d: Low, H: int, W: int) -> Tensor:
        """``convT(P_b Q_b, W)`` per sample as one batched GEMM, channels-last out (input gradient).

        The transposed conv is a conv of the ``r`` maps of ``Q`` with the kernel folded by ``P``:
        ``Wt_b[(j, t), c] = Σ_o P_b[o, j] W[o, c, t]`` against the tap-flipped im2col of ``Q``; one GEMM
        folds it for the whole batch and im2col of ``Q`` (``r`` maps only) feeds a batched GEMM, instead
        of a ``groups=B`` convolution with ``r`` input channels per group, which oneDNN runs memory-bound."""
        P, B, r, C = d.f.U, d.f.V.shape[0], d.f.rank, m.in_channels
        k, p = m.kernel_size, m.padding
        kk = k[0] * k[1]
        O = m.out_channels
        Wt = torch.mm(P.transpose(1, 2).reshape(B * r, -1), self._weight_okc(m).view(O, kk * C))  # B·r × k²·C
        cols = _transposed_im2col(d, k, p)  # B × r·k² × H·W
        y = torch.empty((B, C, H, W), dtype=Wt.dtype, memory_format=torch.channels_last)
        torch.bmm(cols.transpose(1, 2), Wt.view(B, r * kk, C), out=y.permute(0, 2, 3, 1).view(B, H * W, C))
        return y

    @staticmethod
    def _lowrank_wgrad_input(m: nn.Conv2d, t: Low, delta: Tensor) -> tuple[Tensor, Tensor | None]:
        """``Σ_b (U_b V_b) ⋆ δ_b`` (weight gradient of a low-rank input) with batched GEMMs, and the bias
        gradient ``Σ δ`` from the same GEMM (a row of ones under the im2col: no pass over ``δ`` of its own).

        ``G_b = δ_b · im2col(V_b)ᵀ`` (``O × r·k²``), then one GEMM expands all ``G_b`` by their ``U_b``:
        a ``groups=B`` weight-gradient convolution with ``r`` channels per group is memory-bound."""
        U, B, r, O, C = t.f.U, t.f.V.shape[0], t.f.rank, m.out_channels, m.in_channels
        k = m.kernel_size
        kk = k[0] * k[1]
        bias = m.bias is not None
        cols = _im2col(t.Vmaps, k, m.padding, ones_row=bias)  # B × (r·k² [+1]) × Ho·Wo
        # δ read pixel-major (a view of a channels-last δ; a transposed operand otherwise): the GEMM's result
        # is laid out (b, j, tap, o), which the expansion below reads as one matrix without a transposing copy
        Gt = torch.bmm(cols, delta.permute(0, 2, 3, 1).reshape(B, -1, O))  # B × (r·k² [+1]) × O
        gb = Gt[:, r * kk].sum(0) if bias else None
        Gt = Gt[:, : r * kk].reshape(B * r, kk * O)
        gw = torch.mm(Gt.t(), U.transpose(1, 2).reshape(B * r, C))  # k²·O × C
        return gw.view(k[0], k[1], O, C).permute(2, 3, 0, 1), gb

    @staticmethod
    def _lowrank_wgrad_grad(m: nn.Conv2d, r_in: Tensor, d: Low) -> Tensor:
        """``Σ_b R̃_b ⋆ (P_b Q_b)`` (the protected term ``R̃⋆δ_L``) with batched GEMMs.

        ``H_b = im2col_flipped(Q_b) · R̃_bᵀ`` (``r·k² × C``, rows in the weight's tap order) correlates the
        ``r`` maps of ``Q`` with the residual, then one GEMM expands all ``H_b`` by their ``P_b``."""
        P, B, r, O, C = d.f.U, d.f.V.shape[0], d.f.rank, m.out_channels, m.in_channels
        k, p = m.kernel_size, m.padding
        kk = k[0] * k[1]
        cols = _transposed_im2col(d, k, p)  # B × r·k² × H·W
        Hm = torch.bmm(cols, r_in.reshape(B, C, -1).transpose(1, 2))  # B × r·k² × C
        gw = torch.mm(P.reshape(B, O, r).permute(1, 0, 2).reshape(O, B * r), Hm.view(B * r, kk * C))
        return gw.view(O, k[0], k[1], C).permute(0, 3, 1, 2)

    _okc_cache: dict[tuple[int, str], tuple[int, Any, Tensor]] = {}

    def _weight_cache(self, m: nn.Conv2d, layout: str) -> Tensor:
        """The weight re-laid out as an ``(O·kh·kw, C)`` (``"okc"``, also read as ``(O, kh·kw·C)``) or
        ``(kh·kw·O, C)`` (``"kkoc"``) matrix, cached per weight tensor and version (the entry dies with the
        weight)."""
        w = m.weight
        key = (id(w), layout)
        hit = self._okc_cache.get(key)
        if hit is not None and hit[0] == w._version and hit[1]() is w:
            return hit[2]
        perm = (0, 2, 3, 1) if layout == "okc" else (2, 3, 0, 1)
        mat = w.detach().permute(*perm).reshape(-1, w.shape[1]).contiguous()
        if hit is None or hit[1]() is not w:
            weakref.finalize(w, self._okc_cache.pop, key, None)
        self._okc_cache[key] = (w._version, weakref.ref(w), public_state(mat))  # public: weights re-laid out
        return mat

    def _weight_okc(self, m: nn.Conv2d) -> Tensor:
        return self._weight_cache(m, "okc")

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
                if not t.f.shared and m.groups == 1:
                    return self._lowrank_unfold(m, t, ho, wo)
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
                if self._unfold_transposable(m):
                    return [self._lowrank_convT_unfold(m, d, H, W)]
                g, O = m.groups, m.out_channels
                Wv = m.weight.view(g, O // g, C // g, *m.kernel_size)
                P = d.f.U.view(B, g, O // g, r)
                Wf = torch.einsum("bgoj,gocxy->bjgcxy", P, Wv).reshape(B * r, C, *m.kernel_size)
                gx = self._conv_t(m, Wf, d.Vmaps.reshape(1, B * r, ho, wo), (1, B * C, H, W), B)
                return [gx.view(B, C, H, W)]
        d = dense(d)  # a low-rank gradient whose fold is not cheaper (either basis) goes dense
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
        gb: Tensor | None = None
        # T ⋆ δ  (T low-rank: per-sample correlations of the r maps of V with δ, then expand by U)
        if isinstance(t_in, Low) and self._fold_cheaper(m, B, t_in.f.rank, t_in.f.shared, H * W, ho * wo):
            r = t_in.f.rank
            if t_in.f.shared:
                G = conv2d_weight(t_in.Vmaps, (O, r, *m.kernel_size), delta, **kw)
                Ug = t_in.f.U.view(g, C // g, r)
                gw += torch.einsum("gojxy,gcj->gocxy", G.view(g, O // g, r, *m.kernel_size), Ug).reshape(gw.shape)
            elif self._unfold_transposable(m):
                g_in, gb = self._lowrank_wgrad_input(m, t_in, delta)
                gw += g_in
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
            elif (isinstance(d_t, Low) and not d_t.f.shared and self._gfold_cheaper(m, B, d_t.f.rank, H * W, ho * wo)
                  and self._unfold_transposable(m)):
                gw += self._lowrank_wgrad_grad(m, r_in, d_t)
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
            out["bias"] = delta.sum((0, 2, 3)) if gb is None else gb
        return out


# ------------------------------------------------------------------------------------------ linear


@register_split_rule(nn.Linear)
class LinearRule(WeightedRule):
    """Linear layers: the trusted share is dense (a per-sample low-rank input saves nothing here)."""

    accel_op = "linear"
    fresh_grads = True

    def bind(self, node: Any, module: nn.Module | None) -> Bound | None:
        return Bound(self, module, {}, 1)

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
        gw: Tensor | None = None  # written by the first GEMM, accumulated into by the second: no zero pass
        if t_in is not None:
            gw = d2.t() @ dense(t_in).reshape(-1, m.in_features)
        if r_in is not None and d_t is not None:
            dt2 = dense(d_t).reshape(-1, m.out_features).t()
            r2 = r_in.reshape(-1, m.in_features)
            gw = dt2 @ r2 if gw is None else gw.addmm_(dt2, r2)
        out = {"weight": torch.zeros_like(m.weight) if gw is None else gw}
        if m.bias is not None:
            out["bias"] = d2.sum(0)
        return out

