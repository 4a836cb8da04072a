"""The data layer: raw sources -> long-tailed / noisy splits -> deterministic Parquet shards + manifest.

    from rwray.data import SOURCES, BuilderParams, prepare, verify
    m = prepare(SOURCES["digits"].params(), Path("shards/digits-lt"), BuilderParams(imbalance="exp", factor=10))
    info = verify(m.dir).data_info()
"""


class DataError(ValueError):
    """A problem with data on disk or data parameters; the message names the problem and how to fix it."""


# DataError is defined before the submodules are imported because they import it from here (the package object
# already holds it when they run, so there is no import cycle).
from rwray.data.longtail import longtail_counts, select_per_class  # noqa: E402
from rwray.data.noise import corrupt_labels  # noqa: E402
from rwray.data.sources import SOURCES, RawData, SourceConfig  # noqa: E402
from rwray.data.shards import BuilderParams, Manifest, prepare, verify  # noqa: E402

__all__ = [
    "DataError",
    "SOURCES",
    "SourceConfig",
    "RawData",
    "BuilderParams",
    "prepare",
    "verify",
    "Manifest",
    "longtail_counts",
    "select_per_class",
    "corrupt_labels",
]
