"""The metric maths against independent float64 references (tools.fidelity)."""

import numpy as np
import pytest
import torch

from tools.fidelity import (
    feature_statistics,
    frechet_distance,
    inception_score,
    manifold_radii,
    pairwise_sq_distances,
    precision_recall,
)


def _spd(rng, d):
    a = rng.standard_normal((d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def _sqrt_psd(s):
    w, v = np.linalg.eigh(s)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_reference(mu1, s1, mu2, s2):
    """tr((S1 S2)^(1/2)) = tr((S1^(1/2) S2 S1^(1/2))^(1/2)): symmetric square roots only."""
    r = _sqrt_psd(s1)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(_sqrt_psd(r @ s2 @ r)))


def test_fid_of_a_set_against_itself_is_zero():
    x = np.random.default_rng(0).standard_normal((500, 64)) * 3 + 1
    mu, s = feature_statistics(x)
    assert abs(frechet_distance(mu, s, mu, s)) < 1e-8 * np.trace(s)


def test_fid_of_diagonal_gaussians_is_the_closed_form():
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.standard_normal(16), rng.standard_normal(16)
    a, b = rng.uniform(0.1, 4, 16), rng.uniform(0.1, 4, 16)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)


def test_fid_of_general_gaussians_matches_the_reference():
    rng = np.random.default_rng(2)
    for d in (1, 5, 40):
        mu1, mu2, s1, s2 = rng.standard_normal(d), rng.standard_normal(d), _spd(rng, d), _spd(rng, d)
        assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(frechet_reference(mu1, s1, mu2, s2), rel=1e-8,
                                                                   abs=1e-10)


def test_fid_of_two_gaussian_feature_sets_approaches_the_closed_form():
    rng = np.random.default_rng(3)
    d, n = 6, 200_000
    mu1, mu2, s1, s2 = rng.standard_normal(d), rng.standard_normal(d) * 0.5, _spd(rng, d), _spd(rng, d)
    x1 = rng.multivariate_normal(mu1, s1, n)
    x2 = rng.multivariate_normal(mu2, s2, n)
    fid = frechet_distance(*feature_statistics(x1), *feature_statistics(x2))
    # Monte-Carlo error of the moments is O(1/sqrt(n)) ~ 0.2%; 2% leaves room for any seed
    assert fid == pytest.approx(frechet_reference(mu1, s1, mu2, s2), rel=0.02)


def test_fid_rejects_mismatched_statistics():
    with pytest.raises(ValueError, match="do not match"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="N >= 2"):
        feature_statistics(np.zeros((1, 3)))


def softmax(logits):
    p = np.exp(logits - logits.max(1, keepdims=True))
    return p / p.sum(1, keepdims=True)


def adm_inception_score(preds, split_size=5000):
    """ADM evaluator.py compute_inception_score on softmax outputs, restated in float64 numpy."""
    scores = []
    for i in range(0, len(preds), split_size):
        part = preds[i:i + split_size]
        kl = part * (np.log(part) - np.log(np.mean(part, 0, keepdims=True)))
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    return float(np.mean(scores))


