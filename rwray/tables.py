"""Score tables written with a run (per-sample scores and the like), in their file formats: Parquet and .npy.

Methods hand over plain arrays; this module alone knows the formats, as `rwray.plots` alone knows matplotlib.
A leaf: imports nothing from rwray.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def write_columns(path: str | Path, columns: Mapping[str, np.ndarray]) -> Path:
    """One Parquet table, a column per entry in order; each column's type is its array's dtype (int64 -> int64,
    float64 -> double). All arrays [N]."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({name: pa.array(values) for name, values in columns.items()}), path)
    return path


def write_table(path: str | Path, columns: Mapping[str, np.ndarray]) -> Path:
    """`write_columns` as Parquet, or as CSV when ``path`` ends in .csv (a header row, then one row per entry)."""
    path = Path(path)
    if path.suffix.lower() != ".csv":
        return write_columns(path, columns)
    import pyarrow.csv as pacsv

    path.parent.mkdir(parents=True, exist_ok=True)
    pacsv.write_csv(pa.table({name: pa.array(values) for name, values in columns.items()}), path)
    return path


def write_array(path: str | Path, array: np.ndarray) -> Path:
    """One array as .npy (np.save: dtype and shape kept)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, array)
    return path
