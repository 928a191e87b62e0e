"""The metric maths against independent float64 references (tools.fidelity)."""

import numpy as np
import pytest

from tools.fidelity import feature_statistics, frechet_distance, inception_score, precision_recall


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


def inception_score_reference(logits, split_size):
    """ADM's compute_inception_score, in float64 numpy."""
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    scores = []
    for i in range(0, len(p), split_size):
        part = p[i:i + split_size]
        kl = part * (np.log(part) - np.log(part.mean(0, keepdims=True)))
        scores.append(np.exp(kl.sum(1).mean()))
    return float(np.mean(scores))


def test_inception_score_of_uniform_predictions_is_one():
    assert inception_score(np.zeros((100, 1008))) == pytest.approx(1.0, abs=1e-12)


def test_inception_score_of_confident_balanced_predictions_is_the_class_count():
    labels = np.arange(1000) % 10
    logits = np.full((1000, 1008), -50.0)  # exp(-50): confident, yet no 0 * log 0
    logits[np.arange(1000), labels] = 0.0
    assert inception_score(logits) == pytest.approx(10.0, rel=1e-9)


def test_inception_score_matches_adm_on_5000_sample_splits():
    logits = np.random.default_rng(4).standard_normal((10_000, 50)) * 2
    assert inception_score(logits) == pytest.approx(inception_score_reference(logits, 5000), rel=1e-10)
    assert inception_score(logits, split_size=10_000) == pytest.approx(inception_score_reference(logits, 10_000),
                                                                       rel=1e-10)


def precision_recall_reference(fake, real, k):
    """Brute force: radius of each point = distance to its k-th nearest neighbour in its own set."""
    def dist(a, b):
        return np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))

    r_real = np.sort(dist(real, real), axis=1)[:, k]
    r_fake = np.sort(dist(fake, fake), axis=1)[:, k]
    precision = (dist(fake, real) <= r_real[None, :]).any(1).mean()
    recall = (dist(real, fake) <= r_fake[None, :]).any(1).mean()
    return precision, recall


def test_precision_recall_matches_brute_force():
    rng = np.random.default_rng(5)
    real = rng.standard_normal((300, 5))
    fake = rng.standard_normal((200, 5)) * 0.7 + 0.5
    p, r = precision_recall(fake, real, batch_size=64)
    p_ref, r_ref = precision_recall_reference(fake, real, 3)
    assert (p, r) == pytest.approx((p_ref, r_ref), abs=1e-6)


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
