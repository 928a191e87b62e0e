"""The metric maths of ADM's evaluator, on features (see :mod:`tools.inception` for the features).

- FID and sFID: the Frechet distance between Gaussians fitted to two feature sets (pool_3 features
  for FID, ``mixed_6/conv`` spatial features for sFID),
  ``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))``; torch-fidelity's implementation.
- IS: ``exp(E_x KL(p(y|x) || p(y)))`` averaged over ceil(N / 5000) contiguous splits of equal size, no
  shuffling: ADM's 5000-sample splits whenever N is a multiple of 5000 (10 splits for 50K samples);
  torch-fidelity's implementation.
- Precision and recall (Kynkaanniemi et al. 2019, k = 3 as ADM): a sample counts for precision when it
  lies inside the k-NN ball of some reference feature, a reference feature counts for recall when it
  lies inside the k-NN ball of some sample; torch-fidelity's implementation.
Statistics are computed in float64, as ADM does (``np.cov`` on float64 activations).
"""

from __future__ import annotations

import math

import numpy as np
import torch

IS_SPLIT_SIZE = 5000
PR_NEIGHBOURS = 3


def feature_statistics(features: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and covariance (D, D), float64, of features (N, D); N >= 2."""
    x = np.asarray(features.cpu() if torch.is_tensor(features) else features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"need a (N >= 2, D) feature array, got shape {x.shape}")
    return x.mean(axis=0), np.cov(x, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """``|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))`` in float64."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.shape[0],) * 2:
        raise ValueError(f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}")
    out = fid_statistics_to_metric({"mu": mu1, "sigma": sigma1}, {"mu": mu2, "sigma": sigma2}, verbose=False)
    return float(out[KEY_METRIC_FID])


def inception_score(logits: np.ndarray | torch.Tensor, *, split_size: int = IS_SPLIT_SIZE) -> float:
    """IS of classifier logits (N, C): the mean over ceil(N / split_size) contiguous, equal splits."""
    from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, isc_features_to_metric

    logits = torch.as_tensor(np.asarray(logits.cpu() if torch.is_tensor(logits) else logits), dtype=torch.float64)
    if logits.ndim != 2 or logits.shape[0] < 1:
        raise ValueError(f"need (N, C) logits, got {tuple(logits.shape)}")
    splits = max(1, math.ceil(logits.shape[0] / split_size))
    return float(isc_features_to_metric(logits, splits=splits, shuffle=False)[KEY_METRIC_ISC_MEAN])


def precision_recall(samples: np.ndarray | torch.Tensor, reference: np.ndarray | torch.Tensor, *,
                     k: int = PR_NEIGHBOURS, batch_size: int = 10000) -> tuple[float, float]:
    """(precision, recall) of sample features (N, D) against reference features (M, D); N, M > k."""
    from torch_fidelity.metric_prc import KEY_METRIC_PRECISION, KEY_METRIC_RECALL, prc_features_to_metric

    a, b = (torch.as_tensor(np.asarray(x.cpu() if torch.is_tensor(x) else x), dtype=torch.float32)
            for x in (samples, reference))
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sets do not match: {tuple(a.shape)} vs {tuple(b.shape)}")
    if min(a.shape[0], b.shape[0]) <= k:
        raise ValueError(f"precision/recall with k = {k} needs more than {k} features on each side")
    out = prc_features_to_metric(a, b, prc_neighborhood=k, prc_batch_size=batch_size, save_cpu_ram=True,
                                 verbose=False)
    return float(out[KEY_METRIC_PRECISION]), float(out[KEY_METRIC_RECALL])
