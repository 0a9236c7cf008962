"""Shared evaluator math against closed forms: Fréchet distance, Inception Score, Precision/Recall."""
import math

import numpy as np
import pytest
import scipy.linalg
import torch

from evaluation import manifold, metrics
from evaluation.manifold import ManifoldEstimator, pairwise_distances, precision_recall
from evaluation.metrics import FIDStatistics, compute_statistics, inception_score, split_order_warning


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _random_spd(d, rng, scale=1.0):
    a = rng.standard_normal((d, 2 * d))
    return scale * a @ a.T / (2 * d) + 0.1 * np.eye(d)


# ------------------------------------------------------------------------------------------------
# Fréchet distance


def test_fid_of_identical_statistics_is_zero():
    acts = np.random.default_rng(0).standard_normal((500, 64)).astype(np.float32)
    stats = compute_statistics(acts)
    assert abs(stats.frechet_distance(stats)) < 1e-8


def test_fid_diagonal_covariances_closed_form():
    rng = np.random.default_rng(1)
    a, b = rng.uniform(0.5, 3, 40), rng.uniform(0.5, 3, 40)
    mu1, mu2 = rng.standard_normal(40), rng.standard_normal(40)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = FIDStatistics(mu1, np.diag(a)).frechet_distance(FIDStatistics(mu2, np.diag(b)))
    assert got == pytest.approx(expected, rel=1e-10)


def test_fid_scaled_covariance_closed_form():
    rng = np.random.default_rng(2)
    sigma, mu, c = _random_spd(64, rng), rng.standard_normal(64), 1.7
    got = FIDStatistics(mu, sigma).frechet_distance(FIDStatistics(mu, c ** 2 * sigma))
    assert got == pytest.approx((1 - c) ** 2 * np.trace(sigma), rel=1e-8)


def test_fid_equal_covariances_and_one_dimensional_case():
    rng = np.random.default_rng(3)
    sigma, mu1, mu2 = _random_spd(32, rng), rng.standard_normal(32), rng.standard_normal(32)
    got = FIDStatistics(mu1, sigma).frechet_distance(FIDStatistics(mu2, sigma))
    assert got == pytest.approx(np.sum((mu1 - mu2) ** 2), rel=1e-7)
    one_d = FIDStatistics(np.array(1.5), np.array(4.0)).frechet_distance(FIDStatistics(np.array(-0.5), np.array(9.0)))
    assert one_d == pytest.approx((1.5 + 0.5) ** 2 + (2 - 3) ** 2, rel=1e-12)


def test_fid_invariances_and_one_sided_permutation():
    rng = np.random.default_rng(4)
    mixing = rng.standard_normal((24, 24))
    x = rng.standard_normal((600, 24)) @ mixing
    y = rng.standard_normal((600, 24)) @ mixing + 0.3

    def fid(a, b):
        return compute_statistics(a).frechet_distance(compute_statistics(b))

    base = fid(x, y)
    q, _ = np.linalg.qr(rng.standard_normal((24, 24)))
    perm = rng.permutation(24)
    assert fid(x + 5.0, y + 5.0) == pytest.approx(base, rel=1e-6)
    assert fid(x @ q, y @ q) == pytest.approx(base, rel=1e-6)
    assert fid(x[:, perm], y[:, perm]) == pytest.approx(base, rel=1e-9)
    # Permuting one side only (e.g. NCHW vs NHWC sFID features) changes the distance.
    assert fid(x[:, perm], y) > 10 * base


def test_compute_statistics_matches_numpy_on_float32_activations():
    acts = np.random.default_rng(5).standard_normal((300, 16)).astype(np.float32)
    stats = compute_statistics(acts)
    assert stats.mu.dtype == np.float32 and stats.sigma.dtype == np.float64
    np.testing.assert_array_equal(stats.mu, np.mean(acts, axis=0))
    np.testing.assert_allclose(stats.sigma, np.cov(acts.astype(np.float64), rowvar=False, ddof=1), rtol=1e-12)


def test_fid_trace_matches_eigenvalue_formula():
    rng = np.random.default_rng(6)
    s1, s2 = _random_spd(48, rng), _random_spd(48, rng)
    root1 = scipy.linalg.sqrtm(s1).real
    trace = np.sum(np.sqrt(np.linalg.eigvalsh(root1 @ s2 @ root1)))
    fid = FIDStatistics(np.zeros(48), s1).frechet_distance(FIDStatistics(np.zeros(48), s2))
    assert fid == pytest.approx(np.trace(s1) + np.trace(s2) - 2 * trace, rel=1e-6)


