"""A trained model on any shard directory with its classes: `rwray evaluate` (the metrics table, logged as a new MLflow
run linked to the source) and `rwray predict` (per-sample class and probabilities, to Parquet).

A source is a checkpoint folder, a run id, or a ``runs:/`` / ``models:/`` URI of the model a run logged
(`rwray.tracking.model`). Every source becomes the same thing: a module mapping uint8 images [N, C, H, W] to class
probabilities [N, K] (`rwray.train.export.Probabilities`), its class list, the class counts of its training split
(many / medium / few-shot groups are the training data's), and, for encoded images, the evaluation crop.

Small splits are scored in this process; large ones (or ``ray=True``) with Ray Data, one model per actor
(`map_batches` over the Parquet shards). Both count the same confusion matrix.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from rwray.data import Manifest
from rwray.errors import DataError, RwrayError, SourceError
from rwray.metrics import CLASS_METRICS_MAX, Confusion, bias_cell_counts, class_columns, per_class_accuracy, split_metrics

RUN_ID = re.compile(r"[0-9a-f]{32}")
RAY_BYTES = 1 << 30  # a split whose shards exceed this is scored on Ray (when Ray is not forced either way)


@dataclass
class Model:
    """What scoring needs from any source."""

    load: Callable[[], torch.nn.Module]  # the probabilities module (built again in each Ray actor)
    classes: list[str]
    class_counts: list[int]  # training split's, per class
    input_shape: tuple[int, int, int]  # (C, H, W) of the images it takes
    crop: tuple[int, int] | None  # encoded images: (crop_size, eval_resize) of the evaluation crop
    source: str  # as given
    run_id: str | None  # the run that trained it, when known
    tracking_uri: str | None = None


def load_source(source: str, tracking_uri: str | None) -> Model:
    """A checkpoint folder, a run id, or a runs:/ / models:/ URI -> `Model`; anything else a `SourceError`."""
    folder = Path(source)
    if folder.is_dir():
        return _from_checkpoint(folder, source)
    if RUN_ID.fullmatch(source):
        source = f"runs:/{source}/model"
    if source.startswith(("runs:/", "models:/")):
        return _from_mlflow(source, tracking_uri)
    raise SourceError(f"{source!r} is neither a checkpoint folder, a run id (32 hex digits), nor a runs:/ or models:/ "
                      f"URI of a model rwray logged")


def _from_checkpoint(folder: Path, source: str) -> Model:
    from rwray import config as C
    from rwray.train import checkpoint
    from rwray.train.export import selected_network

    if not (folder / checkpoint.STATE).is_file():
        raise SourceError(f"{folder} is not an rwray checkpoint (no {checkpoint.STATE}): give a checkpoint_* folder "
                          f"under a run's output_dir/ray, a run id, or a runs:/ or models:/ URI")
    state = checkpoint.load(folder)  # CheckpointError for a state.pt rwray did not write
    missing = [k for k in ("model", "best") if not isinstance(state, dict) or k not in state]
    if missing or not (folder / checkpoint.CONFIG).is_file():
        raise SourceError(f"{folder} is not an rwray checkpoint (no {' / '.join(missing) or checkpoint.CONFIG})")
    try:
        cfg = C.load(folder / checkpoint.CONFIG)
    except RwrayError as e:
        raise SourceError(f"{folder / checkpoint.CONFIG} is not an rwray job: {e}") from None
    try:
        manifest = Manifest.load(cfg.data.dir)
    except (FileNotFoundError, RwrayError):
        raise SourceError(f"{folder} was trained on {cfg.data.dir}, which is not here: its class names and "
                          f"normalisation live in that manifest. Evaluate the model the run logged instead "
                          f"(rwray evaluate runs:/<run id>/model)") from None
    info = manifest.data_info(cfg.data.crop_size)
    return Model(lambda: selected_network(cfg, manifest, state), manifest.classes, manifest.class_counts("train"),
                 info.image_shape, (cfg.data.crop_size, cfg.data.eval_resize) if manifest.encoded else None, source,
                 None)


def _from_mlflow(uri: str, tracking_uri: str | None) -> Model:
    import mlflow
    from mlflow.exceptions import MlflowException

    from rwray.tracking.model import fluent_uri

    resolved = tracking_uri or mlflow.get_tracking_uri()
    with fluent_uri(resolved):
        try:
            info = mlflow.models.get_model_info(uri)
        except (MlflowException, OSError) as e:
            raise SourceError(f"no model at {uri} in {resolved}: {str(e).splitlines()[0][:300]}") from None
    meta = (info.metadata or {}).get("rwray") or {}  # `rwray.train.export.describe`, logged by the driver
    if "classes" not in meta or "input" not in meta:
        raise SourceError(f"{uri} is not a model rwray logged (its MLmodel has no rwray metadata)")
    shape = tuple(meta["input"]["shape"][1:])
    crop = tuple(meta["eval_crop"]) if meta.get("eval_crop") else None

    def load() -> torch.nn.Module:
        import mlflow.pytorch

        with fluent_uri(resolved):
            return mlflow.pytorch.load_model(uri)

    return Model(load, list(meta["classes"]), list(meta.get("class_counts") or []), shape, crop, uri, info.run_id,
                 resolved)


def check_data(model: Model, manifest: Manifest, split: str) -> None:
    """The shard directory holds ``split`` with the model's classes and image shape: refused otherwise, with what
    differs."""
    from rwray.text import plural, some

    problems = []
    splits = ["train", *manifest.eval_splits]
    if split not in splits:
        problems.append(f"no split {split!r} (it has {', '.join(splits)})")
    if manifest.classes != model.classes:
        # positions where both lists have a name and the names differ: the first few, and how many (8,142 at most)
        diff = [f"{i}: {a!r} vs {b!r}" for i, (a, b) in enumerate(zip(model.classes, manifest.classes)) if a != b]
        problems.append(f"another class list: the model's {len(model.classes)} classes against the data's "
                        f"{len(manifest.classes)}" + (f" ({plural(len(diff), 'position')} "
                                                      f"{'differs' if len(diff) == 1 else 'differ'}; first differences "
                                                      f"{some(diff, 3, '; ')})" if diff else ""))
    shape = (3, *model.input_shape[1:]) if manifest.encoded else tuple(manifest.image_shape)
    if manifest.encoded != (model.crop is not None) or shape != tuple(model.input_shape):
        problems.append(f"images of shape {list(shape)} ({'encoded' if manifest.encoded else 'arrays'}), and the "
                        f"model takes {list(model.input_shape)} ({'encoded' if model.crop else 'arrays'})")
    if problems:
        raise DataError(f"{manifest.dir} does not fit {model.source}: " + "; ".join(problems))


# ------------------------------------------------------------------------------------------------ scoring


def image_reader(manifest: Manifest, crop: tuple[int, int] | None) -> Callable[[Any], np.ndarray]:
    """A function from an Arrow table of shard rows to the model's input, [n, C, H, W] uint8 (encoded images: the
    evaluation crop, by one decoder built here for every table it reads)."""
    from rwray.train.batches import column_values

    if manifest.encoded:
        from rwray.data.decode import Decoder, ImageTransform

        decode = Decoder(ImageTransform(crop[0], crop[1], "none"), train=False)
        return lambda table: decode(table.column("image").to_pylist(), column_values(table.column("index")), 0, 0)
    # arrays: [n, C*H*W] rows
    return lambda table: np.ascontiguousarray(column_values(table.column("image"))).reshape(
        table.num_rows, *manifest.image_shape)


def kept_columns(table) -> list[str]:
    """The columns a scored row keeps: all but the image (index, label and the extra columns)."""
    return [c for c in table.column_names if c != "image"]


def score_rows(module: torch.nn.Module, images: np.ndarray, batch_size: int) -> np.ndarray:
    """uint8 [n, C, H, W] -> float32 probabilities [n, K], ``batch_size`` images at a time, no gradient."""
    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            out.append(module(torch.from_numpy(np.array(images[i:i + batch_size]))).float().numpy())  # a writable copy
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def on_ray(manifest: Manifest, split: str, ray: bool | None) -> bool:
    """Whether a split is scored by Ray Data actors: as asked, else when its shards exceed RAY_BYTES."""
    import os

    return ray if ray is not None else sum(os.path.getsize(p) for p in manifest.shard_paths(split)) > RAY_BYTES


def scored(model: Model, manifest: Manifest, split: str, batch_size: int, ray: bool | None
           ) -> Iterator[dict[str, np.ndarray]]:
    """The split's rows with their probabilities: dicts of ``index`` [n], ``label`` [n], ``probs`` [n, K] and the
    extra columns, in the process or on Ray Data."""
    paths = manifest.shard_paths(split)
    if on_ray(manifest, split, ray):
        yield from _scored_on_ray(model, manifest, paths, batch_size)
        return
    import pyarrow.parquet as pq

    from rwray.train.batches import column_values

    module, images = model.load(), image_reader(manifest, model.crop)
    for p in paths:
        f = pq.ParquetFile(p)
        for g in range(f.num_row_groups):
            table = f.read_row_group(g)
            yield {**{c: column_values(table.column(c)) for c in kept_columns(table)},
                   "probs": score_rows(module, images(table), batch_size)}


class _Scorer:
    """One Ray Data actor: the model loaded once, then batches of shard rows -> rows with probabilities."""

    def __init__(self, model: Model, manifest_dir: str, batch_size: int):
        self.model, self.batch_size = model, batch_size
        self.module, self.images = model.load(), image_reader(Manifest.load(manifest_dir), model.crop)

    def __call__(self, table):
        import pyarrow as pa

        probs = score_rows(self.module, self.images(table), self.batch_size)
        cols = {c: table.column(c) for c in kept_columns(table)}
        k = probs.shape[1] if probs.size else len(self.model.classes)
        cols["probs"] = pa.FixedSizeListArray.from_arrays(pa.array(probs.reshape(-1), pa.float32()), k)
        return pa.table(cols)


def _scored_on_ray(model: Model, manifest: Manifest, paths: list[str], batch_size: int
                   ) -> Iterator[dict[str, np.ndarray]]:
    import ray

    from rwray.train.batches import column_values

    ds = ray.data.read_parquet(paths).map_batches(
        _Scorer, fn_constructor_args=(model, str(manifest.dir), batch_size), batch_format="pyarrow",
        batch_size=max(batch_size, 256), concurrency=(1, max(1, int(ray.available_resources().get("CPU", 1)) - 1)))
    for table in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        yield {c: column_values(table.column(c)) for c in table.column_names}


# ------------------------------------------------------------------------------------------------ evaluate / predict


@dataclass
class Counts:
    """What scoring a split counted."""

    confusion: Confusion  # (true, predicted) pairs, sparse: O(N + K)
    cells: torch.Tensor | None  # [2, K, K] (correct, total) per (class, bias) cell, for data with a ``bias`` column


def count(model: Model, manifest: Manifest, split: str, batch_size: int = 512, ray: bool | None = None) -> Counts:
    """Score the split and count its (true, predicted) pairs (and bias cells where the data has them)."""
    k = len(model.classes)
    ids: list[torch.Tensor] = []  # per row group [n] true * K + predicted
    has_bias = "bias" in manifest.extra_columns
    cells = torch.zeros(2, k, k, dtype=torch.int64) if has_bias else None
    for rows in scored(model, manifest, split, batch_size, ray):
        preds = torch.from_numpy(np.array(rows["probs"])).argmax(1)
        y = torch.from_numpy(np.array(rows["label"])).long()
        ids.append(y * k + preds)
        if cells is not None:
            cells += bias_cell_counts(preds, y, torch.from_numpy(np.array(rows["bias"])).long(), k, k)
    flat = torch.cat(ids) if ids else torch.zeros(0, dtype=torch.int64)
    return Counts(Confusion.from_ids(flat, torch.ones_like(flat), k), cells)


def metrics_of(model: Model, manifest: Manifest, split: str, counts: Counts) -> dict[str, float]:
    """The split's metrics, as a training run logs them for its eval splits (`rwray.metrics.split_metrics`): top-1,
    balanced, many / medium / few-shot by the model's training counts, macro F1, worst class, per class (up to
    CLASS_METRICS_MAX classes), and the (class, bias) cells where the data has a ``bias`` column."""
    train_counts = model.class_counts or manifest.class_counts("train")
    return split_metrics(split, counts.confusion, counts.cells, train_counts)


def evaluate(model: Model, manifest: Manifest, split: str, batch_size: int = 512, ray: bool | None = None
             ) -> dict[str, float]:
    """`count` then `metrics_of`."""
    return metrics_of(model, manifest, split, count(model, manifest, split, batch_size, ray))


def class_table(model: Model, manifest: Manifest, split: str, counts: Counts) -> dict[str, np.ndarray]:
    """The per-class table of a scored split: class, name, training count, and the split's support, correct,
    predicted and accuracy, [K] each (the columns a training run's per-class tables have)."""
    k = len(model.classes)
    train_counts = model.class_counts or manifest.class_counts("train")
    return {"class": np.arange(k, dtype=np.int64), "name": np.asarray(model.classes, dtype=object),
            "train_count": np.asarray(train_counts, dtype=np.int64), **class_columns({split: counts.confusion})}


def predict(model: Model, manifest: Manifest, split: str, out: Path, batch_size: int = 512,
            ray: bool | None = None, top: int | None = None) -> int:
    """Per-sample ``index``, ``label``, ``pred`` and ``probs`` [K] of the split, written to ``out`` (Parquet; in
    place only once complete). With ``top``, the ``top`` most probable classes and their probabilities
    (``top_classes``, ``top_probs`` [top], most probable first) instead of all K: at iNaturalist's K = 8,142 the
    full ``probs`` column is 32 KB a row. -> rows written."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial")
    n, k, writer = 0, len(model.classes), None
    try:
        for rows in scored(model, manifest, split, batch_size, ray):
            probs = np.asarray(rows["probs"], dtype=np.float32).reshape(-1, k)
            cols = {"index": pa.array(np.asarray(rows["index"]), pa.int64()),
                    "label": pa.array(np.asarray(rows["label"]), pa.int64()),
                    "pred": pa.array(probs.argmax(1), pa.int64())}
            if top is None:
                cols["probs"] = pa.FixedSizeListArray.from_arrays(pa.array(probs.reshape(-1)), k)
            else:
                best = torch.from_numpy(probs).topk(min(top, k), dim=1)  # values, indices: [n, top] each
                cols["top_classes"] = pa.FixedSizeListArray.from_arrays(
                    pa.array(best.indices.reshape(-1).numpy(), pa.int64()), best.indices.shape[1])
                cols["top_probs"] = pa.FixedSizeListArray.from_arrays(pa.array(best.values.reshape(-1).numpy()),
                                                                      best.values.shape[1])
            table = pa.table(cols)
            writer = writer or pq.ParquetWriter(tmp, table.schema)
            writer.write_table(table)
            n += len(probs)
        if writer is None:
            raise DataError(f"split {split!r} of {manifest.dir} has no rows")
        writer.close()
        tmp.replace(out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return n


WORST_SHOWN = 10  # classes listed on the terminal when there are more than CLASS_METRICS_MAX


def table_rows(metrics: dict[str, float], split: str, classes: list[str], confusion: Confusion | None = None
               ) -> list[tuple[str, str]]:
    """The metrics as (name, value %) rows for the terminal: summary first, then the classes by name (up to
    CLASS_METRICS_MAX classes), or else the WORST_SHOWN worst classes of the split with their support (the whole
    table is a file: `class_table`)."""
    from rwray.metrics import SUMMARY_KEYS, WORST_CLASS
    from rwray.text import plural

    rows: list[tuple[str, str]] = []
    for key in (*SUMMARY_KEYS, "macro_f1", WORST_CLASS, "bias/cell_mean_acc", "bias/worst_cell_acc"):
        v = metrics.get(f"{split}/{key}")
        if v is not None and not np.isnan(v):
            rows.append((key, f"{100 * v:.2f}"))
    if len(classes) <= CLASS_METRICS_MAX or confusion is None:
        for c, name in enumerate(classes):
            v = metrics.get(f"{split}/class_acc/{c}")
            if v is not None:
                rows.append((f"class {c} ({name})", f"{100 * v:.2f}"))
        return rows
    acc = per_class_accuracy(confusion).tolist()
    support = confusion.per_class()[1].tolist()
    present = [c for c in range(len(classes)) if support[c] > 0]
    worst = sorted(present, key=lambda c: (acc[c], -support[c], c))[:WORST_SHOWN]
    rows.append((f"{len(present)} of {len(classes)} classes in the split; the worst {len(worst)}:", ""))
    rows += [(f"class {c} ({classes[c]}), {plural(support[c], 'image')}", f"{100 * acc[c]:.2f}") for c in worst]
    return rows
