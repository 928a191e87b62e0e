"""The metric maths of ADM's evaluator, on features (see :mod:`tools.inception` for the features).

- FID and sFID: the Frechet distance between Gaussians fitted to two feature sets (pool_3 features
  for FID, ``mixed_6/conv`` spatial features for sFID),
  ``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))``; torch-fidelity's implementation.
- IS: ``exp(E_x KL(p(y|x) || p(y)))`` averaged over splits, no shuffling. By default ADM's: contiguous
  chunks of 5,000 and a smaller last chunk for the remainder; the option ``equal`` is torch-fidelity's
  ceil(N / 5000) splits of equal size. They agree whenever 5,000 divides N (10 splits for 50K samples).
- Precision and recall (Kynkaanniemi et al. 2019, k = 3 as ADM), ADM's ``ManifoldEstimator``: a sample
  counts for precision when it lies inside the k-NN ball of some reference feature, a reference feature
  counts for recall when it lies inside the k-NN ball of some sample; squared distances computed in
  float16 by default, as ADM's ``DistanceBlock`` (float32 where a float16 block overflows), or in
  float32 (option), in blocks of 10,000 rows and columns. Near-ties can flip between the two.
FID statistics are computed in float64, as ADM does (``np.cov`` on float64 activations).

A covariance given to :func:`frechet_distance` must be one (:func:`check_covariance`): symmetric, and
positive semi-definite up to rounding, ``min eig >= -tol * max|eig|`` with ``tol`` =
:data:`COVARIANCE_RTOL` (1e-6) or ``D * eps`` of the dtype it is stored in, whichever is larger (rounding
a D x D matrix to that dtype moves its eigenvalues by up to about ``D * eps * max|eig|``: 1e-6 for float64,
2.4e-4 for a 2048-dimensional float32 one); asymmetry ``max|S - S^T| <= tol * max|S|``. The distance of two
covariances is >= 0; a result below zero by at most ``tol * (tr S1 + tr S2)`` (rounding) is 0, and one
further below is an error, never a value.
"""

from __future__ import annotations

import math

import numpy as np
import torch

IS_SPLIT_SIZE = 5000
PR_NEIGHBOURS = 3
PR_BATCH = 10000  # ADM's ManifoldEstimator row and column batch
COVARIANCE_RTOL = 1e-6


class StatisticsError(ValueError):
    """Statistics that cannot be a Gaussian's (a covariance that is not symmetric or not positive
    semi-definite), or a Frechet distance below zero; the message says which and by how much."""


def covariance_tolerance(sigma: np.ndarray) -> float:
    """The relative tolerance of :func:`check_covariance` for ``sigma`` as stored (see the module docstring)."""
    dtype = np.asarray(sigma).dtype
    eps = float(np.finfo(dtype).eps) if np.issubdtype(dtype, np.floating) else 0.0
    return max(COVARIANCE_RTOL, np.asarray(sigma).shape[-1] * eps)


def check_covariance(sigma: np.ndarray, *, what: str = "sigma") -> None:
    """StatisticsError unless ``sigma`` (D, D) is symmetric and positive semi-definite within
    :func:`covariance_tolerance`. A sigma holding NaN or infinity passes: its FID comes out non-finite, which
    the caller reports as such."""
    tol = covariance_tolerance(sigma)
    x = np.asarray(sigma, dtype=np.float64)
    if not np.isfinite(x).all():
        return
    scale = float(np.abs(x).max()) if x.size else 0.0
    asym = float(np.abs(x - x.T).max()) if x.size else 0.0
    if asym > tol * scale:
        raise StatisticsError(f"{what} is not a covariance: it is not symmetric (max |S - S^T| = {asym:.3g}, "
                              f"{asym / scale:.3g} of max |S|; tolerance {tol:.3g})")
    eig = np.linalg.eigvalsh(x)
    top = float(np.abs(eig).max()) if eig.size else 0.0
    if eig.size and eig[0] < -tol * top:
        raise StatisticsError(f"{what} is not a covariance: it is not positive semi-definite (smallest eigenvalue "
                              f"{eig[0]:.6g}, {int((eig < -tol * top).sum())} below -{tol:.3g} x the largest "
                              f"magnitude {top:.6g})")


