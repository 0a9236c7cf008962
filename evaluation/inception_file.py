"""Locating (and, when missing, downloading) the 2015 Inception GraphDef, classify_image_graph_def.pb.

One file serves both backends. Search order: an explicit path, else <cache dir>/classify_image_graph_def.pb
with the cache dir from the argument, $PTQ4ARVG_CACHE/inception, or ~/.cache/ptq4arvg/inception. A
missing file is downloaded from the reference evaluator's URL (to a .tmp file, renamed when complete);
its size and sha256 are recorded beside it on first use and checked on every later load.
"""
from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
from pathlib import Path

from tqdm.auto import tqdm

INCEPTION_URL = "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/classify_image_graph_def.pb"
INCEPTION_FILENAME = "classify_image_graph_def.pb"
CHUNK_BYTES = 1 << 20


def default_cache_dir() -> Path:
    root = os.environ.get("PTQ4ARVG_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "ptq4arvg") / "inception"


def inception_path(path: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None,
                   url: str = INCEPTION_URL, download: bool = True) -> Path:
    """The .pb to use: `path` if given (it must exist), else the cached file, downloaded if absent."""
    if path is not None:
        path = Path(path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"Inception graph {path} not found (download {url} and pass its path)")
        return path
    target = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    target = target / INCEPTION_FILENAME
    if target.is_file():
        return target
    if not download:
        raise FileNotFoundError(_missing_message(target, url, "downloads are disabled"))
    download_file(url, target)
    return target


def _missing_message(target: Path, url: str, reason: str) -> str:
    return (f"the Inception graph {INCEPTION_FILENAME} is not in {target.parent} and could not be "
            f"downloaded ({reason}). On a machine with network access download {url} and copy it to "
            f"{target}, or pass its location with --inception PATH (or set PTQ4ARVG_CACHE).")


def download_file(url: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {INCEPTION_FILENAME}") as bar:
                while chunk := response.read(CHUNK_BYTES):
                    out.write(chunk)
                    bar.update(len(chunk))
        if total is not None and tmp.stat().st_size != total:
            raise OSError(f"incomplete download: {tmp.stat().st_size} of {total} bytes")
    except (urllib.error.URLError, OSError, TimeoutError) as error:
        tmp.unlink(missing_ok=True)
        raise FileNotFoundError(_missing_message(target, url, str(error))) from error
    os.replace(tmp, target)


def _checksum_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def read_graph_bytes(path: Path) -> bytes:
    """The file's bytes, checked against (or recorded as) its size and sha256 beside it."""
    data = Path(path).read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    record = _checksum_path(Path(path))
    if record.is_file():
        expected = record.read_text().split()
        if expected and expected[0] != digest:
            raise ValueError(f"{path} has sha256 {digest} but {record} records {expected[0]}: the file "
                             f"changed or is corrupt; delete both to download it again")
    else:
        try:
            record.write_text(f"{digest}  {len(data)} bytes\n")
        except OSError:  # a read-only location: nothing to record
            pass
    return data
