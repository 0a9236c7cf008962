"""IS, FID, sFID, Precision and Recall of a sample .npz against a reference batch, as the ADM
(guided-diffusion) evaluator computes them, with either feature backend.

Flow (the reference evaluator's order): reference activations -> reference statistics (cached
mu/sigma/mu_s/sigma_s when the file has them) -> sample activations -> sample statistics -> IS on the
sample pool_3 -> FID (pool_3) and sFID (mixed_6/conv[..., :7]) -> precision/recall between the pool_3
features of the reference images and the samples.
"""
from __future__ import annotations

import contextlib
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator

import numpy as np
from tqdm.auto import tqdm

from evaluation.backends import FeatureBackend
from evaluation.manifold import NEIGHBOURHOOD, precision_recall
from evaluation.metrics import (IS_SPLIT_SIZE, FIDStatistics, compute_statistics, inception_score,
                                split_order_warning)
from evaluation.npz import NpzImages, read_cached_statistics, validate_images


@dataclass
class Metrics:
    inception_score: float
    fid: float
    sfid: float
    precision: float
    recall: float
    backend: str
    num_samples: int
    num_reference_images: int
    timings: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)

    def report(self) -> str:
        return "\n".join([f"Inception Score: {self.inception_score}", f"FID: {self.fid}", f"sFID: {self.sfid}",
                          f"Precision: {self.precision}", f"Recall: {self.recall}"])


class _PhaseTimer:
    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, phase: str):
        start = time.perf_counter()
        yield
        self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start


def _progress(batches: Iterator[np.ndarray], total: int, desc: str, enabled: bool) -> Iterator[np.ndarray]:
    with tqdm(total=total, unit="img", desc=desc, disable=not enabled) as bar:
        for batch in batches:
            yield batch
            bar.update(len(batch))


def _activations(backend: FeatureBackend, images: NpzImages, batch_size: int, desc: str, progress: bool):
    batches = _progress(images.batches(batch_size), images.info.num_images, desc, progress)
    return backend.activations(batches)


def evaluate(ref_path: str, sample_path: str, backend: FeatureBackend, batch_size: int | None = None,
             is_split_size: int = IS_SPLIT_SIZE, progress: bool = True,
             log: Callable[[str], None] = print) -> Metrics:
    """All five metrics of `sample_path` against `ref_path` (both .npz files with uint8 NHWC arr_0)."""
    batch_size = batch_size or backend.default_batch_size
    timer, notes = _PhaseTimer(), []

    def warn(message: str) -> None:
        notes.append(message)
        warnings.warn(message, stacklevel=3)

    for path, role in ((ref_path, "reference batch"), (sample_path, "sample batch")):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{role} {path} not found")
    with NpzImages(ref_path) as ref_images, NpzImages(sample_path) as sample_images:
        ref_info, sample_info = ref_images.info, sample_images.info
        validate_images(ref_info, "reference")
        validate_images(sample_info, "sample")
        if sample_info.shape[1:3] != ref_info.shape[1:3]:
            raise ValueError(f"sample images are {sample_info.shape[1]}x{sample_info.shape[2]} but the reference "
                             f"images are {ref_info.shape[1]}x{ref_info.shape[2]}: generate (or resize) samples "
                             f"at the reference resolution")
        if sample_info.num_images < is_split_size:
            raise ValueError(f"{sample_path} holds {sample_info.num_images} images but one Inception Score split "
                             f"needs {is_split_size} (the reference protocol: 50,000 samples in 10 splits)")
        if sample_info.num_images % is_split_size:
            warn(f"{sample_info.num_images} samples are not a multiple of the IS split size {is_split_size}: "
                 f"the last split holds {sample_info.num_images % is_split_size} samples")
        for info, role in ((ref_info, "reference"), (sample_info, "sample")):
            if info.num_images <= NEIGHBOURHOOD:
                raise ValueError(f"{role} file {info.path} holds {info.num_images} images; precision/recall "
                                 f"need more than {NEIGHBOURHOOD}")
        ref_cached = read_cached_statistics(ref_path, "reference")
        sample_cached = read_cached_statistics(sample_path, "sample")
        if sample_cached is not None:
            warn(f"sample file {sample_path} carries cached statistics (mu, sigma, mu_s, sigma_s): FID and "
                 f"sFID use them instead of its images, as the reference evaluator does. Remove the mu key "
                 f"from sample files unless this is intended.")

        log(f"backend: {backend.name} ({backend.describe()})")
        log("computing reference batch activations...")
        with timer("reference activations"):
            ref_pool, ref_spatial = _activations(backend, ref_images, batch_size, "reference", progress)
        log("computing/reading reference batch statistics...")
        with timer("statistics (np.cov)"):
            ref_stats = ref_cached or (compute_statistics(ref_pool), compute_statistics(ref_spatial))
        log("computing sample batch activations...")
        with timer("sample activations"):
            sample_pool, sample_spatial = _activations(backend, sample_images, batch_size, "samples", progress)
        log("computing/reading sample batch statistics...")
        with timer("statistics (np.cov)"):
            sample_stats = sample_cached or (compute_statistics(sample_pool), compute_statistics(sample_spatial))

    log("Computing evaluations...")
    with timer("inception score"):
        probabilities = backend.class_probabilities(sample_pool)
        score = inception_score(probabilities, is_split_size)
        order_message = split_order_warning(probabilities, is_split_size)
    if order_message:
        warn(order_message)
    if not np.isfinite(score):
        notes.append("Inception Score is NaN: float32 softmax probabilities underflow to 0 (0 * log 0), "
                     "as in the reference evaluator")
    with timer("FID (sqrtm 2048)"):
        fid = _fid(sample_stats[0], ref_stats[0], "FID (pool_3)")
    with timer("sFID (sqrtm 2023)"):
        sfid = _fid(sample_stats[1], ref_stats[1], "sFID (mixed_6/conv)")
    with timer("precision/recall"):
        precision, recall = precision_recall(ref_pool, sample_pool, backend.device)
    return Metrics(score, fid, sfid, precision, recall, backend.describe(), sample_info.num_images,
                   ref_info.num_images, timer.seconds, notes)


def _fid(sample: FIDStatistics, ref: FIDStatistics, what: str) -> float:
    if np.shape(sample.mu) != np.shape(ref.mu):
        raise ValueError(f"{what}: sample statistics have {np.shape(sample.mu)} dims but the reference has "
                         f"{np.shape(ref.mu)}: the reference statistics were made with another network")
    return sample.frechet_distance(ref)