def feature_statistics(features: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and covariance (D, D), float64, of features (N, D); N >= 2."""
    x = np.asarray(features.cpu() if torch.is_tensor(features) else features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"need a (N >= 2, D) feature array, got shape {x.shape}")
    return x.mean(axis=0), np.cov(x, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """``|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))`` in float64; StatisticsError for a sigma that
    is not a covariance or a distance below zero beyond rounding (see the module docstring)."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    for name, sigma in (("sigma1", sigma1), ("sigma2", sigma2)):
        check_covariance(np.atleast_2d(sigma), what=name)
    tol = max(covariance_tolerance(np.atleast_2d(sigma1)), covariance_tolerance(np.atleast_2d(sigma2)))
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.shape[0],) * 2:
        raise ValueError(f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}")
    out = fid_statistics_to_metric({"mu": mu1, "sigma": sigma1}, {"mu": mu2, "sigma": sigma2}, verbose=False)
    fid = float(out[KEY_METRIC_FID])
    if fid < 0:
        slack = tol * float(np.trace(sigma1) + np.trace(sigma2))
        if fid < -slack:
            raise StatisticsError(f"the Frechet distance came out {fid:.6g}, below zero by more than rounding "
                                  f"({slack:.3g}): the statistics are not those of Gaussians")
        fid = 0.0
    return fid


IS_SPLITS = ("adm", "equal")
PR_DISTANCES = ("float16", "float32")


def inception_score(logits: np.ndarray | torch.Tensor, *, splits: str = "adm", split_size: int = IS_SPLIT_SIZE) -> float:
    """IS of classifier logits (N, C), ``exp(E_x KL(p(y|x) || p(y)))`` per split, averaged over the splits.

    ``adm`` (ADM's evaluator): contiguous chunks of ``split_size`` from the start, the last one holding the
    remainder (12,000 samples: 5,000, 5,000 and 2,000). ``equal`` (torch-fidelity): ceil(N / split_size)
    contiguous splits of (nearly) equal size (12,000: three of 4,000). The same whenever split_size divides N.
    """
    x = torch.as_tensor(np.asarray(logits.cpu() if torch.is_tensor(logits) else logits), dtype=torch.float64)
    if x.ndim != 2 or x.shape[0] < 1:
        raise ValueError(f"need (N, C) logits, got {tuple(x.shape)}")
    if splits == "equal":
        from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, isc_features_to_metric

        n_splits = max(1, math.ceil(x.shape[0] / split_size))
        return float(isc_features_to_metric(x, splits=n_splits, shuffle=False)[KEY_METRIC_ISC_MEAN])
    if splits != "adm":
        raise ValueError(f"splits must be one of {', '.join(IS_SPLITS)}, got {splits!r}")
    scores = [split_inception_score(x[i:i + split_size]) for i in range(0, x.shape[0], split_size)]
    return float(np.mean(scores))


def split_inception_score(logits: torch.Tensor) -> float:
    """``exp(mean_x sum_y p(y|x) (log p(y|x) - log mean_x' p(y|x')))`` of one split, float64."""
    log_p = torch.log_softmax(logits.double(), dim=1)
    p = log_p.exp()
    kl = p * (log_p - torch.log(p.mean(dim=0, keepdim=True)))
    return float(torch.exp(kl.sum(dim=1).mean()))


