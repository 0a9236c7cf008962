"""Improved Precision and Recall (k-NN manifolds), as the ADM evaluator computes them.

k = 3: a point's radius is the 4th smallest squared distance within its own set (itself at 0
included). Precision = fraction of samples inside some reference ball, recall = fraction of reference
points inside some sample ball, `<=` at the boundary. Squared distances max(|u|^2 - 2 u.v + |v|^2, 0)
are evaluated in float16 per 10000 x 10000 block (float16 inputs, float16 result of each operation),
and the block is recomputed in float32 only when a float16 value overflows, as the reference's
TensorFlow graph does. The float16 arithmetic is emulated exactly in float32 (each result rounded to
float16; float32 holds every product of two float16 values exactly), so no reduced-precision GEMM
setting can change it; CPU and GPU differ only where their float32 summation orders round a dot
product to a neighbouring float16 value (~0.1% of distances, one float16 step). Runs on any device.
"""
from __future__ import annotations

import numpy as np
import torch

from evaluation.backends import full_fp32

BLOCK_SIZE = 10000
NEIGHBOURHOOD = 3


def _round_fp16(x: torch.Tensor) -> torch.Tensor:
    return x.half().float()


def squared_distances_fp16(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The reference's float16 distance block, as float32 values (inf where float16 overflows)."""
    u, v = _round_fp16(u), _round_fp16(v)
    norm_u = _round_fp16(_round_fp16(u * u).sum(1))  # tf.square rounds each square to float16
    norm_v = _round_fp16(_round_fp16(v * v).sum(1))
    dots = _round_fp16(u @ v.T)
    d = _round_fp16(norm_u[:, None] - _round_fp16(2 * dots))
    return torch.clamp_min(_round_fp16(d + norm_v[None, :]), 0.0)


def squared_distances_fp32(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    norm_u, norm_v = (u * u).sum(1), (v * v).sum(1)
    return torch.clamp_min(norm_u[:, None] - 2 * (u @ v.T) + norm_v[None, :], 0.0)


def pairwise_distances(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    d = squared_distances_fp16(u, v)
    if bool(torch.isfinite(d).all()):
        return d
    return squared_distances_fp32(u, v)


class ManifoldEstimator:
    def __init__(self, device: torch.device | str = "cpu", row_batch_size: int = BLOCK_SIZE,
                 col_batch_size: int = BLOCK_SIZE, nhood_sizes: tuple[int, ...] = (NEIGHBOURHOOD,)):
        self.device = torch.device(device)
        self.row_batch_size, self.col_batch_size = row_batch_size, col_batch_size
        self.nhood_sizes = nhood_sizes

    def _tensor(self, features: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.asarray(features, dtype=np.float32), device=self.device)

    def manifold_radii(self, features: np.ndarray) -> np.ndarray:
        """[N, len(nhood_sizes)] squared radii: the k-th neighbour distance of each point (k=0: itself)."""
        x = self._tensor(features)
        n, k_max = len(x), max(self.nhood_sizes) + 1
        if n < k_max:
            raise ValueError(f"precision/recall need at least {k_max} images per set, got {n}")
        radii = []
        with full_fp32():
            for r0 in range(0, n, self.row_batch_size):
                rows = x[r0:r0 + self.row_batch_size]
                block = torch.cat([pairwise_distances(rows, x[c0:c0 + self.col_batch_size])
                                   for c0 in range(0, n, self.col_batch_size)], dim=1)
                nearest = torch.topk(block, k_max, dim=1, largest=False, sorted=True).values
                radii.append(nearest[:, list(self.nhood_sizes)])
        return torch.cat(radii).cpu().numpy()

    def evaluate_pr(self, features_1: np.ndarray, radii_1: np.ndarray, features_2: np.ndarray,
                    radii_2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(precision, recall) per neighbourhood size: set 1 is the reference, set 2 the samples."""
        f1, f2 = self._tensor(features_1), self._tensor(features_2)
        r1, r2 = self._tensor(radii_1), self._tensor(radii_2)
        status_1 = torch.zeros(len(f1), r2.shape[1], dtype=torch.bool, device=self.device)
        status_2 = torch.zeros(len(f2), r1.shape[1], dtype=torch.bool, device=self.device)
        with full_fp32():
            for b1 in range(0, len(f1), self.row_batch_size):
                e1 = b1 + self.row_batch_size
                for b2 in range(0, len(f2), self.col_batch_size):
                    e2 = b2 + self.col_batch_size
                    d = pairwise_distances(f1[b1:e1], f2[b2:e2])[..., None]
                    status_1[b1:e1] |= (d <= r2[b2:e2]).any(dim=1)
                    status_2[b2:e2] |= (d <= r1[b1:e1, None]).any(dim=0)
        return (status_2.double().mean(0).cpu().numpy(), status_1.double().mean(0).cpu().numpy())


def precision_recall(ref_features: np.ndarray, sample_features: np.ndarray,
                     device: torch.device | str = "cpu", block_size: int = BLOCK_SIZE) -> tuple[float, float]:
    estimator = ManifoldEstimator(device, block_size, block_size)
    ref_radii = estimator.manifold_radii(ref_features)
    sample_radii = estimator.manifold_radii(sample_features)
    precision, recall = estimator.evaluate_pr(ref_features, ref_radii, sample_features, sample_radii)
    return float(precision[0]), float(recall[0])
