"""A sharded, resumable sampling run, independent of the model family.

    run = SamplingRun(out_dir='out/var_d16', labels=class_labels(50), batch_size=100, seed=0)
    npz = run_sampling(sample_fn, run)    # sample_fn(labels, seed) -> {'images': (B, H, W, 3) uint8, ...}

Layout of `out_dir`: `run.json` (the settings; a restart must use the same ones), `shards/batch_XXXXXX.npz`
(one per batch, written atomically), and on completion `samples.npz` (`arr_0` uint8 NHWC in schedule order,
`labels`, the other per-image arrays) and `grid.png` (the first images).

Seeds: by default batch i is sampled with `batch_seed(seed, i)`, so a batch gets the same random numbers on
whichever rank and after whichever restart. `reseed_each_batch=True` instead gives every batch the run seed
itself, which is what the reference VAR sampling script does (`g_seed=42` for every batch of 100).

Under `torchrun`, batch i goes to rank i % WORLD_SIZE; rank 0 assembles the result once all shards exist.
"""
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Optional

import numpy as np
from tqdm import tqdm

from .distributed import RankInfo, rank_info_from_env, shard_for_rank
from .grid import save_grid
from .schedule import batch_seed, make_batches
from .shards import IMAGES_KEY, assemble_npz, check_shard, read_shard, shard_path, write_shard

SampleFn = Callable[[np.ndarray, int], Dict[str, np.ndarray]]
NPZ_NAME, GRID_NAME, RUN_FILE, SHARDS_DIR = 'samples.npz', 'grid.png', 'run.json', 'shards'


class RunMismatchError(RuntimeError):
    """The output folder belongs to a run with other settings."""


@dataclass
class SamplingRun:
    out_dir: Path
    labels: np.ndarray
    batch_size: int = 100
    seed: int = 0
    reseed_each_batch: bool = False
    description: dict = field(default_factory=dict)   # model, recipe, precision...: must match on restart
    grid_images: int = 64

    def settings(self) -> dict:
        labels = np.ascontiguousarray(self.labels, dtype=np.int64)
        return {'num_images': int(labels.size), 'batch_size': self.batch_size, 'seed': self.seed,
                'reseed_each_batch': self.reseed_each_batch,
                'labels_sha256': hashlib.sha256(labels.tobytes()).hexdigest(), 'description': self.description}

    def seed_of(self, batch_index: int) -> int:
        return self.seed if self.reseed_each_batch else batch_seed(self.seed, batch_index)


def _check_settings(out_dir: Path, settings: dict) -> None:
    """Record the settings in run.json, or check them against the ones recorded by an earlier start."""
    run_file = out_dir / RUN_FILE
    if run_file.exists():
        recorded = json.loads(run_file.read_text())
        # round-trip through JSON so tuples and lists compare equal
        settings = json.loads(json.dumps(settings))
        diffs = [f'{k}: {recorded.get(k)!r} recorded, {settings[k]!r} now' for k in settings if recorded.get(k) != settings[k]]
        if diffs:
            raise RunMismatchError(f'{out_dir} holds a run with other settings ({"; ".join(diffs)}); use another output '
                                   f'folder, or delete this one to start over')
        return
    tmp = run_file.with_name(f'.{RUN_FILE}.tmp-{os.getpid()}')   # ranks may start together: one temp file each
    tmp.write_text(json.dumps(settings, indent=1))
    tmp.replace(run_file)


def _check_batch(arrays: Dict[str, np.ndarray], labels: np.ndarray) -> None:
    images = arrays.get(IMAGES_KEY)
    if images is None or images.dtype != np.uint8 or images.ndim != 4 or images.shape[0] != len(labels) or images.shape[-1] != 3:
        got = None if images is None else (images.dtype, images.shape)
        raise ValueError(f'sample_fn must return {{"images": uint8 array ({len(labels)}, H, W, 3), ...}}, got {got}')
    for k, v in arrays.items():
        if np.asarray(v).shape[:1] != (len(labels),):
            raise ValueError(f'sample_fn output {k!r} must have one row per image ({len(labels)}), got shape {np.shape(v)}')


def run_sampling(sample_fn: SampleFn, run: SamplingRun, rank: Optional[RankInfo] = None,
                 max_new_batches: Optional[int] = None, wait_timeout_s: float = 7 * 24 * 3600,
                 poll_s: float = 10.0, progress: bool = True) -> Optional[Path]:
    """Sample this rank's missing batches, then (rank 0) assemble `samples.npz` and `grid.png`.

    max_new_batches: stop after sampling this many new batches (a time-limited job; rerun to continue).
    Returns the .npz path on rank 0 once the run is complete, else None.
    """
    rank = rank or rank_info_from_env()
    out_dir = Path(run.out_dir)
    shards_dir = out_dir / SHARDS_DIR
    shards_dir.mkdir(parents=True, exist_ok=True)
    _check_settings(out_dir, run.settings())

    batches = make_batches(np.asarray(run.labels, dtype=np.int64), run.batch_size)
    mine = shard_for_rank(batches, rank)
    done = [b for b in mine if shard_path(shards_dir, b.index).exists()]
    for b in done:
        check_shard(shard_path(shards_dir, b.index))
    todo = [b for b in mine if not shard_path(shards_dir, b.index).exists()]
    if max_new_batches is not None:
        todo = todo[:max_new_batches]

    bar = tqdm(total=len(mine), initial=len(done), unit='batch', disable=not progress,
               desc=f'sampling (rank {rank.rank}/{rank.world_size})')
    for b in todo:
        arrays = dict(sample_fn(b.labels, run.seed_of(b.index)))
        _check_batch(arrays, b.labels)
        write_shard(shard_path(shards_dir, b.index), {**arrays, 'labels': b.labels})
        bar.update(1)
    bar.close()

    if not rank.is_main or len(done) + len(todo) < len(mine):
        return None
    paths = [shard_path(shards_dir, b.index) for b in batches]
    deadline = time.monotonic() + wait_timeout_s
    while True:
        missing = [b.index for b, p in zip(batches, paths) if not p.exists()]
        if not missing:
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f'{len(missing)} batches are still missing in {shards_dir} (first: {missing[:5]}); '
                               f'rerun the sampling command to produce them')
        time.sleep(poll_s)

    npz = assemble_npz(out_dir / NPZ_NAME, paths)
    save_grid(_first_images(paths, run.grid_images), out_dir / GRID_NAME)
    return npz


def _first_images(paths, count: int) -> np.ndarray:
    chunks, have = [], 0
    for p in paths:
        if have >= count:
            break
        chunks.append(read_shard(p, [IMAGES_KEY])[IMAGES_KEY][:count - have])
        have += len(chunks[-1])
    return np.concatenate(chunks)
