"""Per-batch shard files and the final .npz.

A shard is a small .npz holding one batch: `images` (B, H, W, 3) uint8, `labels` (B,), and whatever else the
sampler returned (token ids, ...). It is written to a temporary name and renamed into place, so a shard file
either holds a complete batch or does not exist; a restarted run skips the batches whose shards exist.

The final .npz follows the ADM evaluator's convention, `arr_0` = all images (N, H, W, 3) uint8 in schedule
order, plus `labels` and the other per-image arrays. It is streamed shard by shard into an uncompressed zip
with fixed timestamps: memory stays at one shard, and the same shards always give the same bytes.
"""
import os
import zipfile
from pathlib import Path
from typing import Dict, Iterable, List, Tuple

import numpy as np

IMAGES_KEY = 'images'
NPZ_IMAGES_KEY = 'arr_0'
_FIXED_ZIP_TIME = (1980, 1, 1, 0, 0, 0)


class CorruptShardError(RuntimeError):
    """A shard file exists but cannot be read completely."""


def shard_path(shards_dir: Path, batch_index: int) -> Path:
    return Path(shards_dir) / f'batch_{batch_index:06d}.npz'


def _tmp_name(path: Path) -> Path:
    return path.with_name(f'.{path.name}.tmp-{os.getpid()}')


def write_shard(path: Path, arrays: Dict[str, np.ndarray]) -> None:
    """Write `arrays` to `path` atomically (temporary file, fsync, rename)."""
    path = Path(path)
    tmp = _tmp_name(path)
    try:
        with open(tmp, 'wb') as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _corrupt(path: Path, err: Exception) -> CorruptShardError:
    return CorruptShardError(f'shard {path} is unreadable ({type(err).__name__}: {err}); delete it and rerun the '
                             f'same command to sample that batch again')


def check_shard(path: Path, keys: Iterable[str] = (IMAGES_KEY, 'labels')) -> None:
    """Cheap check (zip directory and member names only) that a shard is complete."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = set(zf.namelist())
    except (OSError, zipfile.BadZipFile, ValueError) as err:
        raise _corrupt(path, err) from err
    missing = [k for k in keys if f'{k}.npy' not in names]
    if missing:
        raise _corrupt(path, KeyError(f'missing arrays {missing}'))


def read_shard(path: Path, keys: Iterable[str] = None) -> Dict[str, np.ndarray]:
    """Arrays of a shard (all, or only `keys`); CorruptShardError if the file is damaged."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in (z.files if keys is None else keys)}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as err:
        raise _corrupt(path, err) from err


def _array_header(path: Path, key: str) -> Tuple[Tuple[int, ...], np.dtype]:
    try:
        with zipfile.ZipFile(path) as zf, zf.open(f'{key}.npy') as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read(f)
            return shape, dtype
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as err:
        raise _corrupt(path, err) from err


def assemble_npz(out_path: Path, shard_paths: List[Path]) -> Path:
    """Concatenate the shards, in the given order, into one .npz (`images` stored as `arr_0`)."""
    out_path = Path(out_path)
    keys = sorted(read_shard(shard_paths[0]).keys(), key=lambda k: (k != IMAGES_KEY, k))
    tmp = _tmp_name(out_path)
    try:
        with zipfile.ZipFile(tmp, 'w', compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            for key in keys:
                headers = [_array_header(p, key) for p in shard_paths]
                tails, dtypes = {h[0][1:] for h in headers}, {h[1] for h in headers}
                if len(tails) != 1 or len(dtypes) != 1:
                    raise CorruptShardError(f'shards disagree on the shape or dtype of {key!r}: {sorted(tails)} {dtypes}; '
                                            f'they come from different runs: sample into a fresh folder')
                shape = (sum(h[0][0] for h in headers),) + tails.pop()
                dtype = dtypes.pop()
                info = zipfile.ZipInfo(f'{NPZ_IMAGES_KEY if key == IMAGES_KEY else key}.npy', date_time=_FIXED_ZIP_TIME)
                info.compress_type = zipfile.ZIP_STORED
                with zf.open(info, 'w', force_zip64=True) as f:
                    np.lib.format.write_array_header_1_0(
                        f, {'descr': np.lib.format.dtype_to_descr(dtype), 'fortran_order': False, 'shape': shape})
                    for p in shard_paths:
                        f.write(np.ascontiguousarray(read_shard(p, [key])[key]).tobytes())
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
    return out_path