def pairwise_sq_distances(u: torch.Tensor, v: torch.Tensor, *, dtype: str = "float16") -> torch.Tensor:
    """Squared distances (len(u), len(v)) as ADM's ``DistanceBlock``: ``max(|u|^2 - 2 u v^T + |v|^2, 0)``.

    ``float16``: every step rounded to float16 as TensorFlow runs it in half precision (the squares, then
    their float32-accumulated sums; the float32-accumulated products u v^T; each subtraction and addition),
    falling back to the float32 formula when any entry of the float16 block is not finite. ``float32``: the
    float32 formula only. Returned as float32.
    """
    if dtype not in PR_DISTANCES:
        raise ValueError(f"distances must be one of {', '.join(PR_DISTANCES)}, got {dtype!r}")
    if dtype == "float16":
        u16, v16 = u.to(torch.float16), v.to(torch.float16)
        norm_u = (u16 * u16).float().sum(1).to(torch.float16)
        norm_v = (v16 * v16).float().sum(1).to(torch.float16)
        # float16 values have 11 significant bits: their products are exact in float32 (and in TF32)
        uv = (u16.float() @ v16.float().T).to(torch.float16)
        d = torch.clamp_min(norm_u[:, None] - 2 * uv + norm_v[None, :], 0)
        if bool(torch.isfinite(d).all()):
            return d.float()
    u32, v32 = u.float(), v.float()
    return torch.clamp_min((u32 * u32).sum(1)[:, None] - 2 * (u32 @ v32.T) + (v32 * v32).sum(1)[None, :], 0)


def manifold_radii(features: torch.Tensor, *, k: int = PR_NEIGHBOURS, batch_size: int = PR_BATCH,
                   distances: str = "float16") -> torch.Tensor:
    """Squared k-NN radius of every feature (N,): the (k+1)-th smallest squared distance in its row of
    the set against itself (itself included, at distance ~0), rows and columns in blocks of ``batch_size``."""
    n = features.shape[0]
    radii = torch.empty(n, dtype=torch.float32, device=features.device)
    for a in range(0, n, batch_size):
        rows = features[a:a + batch_size]
        d = torch.cat([pairwise_sq_distances(rows, features[b:b + batch_size], dtype=distances)
                       for b in range(0, n, batch_size)], dim=1)
        radii[a:a + batch_size] = torch.kthvalue(d, k + 1, dim=1).values
    return radii


def precision_recall(samples: np.ndarray | torch.Tensor, reference: np.ndarray | torch.Tensor, *,
                     k: int = PR_NEIGHBOURS, batch_size: int = PR_BATCH, distances: str = "float16",
                     device: torch.device | str = "cpu") -> tuple[float, float]:
    """(precision, recall) of sample features (N, D) against reference features (M, D), as ADM's
    ``ManifoldEstimator``: precision = fraction of samples inside some reference k-NN ball, recall =
    fraction of reference features inside some sample k-NN ball (squared distances, ``<=``), blocks of
    ``batch_size`` rows and columns; ``distances`` as :func:`pairwise_sq_distances`. N, M > k."""
    a, b = (torch.as_tensor(np.asarray(x.cpu() if torch.is_tensor(x) else x), dtype=torch.float32)
            for x in (samples, reference))
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sets do not match: {tuple(a.shape)} vs {tuple(b.shape)}")
    if min(a.shape[0], b.shape[0]) <= k:
        raise ValueError(f"precision/recall with k = {k} needs more than {k} features on each side")
    device = torch.device(device)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 means float32 on a GPU too
    try:
        a, b = a.to(device), b.to(device)
        r_ref = manifold_radii(b, k=k, batch_size=batch_size, distances=distances)
        r_sample = manifold_radii(a, k=k, batch_size=batch_size, distances=distances)
        ref_in = torch.zeros(b.shape[0], dtype=torch.bool, device=device)
        sample_in = torch.zeros(a.shape[0], dtype=torch.bool, device=device)
        for i in range(0, b.shape[0], batch_size):
            for j in range(0, a.shape[0], batch_size):
                d = pairwise_sq_distances(b[i:i + batch_size], a[j:j + batch_size], dtype=distances)
                ref_in[i:i + batch_size] |= (d <= r_sample[None, j:j + batch_size]).any(1)
                sample_in[j:j + batch_size] |= (d <= r_ref[i:i + batch_size, None]).any(0)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    return float(sample_in.double().mean()), float(ref_in.double().mean())
