"""A run's dataset inputs: every split of the shard directory (train, val, test and any extra test set) as an MLflow
dataset, so runs can be searched and compared by the exact data they saw.

Digest: the data manifest's sha256 (the manifest lists every shard's checksum, so it changes with any byte of the
data), cut to the 36 characters MLflow stores; the full hash is in the profile and in the run's tag
``rwray.data_manifest_sha256``. Source: the shard directory. Profile: the split's size and class counts.
"""

from __future__ import annotations

import json
import random
import time
from typing import Any

from rwray.data import Manifest
from rwray.tracking.transport import client

DIGEST_CHARS = 36  # MLflow's limit on a dataset digest (mlflow.utils.validation.MAX_DATASET_DIGEST_SIZE)


def digest(manifest: Manifest) -> str:
    return manifest.sha256[:DIGEST_CHARS]


def split_dataset(manifest: Manifest, split: str):
    """One split as an `mlflow.data.Dataset` with the manifest's digest, the shard directory as its source and the
    class counts in its profile."""
    from mlflow.data.dataset import Dataset
    from mlflow.data.sources import LocalArtifactDatasetSource

    class ShardSplit(Dataset):
        """MLflow's dataset classes compute a digest from the data they hold; a shard split is not loaded here, and
        its identity is the manifest's hash, so this one takes digest and profile as given."""

        def __init__(self, profile: dict[str, Any], **kw):
            self._profile = profile
            super().__init__(**kw)

        def _compute_digest(self) -> str:  # never called: the digest is always given
            return digest(manifest)

        @property
        def profile(self) -> dict[str, Any]:
            return self._profile

        @property
        def schema(self) -> None:
            return None

        def to_dict(self) -> dict[str, str]:
            return {**super().to_dict(), "profile": json.dumps(self._profile)}

    profile = {"split": split, "num_samples": manifest.num_samples(split), "num_classes": manifest.num_classes,
               "class_counts": manifest.class_counts(split),  # [K]: entry k is the manifest's class k
               "image_shape": list(manifest.image_shape), "encoding": manifest.data.get("encoding", "raw"),
               "manifest_sha256": manifest.sha256}
    return ShardSplit(profile, source=LocalArtifactDatasetSource(str(manifest.dir)),
                      name=f"{manifest.dir.name}/{split}", digest=digest(manifest))


def log_datasets(uri: str, run_id: str, manifest: Manifest, attempts: int = 5) -> None:
    """Log every split as an input of the run, its context the split's name. Idempotent: MLflow keeps one dataset
    per (experiment, name, digest) and one input per (dataset, run), so a continued run logs nothing twice.

    Not atomic in MLflow's store, though: two runs of one experiment logging the same new dataset at once (a
    sweep's concurrent trials) can both find it missing and one insert fails on the unique key. Another attempt
    finds it there and only links it, so failures are retried with a short, jittered backoff."""
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    inputs = [DatasetInput(split_dataset(manifest, s)._to_mlflow_entity(), [InputTag(MLFLOW_DATASET_CONTEXT, s)])
              for s in ("train", *manifest.eval_splits)]
    c = client(uri)
    for attempt in range(attempts):
        try:
            c.log_inputs(run_id, datasets=inputs)
            return
        except Exception:  # noqa: BLE001 - the race above, or a transient store error: the last one is raised
            if attempt == attempts - 1:
                raise
            time.sleep((0.2 + random.random() * 0.3) * (attempt + 1))
