"""Statistics of what is released: residual energy per layer and a mutual-information estimate.

**Energy ratio** ``‖R‖² / ‖X‖²`` per sample and layer (before clipping / noise), from
:meth:`asymml.SplitModule.release_stats`; 1 for a whole-activation release (``noise-only``, ``plain``'s
raw input).

**Mutual information** between inputs and releases, with the KSG k-nearest-neighbour estimator
(Kraskov, Stögbauer & Grassberger 2004, as implemented and maintained in scikit-learn's
``sklearn.feature_selection.mutual_info_regression``, ``n_neighbors=3``, in nats). KSG is nearly
unbiased for a pair of *scalars* but strongly biased **downwards** in high dimension: k-NN distances
concentrate, and the estimate cannot exceed about ``log(n)`` nats for ``n`` samples, so applied to a
3072-dimensional image and a release of thousands of values it reports almost nothing even for an
identity release. We therefore estimate it between scalars:

* ``x_i``: the projection of the input on its ``i``-th principal component (PCA fitted on *public* images);
* ``y_i``: the best linear prediction of ``x_i`` from the release (ridge regression on the release's top
  principal components, both fitted on public releases), evaluated on the private samples.

``y_i`` is a function of the release, so by the data-processing inequality ``I(x_i; y_i) <= I(x_i;
release)`` (up to estimator error): the reported figure -- the sum over the ``k`` leading components --
indicates how much of the input's dominant structure is linearly readable from the release; it ranks
modes, it is not an upper bound on leakage (a non-linear attacker can do better, see the inversion attack).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["MIEstimate", "energy_ratios", "mutual_information"]

MI_ESTIMATOR = (
    "KSG k-NN (Kraskov et al. 2004; sklearn.feature_selection.mutual_info_regression, n_neighbors=3), "
    "nats, between each leading input principal component (PCA on public images) and its ridge "
    "prediction from the release (fitted on public releases), summed over components; "
    "biased downward in high dimension (k-NN distances concentrate, estimate saturates near log n), "
    "hence the 1-D projections; a lower-bound-style figure that ranks modes"
)


def energy_ratios(stats: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """Summarise :meth:`SplitModule.release_stats` as ``{layer: {rank, mean, max}}`` of ``‖R‖²/‖X‖²``."""
    out = {}
    for layer, st in stats.items():
        r = torch.as_tensor(st["energy_ratio"], dtype=torch.float64).reshape(-1)
        out[layer] = {"rank": int(st["rank"]), "mean": float(r.mean()) if r.numel() else 0.0,
                      "max": float(r.max()) if r.numel() else 0.0}
    return out


@dataclass
class MIEstimate:
    """Per-component and total MI estimate (nats) between inputs and a release."""

    per_component: list[float]
    total: float
    identity_total: float  # the same estimator between x_i and itself + tiny noise: its ceiling here
    n_samples: int
    components: int
    estimator: str = MI_ESTIMATOR

    def as_dict(self) -> dict[str, Any]:
        return {"per_component": self.per_component, "total": self.total, "identity_total": self.identity_total,
                "n_samples": self.n_samples, "components": self.components, "estimator": self.estimator}


def _pca(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    mean = x.mean(0)
    _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
    return mean, vt[:k]


def mutual_information(
    public_inputs: Tensor,
    public_releases: Tensor,
    private_inputs: Tensor,
    private_releases: Tensor,
    *,
    components: int = 4,
    release_components: int = 32,
    ridge: float = 1e-3,
    seed: int = 0,
) -> MIEstimate:
    """KSG estimate of ``sum_i I(x_i; y_i)`` on the private samples (see the module docstring)."""
    from sklearn.feature_selection import mutual_info_regression

    xp = public_inputs.reshape(len(public_inputs), -1).double().numpy()
    rp = public_releases.reshape(len(public_releases), -1).double().numpy()
    xq = private_inputs.reshape(len(private_inputs), -1).double().numpy()
    rq = private_releases.reshape(len(private_releases), -1).double().numpy()
    k = min(components, xp.shape[1], len(xp) - 1)
    mx, vx = _pca(xp, k)
    kr = min(release_components, rp.shape[1], len(rp) - 1)
    mr, vr = _pca(rp, kr)
    xs_pub, xs_priv = (xp - mx) @ vx.T, (xq - mx) @ vx.T
    f_pub, f_priv = (rp - mr) @ vr.T, (rq - mr) @ vr.T
    s = f_pub.std(0) + 1e-12
    f_pub, f_priv = f_pub / s, f_priv / s
    a = np.c_[f_pub, np.ones(len(f_pub))]
    coef = np.linalg.solve(a.T @ a + ridge * len(a) * np.eye(a.shape[1]), a.T @ xs_pub)
    pred = np.c_[f_priv, np.ones(len(f_priv))] @ coef
    per = []
    ident = []
    rng = np.random.default_rng(seed)
    for i in range(k):
        per.append(float(mutual_info_regression(pred[:, i:i + 1], xs_priv[:, i], n_neighbors=3,
                                                random_state=seed)[0]))
        noisy = xs_priv[:, i] + 1e-6 * xs_priv[:, i].std() * rng.standard_normal(len(xs_priv))
        ident.append(float(mutual_info_regression(noisy[:, None], xs_priv[:, i], n_neighbors=3,
                                                  random_state=seed)[0]))
    return MIEstimate(per_component=per, total=float(sum(per)), identity_total=float(sum(ident)),
                      n_samples=len(xq), components=k)