def test_fid_retries_with_epsilon_when_sqrtm_is_not_finite(monkeypatch):
    calls = []
    real_sqrtm = scipy.linalg.sqrtm

    def flaky_sqrtm(a):
        calls.append(a.copy())
        return np.full_like(a, np.nan) if len(calls) == 1 else real_sqrtm(a)

    monkeypatch.setattr(metrics.linalg, "sqrtm", flaky_sqrtm)
    s1, s2 = np.diag([1.0, 4.0]), np.diag([9.0, 16.0])
    with pytest.warns(UserWarning, match="adding 1e-06 to diagonal"):
        fid = FIDStatistics(np.zeros(2), s1).frechet_distance(FIDStatistics(np.zeros(2), s2))
    np.testing.assert_allclose(calls[1], (s1 + 1e-6 * np.eye(2)) @ (s2 + 1e-6 * np.eye(2)))
    expected = 1 + 4 + 9 + 16 - 2 * (np.sqrt((1 + 1e-6) * (9 + 1e-6)) + np.sqrt((4 + 1e-6) * (16 + 1e-6)))
    assert fid == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("imaginary, raises", [(1e-2, True), (1e-5, False)])
def test_fid_imaginary_component_tolerance(monkeypatch, imaginary, raises):
    monkeypatch.setattr(metrics.linalg, "sqrtm", lambda a: np.eye(2) * (2.0 + 1j * imaginary))
    stats = FIDStatistics(np.zeros(2), np.eye(2))
    if raises:
        with pytest.raises(ValueError, match="Imaginary component"):
            stats.frechet_distance(stats)
    else:
        assert stats.frechet_distance(stats) == pytest.approx(2 + 2 - 2 * 4)


# ------------------------------------------------------------------------------------------------
# Inception Score (stand-in softmax: logits = the features' first classes)


def _softmax(logits):
    logits = torch.from_numpy(np.asarray(logits, np.float32))
    return torch.softmax(logits, dim=1).numpy()


def _one_hot_logits(labels, alpha, classes=1008):
    logits = np.zeros((len(labels), classes), np.float32)
    logits[np.arange(len(labels)), labels] = alpha
    return logits


def test_is_of_uniform_predictions_is_one():
    assert inception_score(_softmax(np.zeros((6000, 1008)))) == pytest.approx(1.0, abs=1e-4)


def test_is_interleaved_vs_class_sorted_samples():
    interleaved = np.arange(10_000) % 10
    probs = _softmax(_one_hot_logits(interleaved, 50.0))
    assert inception_score(probs) == pytest.approx(10.0, rel=1e-5)
    assert split_order_warning(probs) is None
    sorted_probs = _softmax(_one_hot_logits(np.sort(interleaved), 50.0))
    assert inception_score(sorted_probs) == pytest.approx(5.0, rel=1e-5)
    message = split_order_warning(sorted_probs)
    assert message is not None and "sorted by class" in message and "5.0 effective classes" in message


def test_is_soft_predictions_closed_form():
    alpha, classes = 5.0, 1008
    probs = _softmax(_one_hot_logits(np.arange(10_000) % 10, alpha, classes))
    p_true = math.exp(alpha) / (math.exp(alpha) + classes - 1)
    p_other = 1 / (math.exp(alpha) + classes - 1)
    q_big = (p_true + 9 * p_other) / 10  # split marginal of the 10 used classes
    kl = p_true * math.log(p_true / q_big) + 9 * p_other * math.log(p_other / q_big)
    assert math.exp(kl) == pytest.approx(1.305695, abs=1e-6)
    assert inception_score(probs) == pytest.approx(math.exp(kl), rel=1e-4)


def test_is_underflow_gives_nan_like_the_reference():
    probs = _softmax(_one_hot_logits(np.arange(5000) % 10, 120.0))
    assert (probs == 0).any()
    with pytest.warns(UserWarning, match="NaN"):
        assert math.isnan(inception_score(probs))


def test_is_uses_consecutive_splits_including_a_short_last_one():
    labels = np.concatenate([np.arange(5000) % 10, np.arange(5000) % 5, np.arange(2345) % 5])
    probs = _softmax(_one_hot_logits(labels, 50.0))
    # Splits: 10 classes, 5 classes, and 2,345 samples of 5 classes -> mean(10, 5, 5).
    assert inception_score(probs) == pytest.approx((10 + 5 + 5) / 3, rel=1e-5)
    assert inception_score(probs[:10_000]) == pytest.approx(7.5, rel=1e-5)


