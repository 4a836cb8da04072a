"""Reader for CIFAR-10 / CIFAR-100 in the "python version" on-disk format that torchvision extracts.

Layout under ``root``:
  cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}   keys: data, labels / label_names
  cifar-100-python/{train, test, meta}                              keys: data, fine_labels / fine_label_names

Each batch is a pickled dict whose ``data`` is a (N, 3072) uint8 array: 1024 red, then 1024 green, then 1024 blue
values per row, each plane row-major 32x32, so a plain reshape gives [N, 3, 32, 32] (CHW) without transposing.

The files are pickles, and unpickling runs whatever callables a pickle names. So they are read with a restricted
unpickler that resolves only the handful of globals a numpy-array-in-a-dict needs and refuses everything else.
"""

from __future__ import annotations

import builtins
import io
import pickle
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np

from rwray.errors import DataError

Variant = Literal["cifar10", "cifar100"]


class CifarArrays(NamedTuple):
    train_images: np.ndarray  # [50000, 3, 32, 32] uint8
    train_labels: np.ndarray  # [50000] int64
    test_images: np.ndarray  # [10000, 3, 32, 32] uint8
    test_labels: np.ndarray  # [10000] int64
    classes: list[str]


# (folder, train files, test file, meta file, label key, names key) per variant, as torchvision lays them out.
_LAYOUT: dict[str, tuple[str, list[str], str, str, str, str]] = {
    "cifar10": (
        "cifar-10-batches-py",
        [f"data_batch_{i}" for i in range(1, 6)],
        "test_batch",
        "batches.meta",
        "labels",
        "label_names",
    ),
    "cifar100": ("cifar-100-python", ["train"], "test", "meta", "fine_labels", "fine_label_names"),
}


# ---------------------------------------------------------------------------------------------- restricted unpickler


class ForbiddenGlobal(pickle.UnpicklingError):
    """A pickle names a callable outside the allow-list: the file is not a CIFAR batch (or is malicious)."""


