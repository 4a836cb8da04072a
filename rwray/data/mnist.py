"""Reader for MNIST in its original IDX files (optionally gzipped), as LeCun distributes them and torchvision keeps them.

IDX format (big-endian): 2 zero bytes, one type byte (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32, 0x0D float32,
0x0E float64), one byte with the number of dimensions n, then n uint32 sizes, then the values in row-major order.
MNIST: images are type 0x08 with 3 dimensions [N, 28, 28] (magic 0x00000803), labels 0x08 with 1 dimension [N]
(magic 0x00000801).

Files are looked up as ``<name>`` then ``<name>.gz``, first directly in ``root`` and then in ``root/MNIST/raw``
(torchvision's layout), so an extracted torchvision download and a folder of the four .gz files both work.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path
from typing import NamedTuple

import numpy as np

from rwray.errors import DataError

FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_IDX_TYPES = {0x08: np.dtype("u1"), 0x09: np.dtype("i1"), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
              0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


class MnistArrays(NamedTuple):
    train_images: np.ndarray  # [60000, 28, 28] uint8
    train_labels: np.ndarray  # [60000] int64
    test_images: np.ndarray  # [10000, 28, 28] uint8
    test_labels: np.ndarray  # [10000] int64


def parse_idx(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """The array stored in one IDX file's bytes (native byte order)."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_TYPES:
        raise DataError(f"{name}: not an IDX file (magic bytes {data[:4].hex() or 'missing'}; expected 0000TTNN with a "
                        f"known type byte TT). Fix: use the original MNIST files")
    dtype, ndim = _IDX_TYPES[data[2]], data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{name}: truncated IDX header ({len(data)} bytes for {ndim} dimensions)")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    count = int(np.prod(shape, dtype=np.int64))
    expected = header + count * dtype.itemsize
    if len(data) != expected:
        raise DataError(f"{name}: IDX header says shape {list(shape)} ({expected} bytes) but the file has {len(data)} "
                        "bytes; it is truncated or corrupt. Fix: re-download it")
    arr = np.frombuffer(data, dtype=dtype, count=count, offset=header).reshape(shape)
    return arr.astype(dtype.newbyteorder("="), copy=True)  # own the memory, native order


def find_file(root: Path, name: str) -> Path | None:
    for folder in (root, root / "MNIST" / "raw"):
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    return None


def read_idx(path: Path) -> np.ndarray:
    raw = path.read_bytes()
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise DataError(f"{path}: not a readable gzip file ({e}). Fix: re-download it") from e
    return parse_idx(raw, str(path))


def download(root: Path) -> None:
    """Fetch the four .gz files into root/MNIST/raw with torchvision's downloader (md5-checked). Needs network."""
    from urllib.error import URLError

    from torchvision.datasets import MNIST
    from torchvision.datasets.utils import download_and_extract_archive

    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    # The class's own mirrors and md5 sums, but not its constructor (which would also load the data its own way).
    for filename, md5 in MNIST.resources:
        errors = []
        for mirror in MNIST.mirrors:
            try:
                download_and_extract_archive(f"{mirror}{filename}", download_root=str(raw), filename=filename, md5=md5)
                break
            except (RuntimeError, URLError, OSError) as e:
                errors.append(f"{mirror}: {e}")
        else:
            raise DataError(f"could not download {filename}: " + "; ".join(errors))


def read_mnist(root: Path, download_missing: bool = False) -> MnistArrays:
    root = Path(root).expanduser()
    if download_missing and any(find_file(root, n) is None for n in FILES.values()):
        download(root)
    missing = [n for n in FILES.values() if find_file(root, n) is None]
    if missing:
        raise DataError(
            f"mnist: missing {', '.join(missing)} (or .gz) under {root} and {root / 'MNIST' / 'raw'}. Fix: put the "
            "four original MNIST IDX files there, or pass download=True (`--download`) on a machine with network access"
        )
    arrays = {k: read_idx(find_file(root, n)) for k, n in FILES.items()}  # type: ignore[arg-type]
    for split in ("train", "test"):
        x, y = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if x.dtype != np.uint8 or x.ndim != 3:
            raise DataError(f"mnist {split} images must be uint8 [N, H, W], got {x.dtype} {list(x.shape)}")
        if y.ndim != 1 or y.shape[0] != x.shape[0]:
            raise DataError(f"mnist {split}: {list(y.shape)} labels for {x.shape[0]} images")
        if y.size and (int(y.min()) < 0 or int(y.max()) > 9):
            raise DataError(f"mnist {split} labels span [{int(y.min())}, {int(y.max())}], outside [0, 9]")
    return MnistArrays(arrays["train_images"], arrays["train_labels"].astype(np.int64),
                       arrays["test_images"], arrays["test_labels"].astype(np.int64))
