"""The data layer: raw sources -> long-tailed / noisy splits -> deterministic Parquet shards + manifest.

    from rwray.data import SOURCES, BuilderParams, prepare, verify
    m = prepare(SOURCES["digits"].params(), Path("shards/digits-lt"), BuilderParams(imbalance="exp", factor=10))
    info = verify(m.dir).data_info()
"""


from rwray.data.longtail import longtail_counts, select_per_class
from rwray.data.noise import corrupt_labels
from rwray.data.shards import BuilderParams, Manifest, prepare, verify
from rwray.data.sources import SOURCES, RawData, SourceConfig
from rwray.errors import DataError

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
