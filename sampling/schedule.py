"""Which labels are sampled, in which order, in which batches, with which seeds.

The default order is class-interleaved: 0, 1, ..., K-1, 0, 1, ... so that every prefix of the run is
class-balanced (a run stopped early, or its first N images, still covers the classes evenly). The reference
sampling scripts use the class-sorted order (all images of class 0, then class 1, ...), available for
reproducing them.
"""
from dataclasses import dataclass
from typing import List, Sequence, Union

import numpy as np

LABEL_ORDERS = ('interleaved', 'sorted')


def _class_list(classes: Union[int, Sequence[int]]) -> np.ndarray:
    labels = np.arange(classes) if isinstance(classes, int) else np.asarray(list(classes), dtype=np.int64)
    if labels.size == 0:
        raise ValueError('no classes given')
    return labels.astype(np.int64)


def class_labels(per_class: int, classes: Union[int, Sequence[int]] = 1000, order: str = 'interleaved') -> np.ndarray:
    """Labels of a run with `per_class` images of each class: `classes` is a count (0..K-1) or an explicit list."""
    if per_class < 1:
        raise ValueError(f'per_class must be >= 1, got {per_class}')
    cls = _class_list(classes)
    if order == 'interleaved':
        return np.tile(cls, per_class)
    if order == 'sorted':
        return np.repeat(cls, per_class)
    raise ValueError(f'unknown label order {order!r}; choose one of {LABEL_ORDERS}')


@dataclass(frozen=True)
class Batch:
    index: int            # position of the batch in the run; names its shard file
    start: int            # position of its first image in the run
    labels: np.ndarray


def make_batches(labels: np.ndarray, batch_size: int) -> List[Batch]:
    """Consecutive batches of `batch_size` labels (the last one may be smaller)."""
    if batch_size < 1:
        raise ValueError(f'batch_size must be >= 1, got {batch_size}')
    return [Batch(index=i, start=s, labels=labels[s:s + batch_size])
            for i, s in enumerate(range(0, len(labels), batch_size))]


def batch_seed(run_seed: int, batch_index: int) -> int:
    """Seed of one batch, derived from the run seed and the batch index only, so a batch draws the same random
    numbers whichever rank samples it and whether or not the run was restarted."""
    return int(np.random.SeedSequence([int(run_seed), int(batch_index)]).generate_state(1, dtype=np.uint32)[0])
