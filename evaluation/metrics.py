"""FID statistics, the Fréchet distance and the Inception Score, numerically as the ADM evaluator.

Statistics: mean of the float32 activations (float32) and `np.cov` (float64, N - 1). Fréchet distance:
scipy `sqrtm` of sigma1 @ sigma2, retried with 1e-6 on both diagonals when the result is not finite,
the real part taken when the imaginary diagonal stays within 1e-3. IS: consecutive, unshuffled splits
of 5000 samples, float32 logs, mean over splits.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from scipy import linalg

IS_SPLIT_SIZE = 5000


@dataclass
class FIDStatistics:
    mu: np.ndarray
    sigma: np.ndarray

    def frechet_distance(self, other: "FIDStatistics", eps: float = 1e-6) -> float:
        mu1, mu2 = np.atleast_1d(self.mu), np.atleast_1d(other.mu)
        sigma1, sigma2 = np.atleast_2d(self.sigma), np.atleast_2d(other.sigma)
        if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
            raise ValueError(f"statistics of different dimensions: mean {mu1.shape} vs {mu2.shape}, "
                             f"covariance {sigma1.shape} vs {sigma2.shape} (were they made with the same "
                             f"Inception graph and feature?)")
        diff = mu1 - mu2
        covmean = linalg.sqrtm(sigma1.dot(sigma2))  # no `disp`: removed in SciPy 1.18
        if not np.isfinite(covmean).all():
            warnings.warn(f"fid calculation produces singular product; adding {eps} to diagonal of cov estimates")
            offset = np.eye(sigma1.shape[0]) * eps
            covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
        if np.iscomplexobj(covmean):  # numerical error may leave a small imaginary component
            if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
                raise ValueError(f"Imaginary component {np.max(np.abs(covmean.imag))}")
            covmean = covmean.real
        return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def compute_statistics(activations: np.ndarray) -> FIDStatistics:
    return FIDStatistics(np.mean(activations, axis=0), np.cov(activations, rowvar=False))


def inception_score(probabilities: np.ndarray, split_size: int = IS_SPLIT_SIZE) -> float:
    """exp(E_x KL(p(y|x) || p(y))) per consecutive split of `split_size`, averaged over splits."""
    scores = []
    for start in range(0, len(probabilities), split_size):
        part = probabilities[start:start + split_size]
        with np.errstate(divide="ignore", invalid="ignore"):  # 0 * log(0) -> NaN, reported below
            kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    score = float(np.mean(scores))
    if not np.isfinite(score):
        warnings.warn("Inception Score is NaN: some softmax probabilities underflow to 0 in float32, "
                      "giving 0 * log(0), exactly as the reference evaluator does")
    return score


def split_perplexities(labels: np.ndarray, split_size: int) -> np.ndarray:
    """Effective number of predicted classes, exp(entropy of the label histogram), in each split."""
    out = []
    for start in range(0, len(labels), split_size):
        counts = np.bincount(labels[start:start + split_size]).astype(np.float64)
        p = counts[counts > 0] / counts.sum()
        out.append(np.exp(-(p * np.log(p)).sum()))
    return np.array(out)


def split_order_warning(probabilities: np.ndarray, split_size: int = IS_SPLIT_SIZE,
                        threshold: float = 0.75, shuffles: int = 16) -> str | None:
    """A message when IS splits see far fewer classes than the same samples shuffled would.

    The IS splits are consecutive, so class-sorted sample files cap each split's marginal and give a
    much lower score (e.g. 62 instead of 298 for 1000 sorted ImageNet classes, where a split sees ~100
    instead of ~900 effective classes). A split is flagged when its effective number of predicted
    classes is below `threshold` times, and 4 standard deviations under, what shuffles of the same
    predicted labels give: independent of split size and number of classes, and quiet for small,
    noisy splits of unsorted samples.
    """
    labels = probabilities.argmax(axis=1)
    actual = split_perplexities(labels, split_size)
    rng = np.random.default_rng(0)
    shuffled = np.stack([split_perplexities(rng.permutation(labels), split_size) for _ in range(shuffles)])
    expected, spread = shuffled.mean(0), shuffled.std(0)
    low = np.flatnonzero((actual < threshold * expected) & (actual < expected - 4 * spread))
    if len(low) == 0:
        return None
    i = low[0]
    return (f"predicted classes are far from uniform across the IS splits: {len(low)} of {len(actual)} "
            f"splits of {split_size} samples see far fewer classes than shuffled samples would "
            f"(split {i}: {actual[i]:.1f} effective classes vs {expected[i]:.1f} shuffled). The samples look "
            f"sorted by class; the Inception Score uses consecutive splits, so it is too low. "
            f"Write the .npz in random or class-interleaved order.")
