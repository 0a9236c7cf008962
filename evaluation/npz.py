"""Reading evaluator .npz files: images in bounded memory, cached statistics, input checks.

`arr_0` is read without loading it whole: an uncompressed member (np.savez) is memory-mapped in
place, a compressed C-order member (np.savez_compressed) is streamed out of the zip; only Fortran-order
or object arrays fall back to np.load, as in the reference evaluator. Batches are read ahead on a
background thread so disk reads overlap the network.
"""
from __future__ import annotations

import queue
import struct
import threading
import zipfile
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from evaluation.metrics import FIDStatistics

IMAGES_KEY = "arr_0"
STATISTICS_KEYS = ("mu", "sigma", "mu_s", "sigma_s")


@dataclass
class ImageArrayInfo:
    path: str
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def num_images(self) -> int:
        return self.shape[0]


class NpzImages:
    """The `arr_0` member of an .npz file, readable in batches. Use as a context manager."""

    def __init__(self, path: str, key: str = IMAGES_KEY):
        self.path, self.key = str(path), key
        self._file = open(self.path, "rb")
        try:
            self._zip = zipfile.ZipFile(self._file)
        except zipfile.BadZipFile as error:
            self._file.close()
            raise ValueError(f"{self.path} is not an .npz file (not a zip archive)") from error
        member = f"{key}.npy"
        if member not in self._zip.namelist():
            keys = [n[:-4] for n in self._zip.namelist() if n.endswith(".npy")]
            self.close()
            raise ValueError(f"missing {key} in npz file {self.path} (keys: {keys}); save the images "
                             f"with np.savez(path, arr_0=images)")
        self._info = self._zip.getinfo(member)
        with self._zip.open(member) as f:
            version = np.lib.format.read_magic(f)
            if version in ((1, 0), (2, 0)):
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)
                shape, fortran, dtype = read_header(f)
                self._data_offset_in_member = f.tell()
            else:  # format 3.0 (utf8 field names): only the in-memory reader handles it
                shape, fortran, dtype = None, None, None
        self._array: np.ndarray | None = None
        if shape is None or dtype.hasobject:
            self._array = np.load(self.path)[key]
        elif self._info.compress_type == zipfile.ZIP_STORED:
            self._array = np.memmap(self.path, dtype=dtype, mode="r", shape=shape,
                                    order="F" if fortran else "C", offset=self._member_data_offset())
        elif fortran:
            self._array = np.load(self.path)[key]
        self.info = ImageArrayInfo(self.path, tuple(shape) if shape is not None else self._array.shape,
                                   np.dtype(dtype) if dtype is not None else self._array.dtype)

    def _member_data_offset(self) -> int:
        """File offset of the array data of an uncompressed member (after zip and .npy headers)."""
        self._file.seek(self._info.header_offset)
        local_header = self._file.read(30)
        if local_header[:4] != b"PK\x03\x04":
            raise ValueError(f"{self.path}: corrupt zip local header for {self.key}.npy")
        name_length, extra_length = struct.unpack("<HH", local_header[26:30])
        return self._info.header_offset + 30 + name_length + extra_length + self._data_offset_in_member

    def __enter__(self) -> "NpzImages":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._array = None
        self._zip.close()
        self._file.close()

    def _read_batches(self, batch_size: int) -> Iterator[np.ndarray]:
        n = self.info.num_images
        if self._array is not None:
            for start in range(0, n, batch_size):
                yield np.array(self._array[start:start + batch_size], order="C")  # a copy: reads the file here
            return
        item_bytes = int(np.prod(self.info.shape[1:])) * self.info.dtype.itemsize
        with self._zip.open(f"{self.key}.npy") as f:
            f.seek(self._data_offset_in_member)
            for start in range(0, n, batch_size):
                count = min(batch_size, n - start)
                data = bytearray(count * item_bytes)
                view, filled = memoryview(data), 0
                while filled < len(data):
                    chunk = f.readinto(view[filled:])
                    if not chunk:
                        raise ValueError(f"{self.path}: {self.key} ends early (file truncated?)")
                    filled += chunk
                yield np.frombuffer(data, dtype=self.info.dtype).reshape(count, *self.info.shape[1:])

    def batches(self, batch_size: int, prefetch: int = 4) -> Iterator[np.ndarray]:
        """C-contiguous, writable batches in file order, read ahead on a background thread."""
        return _prefetch(self._read_batches(batch_size), prefetch)


def _prefetch(iterator: Iterator, depth: int) -> Iterator:
    """Run `iterator` on a background thread, at most `depth` items ahead of the consumer."""
    if depth <= 0:
        yield from iterator
        return
    items: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def offer(item) -> bool:
        while not stop.is_set():
            try:
                items.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def worker():
        try:
            for item in iterator:
                if not offer(item):
                    return
            offer(done)
        except BaseException as error:  # handed over to the consumer
            offer(error)

    thread = threading.Thread(target=worker, daemon=True)
    thread.start()
    try:
        while True:
            item = items.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


# ------------------------------------------------------------------------------------------------
# Checks


def validate_images(info: ImageArrayInfo, role: str) -> None:
    """The evaluator's input contract: uint8 RGB in [0, 255], NHWC [N, H, W, 3]."""
    shape, where = info.shape, f"{role} file {info.path}: {IMAGES_KEY} has shape {info.shape}, dtype {info.dtype}"
    if len(shape) == 3:
        raise ValueError(f"{where}: grayscale (or a single image)? Expected [N, H, W, 3] RGB; stack gray "
                         f"images to three channels with np.repeat(x[..., None], 3, axis=-1)")
    if len(shape) != 4:
        raise ValueError(f"{where}: expected a 4-D [N, H, W, 3] uint8 RGB array")
    if shape[-1] != 3:
        if shape[1] == 3:
            raise ValueError(f"{where}: this looks like NCHW; the evaluator reads NHWC [N, H, W, 3]: "
                             f"save x.transpose(0, 2, 3, 1)")
        if shape[-1] == 1:
            raise ValueError(f"{where}: grayscale images; expected 3 RGB channels: "
                             f"np.repeat(x, 3, axis=-1)")
        if shape[-1] == 4:
            raise ValueError(f"{where}: RGBA images; drop the alpha channel (x[..., :3]) and save RGB")
        raise ValueError(f"{where}: expected [N, H, W, 3] RGB")
    if info.dtype != np.uint8:
        hint = ("floats are not rescaled by the evaluator; convert [0, 1] images with "
                "np.clip(np.round(x * 255), 0, 255).astype(np.uint8)") if info.dtype.kind == "f" else \
               "convert with np.clip(x, 0, 255).astype(np.uint8)"
        raise ValueError(f"{where}: expected uint8 values in [0, 255]; {hint}")
    if shape[0] == 0:
        raise ValueError(f"{where}: no images")


def read_cached_statistics(path: str, role: str) -> tuple[FIDStatistics, FIDStatistics] | None:
    """(pool, spatial) statistics stored in the file (keys mu, sigma, mu_s, sigma_s), if it has `mu`.

    The reference evaluator uses them instead of the file's images for FID and sFID whenever `mu` is
    present, for the reference batch and the sample batch alike.
    """
    with np.load(path) as data:
        if "mu" not in data.files:
            return None
        missing = [k for k in STATISTICS_KEYS if k not in data.files]
        if missing:
            raise ValueError(f"{role} file {path} has mu but lacks {missing}: cached statistics need "
                             f"all of {list(STATISTICS_KEYS)} (remove mu to compute them from the images)")
        return FIDStatistics(data["mu"], data["sigma"]), FIDStatistics(data["mu_s"], data["sigma_s"])