def equal_split_inception_score(preds, splits):
    """Equal contiguous splits [i N // S, (i + 1) N // S), the same per-split formula."""
    n = len(preds)
    return float(np.mean([adm_inception_score(preds[i * n // splits:(i + 1) * n // splits], split_size=n)
                          for i in range(splits)]))


def test_inception_score_of_uniform_predictions_is_one():
    assert inception_score(np.zeros((100, 1008))) == pytest.approx(1.0, abs=1e-12)
    assert inception_score(np.zeros((100, 1008)), splits="equal") == pytest.approx(1.0, abs=1e-12)


def test_inception_score_of_confident_balanced_predictions_is_the_class_count():
    labels = np.arange(1000) % 10
    logits = np.full((1000, 1008), -50.0)  # exp(-50): confident, yet no 0 * log 0
    logits[np.arange(1000), labels] = 0.0
    assert inception_score(logits) == pytest.approx(10.0, rel=1e-9)


def test_inception_score_chunks_as_adm_on_12000_samples():
    """N = 12,000: ADM scores chunks of 5,000, 5,000 and 2,000; the equal option three of 4,000. Class
    frequencies that drift along the set make the two differ, as a sampler's label order can."""
    rng = np.random.default_rng(4)
    n, c = 12_000, 50
    logits = rng.standard_normal((n, c)) * 2
    logits[np.arange(n), (np.arange(n) * c // n + rng.integers(0, 8, n)) % c] += 4  # drifting classes
    preds = softmax(logits)
    adm = inception_score(logits)
    assert adm == pytest.approx(adm_inception_score(preds), rel=1e-10)
    assert inception_score(logits, splits="adm") == adm
    equal = inception_score(logits, splits="equal")
    assert equal == pytest.approx(equal_split_inception_score(preds, 3), rel=1e-10)
    assert abs(adm - equal) > 1e-3 * adm  # the protocols give different numbers here
    assert equal != pytest.approx(adm_inception_score(preds), rel=1e-4)


def test_inception_score_splits_agree_when_5000_divides_n():
    logits = np.random.default_rng(5).standard_normal((10_000, 50)) * 2
    ref = adm_inception_score(softmax(logits))
    assert inception_score(logits) == pytest.approx(ref, rel=1e-10)
    assert inception_score(logits, splits="equal") == pytest.approx(ref, rel=1e-10)
    assert inception_score(logits, split_size=10_000) == pytest.approx(adm_inception_score(softmax(logits), 10_000),
                                                                       rel=1e-10)
    with pytest.raises(ValueError, match="splits"):
        inception_score(logits, splits="random")


def precision_recall_reference(fake, real, k):
    """Brute force in float64: radius of each point = distance to its k-th nearest neighbour in its own set."""
    def dist(a, b):
        return np.sqrt(((a[:, None, :].astype(np.float64) - b[None, :, :]) ** 2).sum(-1))

    r_real = np.sort(dist(real, real), axis=1)[:, k]
    r_fake = np.sort(dist(fake, fake), axis=1)[:, k]
    precision = (dist(fake, real) <= r_real[None, :]).any(1).mean()
    recall = (dist(real, fake) <= r_fake[None, :]).any(1).mean()
    return precision, recall


def adm_sq_distances(u, v, half=True):
    """ADM evaluator.py _batch_pairwise_distances in numpy: max(|u|^2 - 2 u v^T + |v|^2, 0) with every
    op in float16 (sums and products accumulated in float32), float32 when the float16 block is not finite."""
    if half:
        u16, v16 = u.astype(np.float16), v.astype(np.float16)
        with np.errstate(over="ignore", invalid="ignore"):
            nu = np.square(u16).astype(np.float32).sum(1).astype(np.float16)
            nv = np.square(v16).astype(np.float32).sum(1).astype(np.float16)
            uv = (u16.astype(np.float32) @ v16.astype(np.float32).T).astype(np.float16)
            d = np.maximum(nu[:, None] - np.float16(2) * uv + nv[None, :], np.float16(0))
        if np.isfinite(d).all():
            return d.astype(np.float32)
    u, v = u.astype(np.float32), v.astype(np.float32)
    return np.maximum(np.square(u).sum(1)[:, None] - 2 * u @ v.T + np.square(v).sum(1)[None, :], np.float32(0))


def adm_precision_recall(fake, real, k, half=True):
    """ADM's ManifoldEstimator in one block: radii = entry k of each sorted row (self included);
    distances with the reference as rows, the samples as columns, as evaluate_pr computes them."""
    r_real = np.partition(adm_sq_distances(real, real, half), k, axis=1)[:, k]
    r_fake = np.partition(adm_sq_distances(fake, fake, half), k, axis=1)[:, k]
    d = adm_sq_distances(real, fake, half)
    return (d <= r_real[:, None]).any(0).mean(), (d <= r_fake[None, :]).any(1).mean()


def test_precision_recall_matches_brute_force_away_from_ties():
    """Quarter-integer points in [0, 2]^5: every norm, product and distance is a multiple of 1/16 below 64,
    exact in float16, so no rounding can move a point across a ball's edge and both modes must equal the
    float64 brute force exactly (ties at the edge included, counted inside by both)."""
    rng = np.random.default_rng(5)
    real = (rng.integers(0, 9, (300, 5)) / 4).astype(np.float32)
    fake = (rng.integers(1, 8, (200, 5)) / 4).astype(np.float32)
    p_ref, r_ref = precision_recall_reference(fake, real, 3)
    assert 0.05 < p_ref < 1 and 0.05 < r_ref < 1  # neither trivial
    for distances in ("float16", "float32"):
        for batch_size in (64, 10000):
            p, r = precision_recall(fake, real, batch_size=batch_size, distances=distances)
            assert (p, r) == pytest.approx((p_ref, r_ref), abs=1e-12), (distances, batch_size)


def borderline_case():
    """Reference: 5 points on a line, spacing 1, far from the origin (|x|^2 ~ 2e4, where float16 steps by 16);
    point 0's third neighbour is at distance 3 (radius^2 9). Sample 0 lies at distance 3.1 from it (9.61 > 9:
    outside every ball); the other samples are far away."""
    c = 100.0
    real = np.array([[c + i, c] for i in range(5)], dtype=np.float32)
    fake = np.array([[c - 3.1, c]] + [[c + 10 * i, c + 50] for i in range(1, 5)], dtype=np.float32)
    assert 2 * (c + 50) ** 2 < 65504  # no float16 overflow: ADM's float16 path is the one taken
    return fake, real


def test_float16_distances_flip_a_borderline_sample_as_adm():
    fake, real = borderline_case()
    assert precision_recall_reference(fake, real, 3)[0] == 0.0
    p32, r32 = precision_recall(fake, real, distances="float32")
    p16, r16 = precision_recall(fake, real)  # the default: ADM's float16
    assert (p32, r32) == pytest.approx(precision_recall_reference(fake, real, 3), abs=1e-12)
    assert p32 == 0.0 and p16 == 0.2  # float16 rounding puts sample 0 inside point 0's ball
    assert (p16, r16) == pytest.approx(adm_precision_recall(fake, real, 3), abs=1e-12)
    assert (p32, r32) == pytest.approx(adm_precision_recall(fake, real, 3, half=False), abs=1e-12)


def test_pairwise_distances_against_numpy_and_the_float32_fallback():
    rng = np.random.default_rng(7)
    u, v = (rng.standard_normal((40, 64)) * 3 + 1).astype(np.float32), rng.standard_normal((30, 64)).astype(np.float32)
    d16 = pairwise_sq_distances(torch.from_numpy(u), torch.from_numpy(v)).numpy()
    # the float32 accumulation order may differ from numpy's by one float16 step
    np.testing.assert_allclose(d16, adm_sq_distances(u, v), rtol=2e-3, atol=0.1)
    exact = ((u[:, None].astype(np.float64) - v[None]) ** 2).sum(-1)
    d32 = pairwise_sq_distances(torch.from_numpy(u), torch.from_numpy(v), dtype="float32").numpy()
    np.testing.assert_allclose(d32, exact, rtol=1e-4)
    assert np.abs(d16 - exact).max() > np.abs(d32 - exact).max()
    big = u * 100  # |u|^2 ~ 1e6 overflows float16: the block falls back to float32
    with np.errstate(over="ignore"):
        assert not np.isfinite(np.square(big.astype(np.float16)).astype(np.float32).sum(1).astype(np.float16)).all()
    torch.testing.assert_close(pairwise_sq_distances(torch.from_numpy(big), torch.from_numpy(v)),
                               pairwise_sq_distances(torch.from_numpy(big), torch.from_numpy(v), dtype="float32"))
    with pytest.raises(ValueError, match="float16"):
        pairwise_sq_distances(torch.from_numpy(u), torch.from_numpy(v), dtype="float64")


def test_manifold_radii_are_the_kth_neighbour_blockwise():
    # distances to 3rd neighbours (self at 0 counted first): 0 -> 6, 1 -> 5, 3 -> 3, 6 -> 5, 10 -> 9
    x = torch.tensor([[0.0], [1.0], [3.0], [6.0], [10.0]])
    for batch_size in (2, 5):
        assert manifold_radii(x, k=3, batch_size=batch_size, distances="float32").tolist() == [36, 25, 9, 25, 81]
        assert manifold_radii(x, k=3, batch_size=batch_size).tolist() == [36, 25, 9, 25, 81]
    assert manifold_radii(x, k=1, batch_size=2).tolist() == [1, 1, 4, 9, 16]


def test_precision_recall_on_toy_clouds():
    rng = np.random.default_rng(6)
    real = rng.standard_normal((1000, 8))
    same = rng.standard_normal((1000, 8))
    p, r = precision_recall(same, real)
    assert p > 0.85 and r > 0.85  # same distribution: nearly all inside
    far = rng.standard_normal((1000, 8)) + 20
    assert precision_recall(far, real) == (0.0, 0.0)  # disjoint supports
    collapsed = rng.standard_normal((1000, 8)) * 0.1  # one mode at the centre of the real cloud
    p, r = precision_recall(collapsed, real)
    assert p > 0.95 and r < 0.2  # faithful but not diverse


def test_precision_recall_needs_more_than_k_points():
    with pytest.raises(ValueError, match="more than 3"):
        precision_recall(np.zeros((3, 2)), np.zeros((10, 2)))


def test_fid_refuses_what_is_not_a_covariance_and_never_returns_a_negative():
    """Asymmetric or indefinite sigmas (beyond the stated tolerance) are StatisticsError; a float32-rounded
    rank-deficient covariance is still one (its tolerance is D * eps of float32); identical statistics give 0."""
    from tools.fidelity import StatisticsError, check_covariance, covariance_tolerance

    rng = np.random.default_rng(5)
    d = 40
    with pytest.raises(StatisticsError, match="not positive semi-definite"):
        frechet_distance(np.zeros(d), -np.eye(d), np.zeros(d), np.eye(d))
    s = _spd(rng, d)
    s[0, 1] += 1e-3 * np.abs(s).max()
    with pytest.raises(StatisticsError, match="sigma2 is not a covariance: it is not symmetric"):
        frechet_distance(np.zeros(d), _spd(rng, d), np.zeros(d), s)
    x = rng.standard_normal((10, d))  # 10 samples in 40 dims: rank 9, zero eigenvalues that rounding makes negative
    _, low_rank = feature_statistics(x)
    check_covariance(low_rank.astype(np.float32))
    assert covariance_tolerance(low_rank.astype(np.float32)) == pytest.approx(d * np.finfo(np.float32).eps)
    assert covariance_tolerance(low_rank) == 1e-6
    mu, _ = feature_statistics(x)
    assert frechet_distance(mu, low_rank, mu, low_rank) >= 0.0
