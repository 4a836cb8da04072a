"""The data layer: raw sources -> long-tailed / noisy splits -> deterministic Parquet shards + manifest.

    from rwray.data import SOURCES, BuilderParams, prepare, verify
    m = prepare(SOURCES["digits"].params(), Path("shards/digits-lt"), BuilderParams(imbalance="exp", factor=10))
    info = verify(m.dir).data_info()

One job per module: sources.py (raw arrays, the SOURCES registry; cifar.py, mnist.py, biased.py read and build
them), longtail.py and noise.py (pure numpy), splits.py (raw -> train/val/test), write.py (`prepare`: Parquet +
manifest), manifest.py (the format and its reader), checks.py (`verify`, and the class-count rule `prepare` applies
before writing), augment.py (batched tensor ops in the loop).
"""

from rwray.data.checks import verify
from rwray.data.manifest import Manifest
from rwray.data.sources import SOURCES, RawData
from rwray.data.splits import BuilderParams
from rwray.data.write import prepare

__all__ = ["SOURCES", "RawData", "BuilderParams", "prepare", "verify", "Manifest"]