# ------------------------------------------------------------------------------------------------
# Precision / Recall on point clouds (integer coordinates: float16 exact)


def _points(xs, dims=2048):
    out = np.zeros((len(xs), dims), np.float32)
    out[:, 0] = xs
    return out


@pytest.mark.parametrize("sample, expected", [
    (np.arange(10), (1.0, 1.0)),
    (np.arange(5, 15), (0.8, 0.8)),  # radii² 9 at the ends, 4 inside: balls cover [-3, 12]
    (np.repeat([0, 4, 7], 4), (1.0, 0.3)),  # mode collapse: sample radii 0
    (np.arange(100, 110), (0.0, 0.0)),
])
def test_precision_recall_point_clouds(sample, expected):
    ref = _points(np.arange(10))
    assert precision_recall(ref, _points(sample)) == expected


def test_point_exactly_on_the_radius_is_inside():
    ref = _points([0, 1, 2, 3])  # radius² of 0 is 9 (4th nearest incl. itself)
    assert precision_recall(ref, _points([-3, -3, -3, -3]))[0] == 1.0
    assert precision_recall(ref, _points([-4, -4, -4, -4]))[0] == 0.0


def test_precision_recall_independent_of_block_size():
    rng = np.random.default_rng(7)
    ref = rng.integers(-20, 20, (40, 8)).astype(np.float32)
    sample = rng.integers(-20, 20, (55, 8)).astype(np.float32)
    assert precision_recall(ref, sample, block_size=3) == precision_recall(ref, sample)
    radii_small = ManifoldEstimator("cpu", 3, 7).manifold_radii(sample)
    np.testing.assert_array_equal(radii_small, ManifoldEstimator("cpu").manifold_radii(sample))


def test_large_norms_fall_back_to_float32():
    rng = np.random.default_rng(8)
    u, v = (rng.normal(0, 10, (30, 2048)).astype(np.float32) for _ in range(2))
    assert not torch.isfinite(manifold.squared_distances_fp16(torch.from_numpy(u), torch.from_numpy(v))).all()
    got = pairwise_distances(torch.from_numpy(u), torch.from_numpy(v)).numpy()
    exact = ((u[:, None].astype(np.float64) - v[None].astype(np.float64)) ** 2).sum(-1)
    assert np.abs(got / exact - 1).max() < 1e-5


def test_realistic_norms_use_float16_distances():
    rng = np.random.default_rng(9)
    u, v = (np.abs(rng.normal(0, 0.55, (50, 2048))).astype(np.float32) for _ in range(2))  # |x|² ~ 600
    got = pairwise_distances(torch.from_numpy(u), torch.from_numpy(v))
    np.testing.assert_array_equal(got.numpy(), got.half().float().numpy())  # float16 values
    exact = ((u[:, None].astype(np.float64) - v[None].astype(np.float64)) ** 2).sum(-1)
    relative = np.abs(got.numpy() / exact - 1)
    assert relative.max() < 0.01 and relative.max() > 1e-4  # float16 error, as in the reference


def test_float16_emulation_matches_true_float16_arithmetic():
    rng = np.random.default_rng(10)
    u, v = (rng.normal(0, 0.3, (20, 64)).astype(np.float32) for _ in range(2))
    u16, v16 = u.astype(np.float16), v.astype(np.float16)
    norm_u = (u16 * u16).astype(np.float32).sum(1).astype(np.float16)
    norm_v = (v16 * v16).astype(np.float32).sum(1).astype(np.float16)
    dots = (u16.astype(np.float32) @ v16.astype(np.float32).T).astype(np.float16)
    expected = np.maximum(norm_u[:, None] - np.float16(2) * dots + norm_v[None, :], np.float16(0))
    got = manifold.squared_distances_fp16(torch.from_numpy(u), torch.from_numpy(v)).numpy()
    np.testing.assert_array_equal(got, expected.astype(np.float32))


def test_radii_are_fourth_smallest_distances():
    x = _points([0, 1, 3, 6, 10])
    radii = ManifoldEstimator("cpu").manifold_radii(x)
    np.testing.assert_array_equal(radii[:, 0], [36, 25, 9, 25, 81])
