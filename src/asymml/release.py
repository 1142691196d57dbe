"""The release path: what leaves the trusted context, and how (SPEC §3–4).

Every release goes the same way — decompose ``X = UV + R`` (``U`` warm-started from the layer's previous
basis when that is allowed), clip and noise ``R`` when a mechanism is configured, hand it to the
executor — whether ``X`` is an activation in forward or an output gradient in protected backward.
:class:`ReleasePath` is that one path and owns its state: the decomposition's random-start generator and
the warm-start cache (checkpointed through :meth:`ReleasePath.state_dict`; never any noise state — the
mechanism's key stays in memory and a resumed run draws fresh noise).
"""

from __future__ import annotations

import contextlib
import inspect
import secrets
from typing import Any

import torch
from torch import Tensor

from .decomposition import Factors, decompose
from .errors import CheckpointError
from .executors.base import Executor, Handle
from .profiling import Recorder
from .rules import Low
from .splitconfig import SplitConfig

STATE_VERSION = 1


class ReleasePath:
    """Decomposition → warm start → noise → release, for activations and gradients alike.

    ``cfg`` gives the decomposition (method, iterations, basis, gradient rank, warm start); ``mechanism``
    (``None``: no noise) clips and noises each released residual; ``recorder`` is told what was released.
    """

    def __init__(self, cfg: SplitConfig, executor: Executor, mechanism: Any = None,
                 recorder: Recorder | None = None) -> None:
        self.cfg = cfg
        self.executor = executor
        self.mechanism = mechanism
        # a mechanism that can write its release over the residual (asymml's own) says so in its signature
        self._mech_inplace = mechanism is not None and "inplace" in inspect.signature(mechanism).parameters
        self.recorder = recorder if recorder is not None else Recorder()
        #: random starts of the decomposition (seeded by ``cfg.seed``; used only without noise)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        #: warm-start bases by decomposition point (``layer`` or ``layer:grad``), kept only without noise
        self.warm: dict[str, Tensor] = {}
        # DP noise must be unpredictable to the accelerator: the mechanism owns a ChaCha20 generator keyed
        # from the OS (asymml.privacy.secure_rng), never checkpointed. noise_seed is the INSECURE, reproducible
        # option for experiments (anyone who knows it can subtract the noise); the mechanism warns.
        if cfg.noise_seed is not None and mechanism is not None and hasattr(mechanism, "set_insecure_seed"):
            mechanism.set_insecure_seed(cfg.noise_seed)

    # ------------------------------------------------------------------ policy
    @property
    def warm_starts(self) -> bool:
        """Warm-started power iteration carries another batch's factors into this batch's releases, so it
        is used only without noise (with noise every release must depend on its own sample alone)."""
        cfg = self.cfg
        return cfg.warm_start and cfg.decomposition == "power" and self.mechanism is None

    def starts(self) -> torch.Generator:
        """Random starts of the decomposition. With noise on they come from OS entropy per call: drawn
        from one seeded stream by batch position, a sample's start (and, for an iteration that has not
        converged, its release) would depend on which other samples are in the batch."""
        if self.mechanism is None:
            return self.generator
        return torch.Generator().manual_seed(secrets.randbits(63))

    def grad_rank(self, g: Tensor, fwd_rank: int) -> int:
        """Rank at which protected backward splits output gradient ``g`` (``B×C×H×W``) of a region whose
        forward inputs were split at ``fwd_rank``: the gradient rank policy's, else the forward rank (at
        least 1), clamped to ``min(C, HW)``; 0 in ``noise-only`` mode."""
        cfg = self.cfg
        B, C, H, W = g.shape
        N = H * W
        if cfg.mode == "noise-only":
            r = 0
        elif cfg.grad_rank is not None:
            r = cfg.grad_rank.rank_for(0, g.reshape(B, C, N), shared=cfg.basis == "batch")
        else:
            r = max(fwd_rank, 1)
        return min(r, C, N)

    def accelerator_wait(self) -> Any:
        """Context of a wait for the accelerator: the noise mechanism may generate ahead meanwhile (see
        :meth:`~asymml.privacy.noise.ReleaseMechanism.trusted_idle`)."""
        idle = getattr(self.mechanism, "trusted_idle", None)
        return idle() if idle is not None else contextlib.nullcontext()

    def noise_critical_s(self) -> float:
        """Seconds the trusted side has spent so far waiting for (or drawing) noise on its critical path."""
        stats = getattr(self.mechanism, "noise_stats", None)
        return float(stats()["critical_s"]) if stats is not None else 0.0

    # ------------------------------------------------------------------ the path
    def _split_release(self, X3: Tensor, r: int, shape: torch.Size, *, layer: str, kind: str, noised: bool,
                       inplace: bool = False, keep_layout: bool = False) -> tuple[Factors, Handle, Tensor]:
        """Decompose ``X3`` (``B×C×N``) at rank ``r`` (warm-started where allowed), noise the residual
        (when ``noised`` and a mechanism is set), release it; returns the factors, the handle and the
        released tensor."""
        rec = self.recorder
        cfg = self.cfg
        warm = self.warm_starts
        init = self.warm.get(layer) if warm else None
        with rec.label("decompose"):
            f, R = decompose(X3, r, method=cfg.decomposition, iters=cfg.iters, basis=cfg.basis, init=init,
                             generator=self.starts(), inplace=inplace, keep_layout=keep_layout)
        if warm and r > 0:
            self.warm[layer] = f.U
        rel = R.reshape(shape)
        with rec.label("release"):
            if noised and self.mechanism is not None:
                # noise over the residual itself when it is a tensor of its own (or may overwrite X): no
                # second full-size tensor per release
                if self._mech_inplace:
                    own = inplace or rel.untyped_storage().data_ptr() != X3.untyped_storage().data_ptr()
                    rel = self.mechanism(rel, layer=layer, inplace=own)
                else:
                    rel = self.mechanism(rel, layer=layer)
            h = self.executor.release(rel, layer=layer, kind=kind)
        rec.released(rel, layer, kind)
        return f, h, rel

    def activation(self, x: Tensor, r: int, *, layer: str, inplace: bool = False
                   ) -> tuple[Low | None, Handle, Tensor]:
        """Split activation ``x`` (``B×C×H×W``) at ``r < min(C, HW)`` and release its residual (the whole
        activation at ``r = 0``). Returns the trusted part (``None`` at rank 0), the handle and the
        per-sample energy ratio ``‖R‖²/‖X‖²`` (before clipping/noise). ``inplace``: ``R`` may be
        written over ``x``."""
        B, C, H, W = x.shape
        X3 = x.detach().reshape(B, C, H * W)
        # ‖R‖² = ‖X‖² − ‖V‖² for an orthonormal basis: one read of X instead of two full passes
        xx = torch.linalg.vector_norm(X3, dim=(1, 2)).square()
        f, h, _ = self._split_release(X3, r, x.shape, layer=layer, kind="residual" if r > 0 else "activation",
                                      noised=True, inplace=inplace, keep_layout=True)
        ratio = (xx - f.V.square().sum((1, 2))).clamp_min(0) / xx.clamp_min(1e-30)
        return (Low(f, (H, W)) if r > 0 else None), h, ratio

    def gradient(self, g: Tensor, *, layer: str, fwd_rank: int) -> tuple[Low | None, Handle | None]:
        """Protected backward: split output gradient ``g`` and release only its residual (noised when
        ``cfg.noise_grads``). ``(None, None)`` when ``g`` is not 4-D or its rank would be full (then
        nothing is released and the trusted side keeps all of ``g``)."""
        if g.dim() != 4:
            return None, None
        B, C, H, W = g.shape
        r = self.grad_rank(g, fwd_rank)
        if r >= min(C, H * W):
            return None, None
        f, h, _ = self._split_release(g.detach().reshape(B, C, H * W), r, g.shape, layer=layer,
                                      kind="grad_residual", noised=self.noises_gradients, keep_layout=True)
        return (Low(f, (H, W)) if r > 0 else None), h

    @property
    def noises_gradients(self) -> bool:
        """Whether released gradient residuals carry noise (else the accelerator gets them exactly)."""
        return self.cfg.noise_grads and self.mechanism is not None

    def whole(self, t: Tensor, *, layer: str, kind: str) -> Handle:
        """Release ``t`` as it is (``paper`` backward: the full output gradient)."""
        with self.recorder.label("release"):
            h = self.executor.release(t, layer=layer, kind=kind)
        self.recorder.released(t, layer, kind)
        return h

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint needs to continue bit-for-bit: the random-start generator and the warm-start
        bases. The bases derive from private data: keep checkpoints where the inputs are kept."""
        return {"version": STATE_VERSION, "gen": self.generator.get_state(),
                "warm": {k: v.detach().cpu().clone() for k, v in self.warm.items()}}

    def load_state_dict(self, state: Any) -> None:
        """Restore :meth:`state_dict`; refuses (:class:`~asymml.errors.CheckpointError`) anything else."""
        ok = (isinstance(state, dict) and state.get("version") == STATE_VERSION
              and isinstance(state.get("gen"), Tensor) and isinstance(state.get("warm"), dict)
              and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state["warm"].items()))
        if not ok:
            raise CheckpointError("the split model's saved state is not one this asymml wrote (expected the "
                                  "decomposition generator and warm-start bases); the checkpoint is corrupt")
        try:
            self.generator.set_state(state["gen"])
        except (RuntimeError, TypeError) as e:
            raise CheckpointError(f"the split model's saved generator state is invalid: {e}") from None
        self.warm.clear()
        self.warm.update(state["warm"])