def _numpy_global(modules: tuple[str, ...], name: str) -> Any:
    """Resolve a numpy internal from its numpy-2 home, falling back to its numpy-1 one."""
    import importlib

    for mod in modules:
        try:
            return getattr(importlib.import_module(mod), name)
        except (ImportError, AttributeError):
            continue
    raise pickle.UnpicklingError(f"numpy has no {name} in {modules}")


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """Stand-in for ``_codecs.encode``: Python 3 writes ``bytes`` at pickle protocols 0-2 as
    ``_codecs.encode(str, "latin1")``. Only that exact use is allowed, nothing else the codec machinery can do."""
    if not isinstance(text, str) or encoding.replace("-", "").replace("_", "").lower() != "latin1":
        raise ForbiddenGlobal(f"refusing _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


_CORE = ("numpy._core.multiarray", "numpy.core.multiarray")
_NUMERIC = ("numpy._core.numeric", "numpy.core.numeric")

# (module, name) a CIFAR pickle may reference -> a thunk giving the object. The original files (Python 2, numpy 1)
# name numpy.core.multiarray._reconstruct; files re-pickled by numpy 2 name numpy._core.*, and at protocol 5
# numpy uses _frombuffer instead of _reconstruct. Containers (dict, list, tuple, str, int, bytes) are pickle
# opcodes and need no global at all; set/frozenset/bytearray do.
_ALLOWED: dict[tuple[str, str], Any] = {
    **{(m, "_reconstruct"): lambda: _numpy_global(_CORE, "_reconstruct") for m in _CORE},
    **{(m, "_frombuffer"): lambda: _numpy_global(_NUMERIC, "_frombuffer") for m in _NUMERIC},
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    ("_codecs", "encode"): lambda: _latin1_encode,
    **{
        (m, n): (lambda n=n: getattr(builtins, n))
        for m in ("builtins", "__builtin__")  # Python 3 / Python 2 module name
        for n in ("set", "frozenset", "bytearray")
    },
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only; any other global (os.system, eval, ...) raises."""

    def find_class(self, module: str, name: str) -> Any:
        thunk = _ALLOWED.get((module, name))
        if thunk is None:
            raise ForbiddenGlobal(
                f"refusing to unpickle global {module}.{name}: CIFAR files contain only dicts, lists and numpy arrays"
            )
        return thunk()


def restricted_loads(data: bytes) -> Any:
    # latin1 is what Python 2 numpy pickles need (their str payloads are raw bytes); torchvision uses it too.
    return RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()


def _load_dict(path: Path) -> dict[str, Any]:
    """A CIFAR pickle as a dict with str keys (Python 2 files give str keys under latin1, re-pickled ones bytes)."""
    try:
        obj = restricted_loads(path.read_bytes())
    except ForbiddenGlobal as e:
        raise DataError(f"{path}: {e}. Fix: replace it with the file from the official CIFAR archive.") from e
    except Exception as e:  # truncated or not a pickle at all
        raise DataError(
            f"{path}: not a readable CIFAR pickle ({type(e).__name__}: {e}). "
            "Fix: re-extract the official CIFAR archive there."
        ) from e
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a pickled dict, got {type(obj).__name__}")
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}


def _key(d: dict[str, Any], key: str, path: Path) -> Any:
    if key not in d:
        raise DataError(f"{path}: missing key {key!r} (has {sorted(d)}); is this the right CIFAR variant?")
    return d[key]


def _read_batch(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    d = _load_dict(path)
    data = np.asarray(_key(d, "data", path))
    labels = np.asarray(_key(d, label_key, path), dtype=np.int64)  # stored as a list of ints
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{path}: 'data' must be (N, 3072) uint8, got {data.shape} {data.dtype}")
    if labels.shape != (data.shape[0],):
        raise DataError(f"{path}: {labels.shape[0]} labels for {data.shape[0]} images")
    # (N, 3072) with R, G, B planes in order -> [N, 3, 32, 32]; contiguous copy so callers own the memory.
    return np.ascontiguousarray(data.reshape(-1, 3, 32, 32)), labels


# ------------------------------------------------------------------------------------------------------------ reader


def required_files(root: Path, variant: Variant) -> list[Path]:
    folder, train, test, meta, _, _ = _LAYOUT[variant]
    return [root / folder / f for f in [*train, test, meta]]


def check_present(root: Path, variant: Variant) -> None:
    """Raise DataError naming exactly what is missing under ``root`` and how to get it."""
    folder = _LAYOUT[variant][0]
    archive = {"cifar10": "cifar-10-python.tar.gz", "cifar100": "cifar-100-python.tar.gz"}[variant]
    fix = (
        f"Fix: extract the official {archive} into {root} (so that {root / folder} holds "
        f"{', '.join(p.name for p in required_files(root, variant))}), "
        f"or pass download=True (`--download` on the command line) on a machine with network access."
    )
    if not (root / folder).is_dir():
        raise DataError(f"{variant}: directory {folder}/ is missing under root {root}. {fix}")
    missing = [p for p in required_files(root, variant) if not p.is_file()]
    if missing:
        names = ", ".join(p.name for p in missing)
        raise DataError(f"{variant}: missing file(s) {names} in {root / folder} (root {root}). {fix}")


def download(root: Path, variant: Variant) -> None:
    """Fetch and extract the official archive with torchvision's downloader (md5-checked). Needs network."""
    from torchvision.datasets import CIFAR10, CIFAR100
    from torchvision.datasets.utils import download_and_extract_archive

    # Use the dataset class's own URL / md5 but not its constructor: the constructor would also unpickle the whole
    # dataset with plain pickle, which is exactly what this module avoids. The files are read by read_cifar below.
    cls = CIFAR10 if variant == "cifar10" else CIFAR100
    download_and_extract_archive(cls.url, str(root), filename=cls.filename, md5=cls.tgz_md5)


def read_cifar(root: Path, variant: Variant, download_missing: bool = False) -> CifarArrays:
    root = Path(root).expanduser()
    folder, train_files, test_file, meta_file, label_key, names_key = _LAYOUT[variant]
    if download_missing and any(not p.is_file() for p in required_files(root, variant)):
        root.mkdir(parents=True, exist_ok=True)
        download(root, variant)
    check_present(root, variant)
    base = root / folder
    parts = [_read_batch(base / f, label_key) for f in train_files]
    train_x = np.concatenate([p[0] for p in parts])  # [50000, 3, 32, 32]
    train_y = np.concatenate([p[1] for p in parts])  # [50000]
    test_x, test_y = _read_batch(base / test_file, label_key)
    meta = _load_dict(base / meta_file)
    classes = [n.decode("latin1") if isinstance(n, bytes) else str(n) for n in _key(meta, names_key, base / meta_file)]
    for split, y in (("train", train_y), ("test", test_y)):
        if y.size and (y.min() < 0 or y.max() >= len(classes)):
            raise DataError(
                f"{base}: {split} labels span [{y.min()}, {y.max()}] but the meta file names {len(classes)} classes"
            )
    return CifarArrays(train_x, train_y, test_x, test_y, classes)
