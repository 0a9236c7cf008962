"""PNG grid preview of sampled images."""
import math
from pathlib import Path

import numpy as np
from PIL import Image


def save_grid(images_NHWC: np.ndarray, path: Path, ncols: int = 0, pad: int = 2) -> Path:
    """Tile uint8 images (N, H, W, 3) into one PNG, `ncols` per row (default: a near-square grid)."""
    images = np.asarray(images_NHWC)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f'expected uint8 images (N, H, W, 3), got {images.dtype} {images.shape}')
    n, h, w, _ = images.shape
    ncols = ncols or math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncols)
    grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for i in range(n):
        r, c = divmod(i, ncols)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + c * (w + pad):pad + c * (w + pad) + w] = images[i]
    Image.fromarray(grid).save(path)
    return Path(path)
