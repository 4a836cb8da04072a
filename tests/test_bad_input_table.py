"""Bad input, as a table: each row is one bad input, the error type, and fragments of the message that must name
the problem AND the fix. Every row also checks that nothing was written (the folder tree is the same before and
after). No row starts Ray: every check runs on the driver before compute (runtime rows call the loop's torch code
directly). The rows land in docs/reliability.md.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import pathlib
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from conftest import free_port
from reliability_report import Recorder
from rwray import config as C
from rwray.errors import (BatchTooLarge, ClusterUnreachable, DataError, NonFiniteLoss, NotACheckpoint, RunInUse,
                          TrackingError)
from rwray.datainfo import DataInfo
from rwray.methods import METHODS
from rwray.methods.erm import ERMParams
from rwray.paths import PathError
from rwray.train import checkpoint
from rwray.train.batches import Batch
from rwray.train.epoch import evaluate, train_epoch
from rwray.train.identity import RunLock

RECORD = Recorder("test_bad_input_table")


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    RECORD.write()


# ----------------------------------------------------------------------------------------------------------- inputs


def base(ctx) -> dict[str, Any]:
    return {"name": "t", "output_dir": str(ctx.tmp / "runs"), "data": {"dir": str(ctx.digits), "batch_size": 16},
            "model": {"name": "small_cnn", "width": 8}, "optim": {"lr": 0.05}, "train": {"epochs": 1},
            "scaling": {"num_workers": 1}, "tracking": {"experiment": "bad"}}


def with_(raw: dict, **changes) -> dict:
    """raw with dotted-path changes applied (None deletes)."""
    raw = json.loads(json.dumps(raw))
    for path, value in changes.items():
        node = raw
        keys = path.split("__")
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        if value is None:
            node.pop(keys[-1], None)
        else:
            node[keys[-1]] = value
    return raw


def validate(**changes):
    return lambda ctx: (lambda: C.validate(with_(base(ctx), **changes)))


def train(mutate: Callable[[Any], dict] | None = None, **changes):
    """A driver-side run(): mutate(ctx) may prepare files (before the snapshot) and return more changes."""
    def make(ctx):
        extra = mutate(ctx) if mutate else {}
        cfg = C.validate(with_(base(ctx), **{**changes, **(extra or {})}))

        def go():
            from rwray.train.launch import run

            return run(cfg)
        return go
    return make


def shards(ctx) -> Path:
    d = ctx.tmp / "shards"
    if not d.exists():
        shutil.copytree(ctx.digits, d)
    return d


def first_shard(d: Path, split: str = "train") -> Path:
    return sorted(d.glob(f"{split}-*.parquet"))[0]


def edit_manifest(d: Path, fn: Callable[[dict], None]) -> None:
    m = json.loads((d / "manifest.json").read_text())
    fn(m)
    (d / "manifest.json").write_text(json.dumps(m, indent=2, sort_keys=True))


def rehash(d: Path, shard: Path) -> None:
    """Keep the manifest's checksum in step with an edited shard, so the check under test is the one that fires."""
    digest = hashlib.sha256(shard.read_bytes()).hexdigest()

    def fix(m):
        for split in m["splits"].values():
            for s in split["shards"]:
                if s["file"] == shard.name:
                    s["sha256"] = digest
    edit_manifest(d, fix)


def data(fn: Callable[[Path, Any], None]):
    def mutate(ctx):
        d = shards(ctx)
        fn(d, ctx)
        return {"data__dir": str(d)}
    return train(mutate)


def _truncate(d, ctx):
    s = first_shard(d)
    s.write_bytes(s.read_bytes()[: s.stat().st_size // 2])
    rehash(d, s)


def _flip_byte(d, ctx):
    s = first_shard(d)
    b = bytearray(s.read_bytes())
    b[len(b) // 2] ^= 0xFF
    s.write_bytes(bytes(b))


def _labels(value):
    def fn(d, ctx):
        s = first_shard(d)
        t = pq.read_table(s)
        labels = t.column("label").to_pylist()
        labels[0] = value
        t = t.set_column(t.schema.get_field_index("label"), pa.field("label", pa.int64(), nullable=False),
                         pa.array(labels, pa.int64()))
        pq.write_table(t, s)
        rehash(d, s)
    return fn


def _drop_index_column(d, ctx):
    s = first_shard(d)
    pq.write_table(pq.read_table(s).drop_columns(["index"]), s)
    rehash(d, s)


def _zero_class(d, ctx):
    edit_manifest(d, lambda m: m["splits"]["train"]["class_counts"].__setitem__(3, 0))


def _wrong_shape(d, ctx):
    edit_manifest(d, lambda m: m.__setitem__("image_shape", [1, 9, 9]))


def _no_val(d, ctx):
    edit_manifest(d, lambda m: m["splits"]["val"].__setitem__("num_samples", 0))


def _symlink_out(d, ctx):
    s = first_shard(d)
    outside = ctx.tmp / "elsewhere.parquet"
    shutil.move(s, outside)
    s.symlink_to(outside)


def _dotdot_entry(d, ctx):
    s = first_shard(d)
    shutil.move(s, d.parent / s.name)

    def fn(m):
        m["splits"]["train"]["shards"][0]["file"] = f"../{s.name}"
    edit_manifest(d, fn)


class Evil:
    """Would create a file when unpickled; weights_only loading must refuse it before it runs."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def evil_checkpoint(folder: Path, marker: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"model": {}, "epoch": 0, "payload": Evil(marker)}, folder / checkpoint.STATE)
    return folder


def _resume_evil(ctx):
    d = evil_checkpoint(ctx.tmp / "runs" / "ray" / "x" / "checkpoint_0", ctx.tmp / "PWNED")
    ctx.after.append(lambda: not (ctx.tmp / "PWNED").exists())
    return {"resume": str(d)}


def _resume_outside(ctx):
    d = ctx.tmp / "other" / "checkpoint_0"
    d.mkdir(parents=True)
    return {"resume": str(d)}


def _resume_symlink(ctx):
    real = ctx.tmp / "other" / "checkpoint_0"
    real.mkdir(parents=True)
    link = ctx.tmp / "runs" / "ray" / "link"
    link.parent.mkdir(parents=True)
    link.symlink_to(real)
    return {"resume": str(link)}


def _resume_not_ckpt(ctx):
    d = ctx.tmp / "runs" / "ray" / "x" / "checkpoint_0"
    d.mkdir(parents=True)
    return {"resume": str(d)}


def _held_lock(ctx):
    from rwray.train.preflight import resolve_paths

    # The other driver is simulated by a second open of the lock file in this process: flock locks belong to the
    # open file, so the run's own open + flock conflicts exactly as it would across processes.
    lock = RunLock(resolve_paths(C.validate(base(ctx))))
    lock.__enter__()
    ctx.cleanup.append(lambda: lock.__exit__(None, None, None))
    return {}


class Tiny(torch.nn.Module):
    def __init__(self, fail: str = ""):
        super().__init__()
        self.fc = torch.nn.Linear(4, 3)
        self.fail = fail

    def forward(self, x, return_features=False):
        if self.fail == "oom":
            # What CUDA raises when an allocation fails; the handler must not depend on a GPU to be testable.
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        feats = x.flatten(1)
        out = self.fc(feats)
        if self.fail == "nan":
            out = out * torch.tensor([1.0, float("nan"), 1.0, 1.0]).view(4, 1)
        return (out, feats) if return_features else out


def _batch(x=None):
    return Batch(torch.randn(4, 1, 2, 2) if x is None else x, torch.tensor([0, 1, 2, 0]), torch.tensor([30, 31, 32, 33]))


def runtime_train(fail: str = "", x=None):
    def make(ctx):
        torch.manual_seed(0)
        model = Tiny(fail)
        method = METHODS.build(ERMParams(), DataInfo(3, (5, 5, 5), (1, 2, 2), 15))
        return lambda: train_epoch(model, method, torch.optim.SGD(model.parameters(), lr=0.1), [_batch(x)], epoch=2)
    return make


def runtime_eval(ctx):
    model = Tiny("oom")
    return lambda: evaluate(model, [_batch()], 3)


def _inf_input():
    x = torch.randn(4, 1, 2, 2)
    x[3, 0, 1, 1] = float("inf")
    return x


def load_evil(ctx):
    d = evil_checkpoint(ctx.tmp / "ckpt", ctx.tmp / "PWNED")
    ctx.after.append(lambda: not (ctx.tmp / "PWNED").exists())
    return lambda: checkpoint.load(d)


def load_truncated(ctx):
    d = ctx.tmp / "ckpt"
    d.mkdir()
    torch.save({"model": {"w": torch.zeros(100)}}, d / checkpoint.STATE)
    (d / checkpoint.STATE).write_bytes((d / checkpoint.STATE).read_bytes()[:50])
    return lambda: checkpoint.load(d)


class Stub(http.server.BaseHTTPRequestHandler):
    """Answers every request with one status: 401 (bad credentials), 403 (bad token), 404 (not MLflow)."""

    status = 401

    def do_GET(self):
        self.send_response(self.status)
        if self.status == 401:
            self.send_header("WWW-Authenticate", 'Basic realm="mlflow"')
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_POST = do_GET

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def stub_servers():
    servers, running = {}, []
    for status in (401, 403, 404):
        handler = type(f"Stub{status}", (Stub,), {"status": status})
        srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)  # loopback only
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers[status] = f"http://127.0.0.1:{srv.server_address[1]}"
        running.append(srv)
    yield servers
    for srv in running:
        srv.shutdown()
        srv.server_close()


def tracking(status: int | None, env: dict[str, str] | None = None):
    def mutate(ctx):
        for k, v in (env or {}).items():
            ctx.monkeypatch.setenv(k, v)
        uri = ctx.stubs[status] if status else f"http://127.0.0.1:{free_port()}"
        return {"tracking__uri": uri}
    return train(mutate)


def _unreachable_ray(ctx):
    ctx.monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{free_port()}")  # nothing listens there
    return {}


def _other_models_checkpoint(ctx):
    """A first-stage checkpoint of another model (width 16, not the job's 8) under output_dir."""
    from rwray.models import MODELS
    from rwray.models.small_cnn import SmallCNNParams

    folder = ctx.tmp / "runs" / "ray" / "stage1" / "checkpoint_0"
    other = MODELS.build(SmallCNNParams(width=16), DataInfo(10, (1,) * 10, (1, 8, 8), 10))
    checkpoint.save(folder, {"model": other.state_dict()}, "")
    return {"train__init_from": str(folder), "train__trainable": "classifier"}


TAU_NORM = {"train__trainable": "none", "train__tau_norm": 1.0, "train__epochs": 1}  # an evaluation-only τ-norm stage


def _tau_norm_on_another_model(ctx):
    return {**_other_models_checkpoint(ctx), **TAU_NORM}


def _tau_norm_on_a_cosine_head(ctx):
    """A first stage of the job's own model, with a cosine classifier (model.normed_head: true)."""
    from rwray.models import MODELS
    from rwray.models.small_cnn import SmallCNNParams

    folder = ctx.tmp / "runs" / "ray" / "stage1" / "checkpoint_0"
    cosine = MODELS.build(SmallCNNParams(width=8, normed_head=True), DataInfo(10, (1,) * 10, (1, 8, 8), 10))
    checkpoint.save(folder, {"model": cosine.state_dict()}, "")
    return {"train__init_from": str(folder), **TAU_NORM, "model": {"name": "small_cnn", "width": 8,
                                                                   "normed_head": True}}


def _remote_output(ctx):
    ctx.monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return {"output_dir": "s3://some-bucket/runs"}


def _image_dir(ctx, corrupt: bool = False) -> Path:
    """A tiny image-folder dataset in the real layout (one truncated JPEG with corrupt=True)."""
    from image_fixtures import corrupt_image, write_image_folder

    root = ctx.tmp / "images"
    write_image_folder(root, num_classes=2, per_class=(3, 1, 1))
    if corrupt:
        corrupt_image(root / "train" / "class_1" / "001.JPEG")
    return root


def _image_shards(ctx) -> Path:
    from rwray.data import SOURCES, BuilderParams, prepare

    out = ctx.tmp / "image-shards"
    prepare(SOURCES["image_folder"].params(root=_image_dir(ctx)), out, BuilderParams(workers=1))
    return out


def _oltr_with_problems(ctx):
    """ImageNet-LT lists naming two files that do not exist and a label past the class count."""
    from image_fixtures import write_imagenet_lt

    fx = write_imagenet_lt(ctx.tmp / "ilt")
    lst = fx["root"] / "ImageNet_LT_train.txt"
    lines = lst.read_text().splitlines()
    lines[0] = "train/n00000000/gone_1.JPEG 0"
    lines[1] = "train/n00000000/gone_2.JPEG 0"
    lines[2] = lines[2].rsplit(" ", 1)[0] + " 7"
    lst.write_text("\n".join(lines) + "\n")
    return {"data__dir": str(ctx.tmp / "ilt-shards"), "data__source": fx["params"], "data__builder": {"workers": 1}}


# --------------------------------------------------------------------------------------------------------- the table


@dataclass
class Row:
    id: str
    group: str
    tried: str
    make: Callable[[Any], Callable[[], Any]]
    error: type
    fragments: tuple[str, ...]  # problem ... fix


ABSGD = {"name": "absgd", "lam": 1.0}
ROWS = [
    # config: schema problems, reported with their dotted path before anything runs
    Row("unknown-top-level-key", "config", "bogus: 1", validate(bogus=1), C.ConfigError,
        ("bogus: unknown key", "check the spelling", "rwray schema")),
    Row("unknown-nested-key", "config", "optim.lrr: 0.1 (typo)", validate(optim__lrr=0.1), C.ConfigError,
        ("optim.lrr: unknown key", "check the spelling")),
    Row("wrong-type", "config", "optim.lr: fast", validate(optim__lr="fast"), C.ConfigError,
        ("optim.lr: Input should be a valid number", "'fast'")),
    Row("lr-zero", "config", "optim.lr: 0", validate(optim__lr=0), C.ConfigError,
        ("optim.lr: Input should be greater than 0",)),
    Row("lr-negative", "config", "optim.lr: -0.1", validate(optim__lr=-0.1), C.ConfigError,
        ("optim.lr: Input should be greater than 0", "-0.1")),
    Row("epochs-zero", "config", "train.epochs: 0", validate(train__epochs=0), C.ConfigError,
        ("train.epochs: Input should be greater than or equal to 1",)),
    Row("batch-size-zero", "config", "data.batch_size: 0", validate(data__batch_size=0), C.ConfigError,
        ("data.batch_size: Input should be greater than or equal to 1",)),
    Row("momentum-one", "config", "optim.momentum: 1.0", validate(optim__momentum=1.0), C.ConfigError,
        ("optim.momentum: Input should be less than 1",)),
    Row("workers-not-int", "config", "scaling.num_workers: two", validate(scaling__num_workers="two"),
        C.ConfigError, ("scaling.num_workers: Input should be a valid integer",)),
    Row("absgd-lambda-zero", "config", "method: absgd, lam: 0", validate(method={"name": "absgd", "lam": 0}),
        C.ConfigError, ("method.lam: ABSGD lambda must be a nonzero number", "Use lambda > 0")),
    Row("absgd-gamma-zero", "config", "method: absgd, gamma: 0", validate(method={**ABSGD, "gamma": 0}),
        C.ConfigError, ("method.gamma: Input should be greater than 0",)),
    Row("absgd-gamma-above-one", "config", "method: absgd, gamma: 1.5", validate(method={**ABSGD, "gamma": 1.5}),
        C.ConfigError, ("method.gamma: Input should be less than or equal to 1",)),
    Row("absgd-stage-incomplete", "config", "method: absgd, init_lam: 200 without lam_epoch",
        validate(method={**ABSGD, "init_lam": 200}), C.ConfigError, ("init_lam", "set lam_epoch too")),
    Row("unknown-method", "config", "method.name: magic", validate(method={"name": "magic"}), C.ConfigError,
        ("method.name: unknown method 'magic'; choose one of:", "absgd")),
    Row("unknown-model", "config", "model.name: resnet33", validate(model={"name": "resnet33"}), C.ConfigError,
        ("model.name: unknown model 'resnet33'; choose one of:", "resnet32")),
    Row("missing-data-section", "config", "no data: section", validate(data=None), C.ConfigError,
        ("data: required",)),
    Row("milestones-unsorted", "config", "schedule.milestones: [5, 3]", validate(schedule__milestones=[5, 3]),
        C.ConfigError, ("milestones must be strictly increasing",)),
    Row("select-on-test", "config", "train.select_metric: test/top1 (choosing on the test split)",
        validate(train__select_metric="test/top1"), C.ConfigError, ("train.select_metric: Input should be",
                                                                     "'val/balanced_acc'")),
    Row("noise-rate-without-kind", "config", "data.builder.noise_rate: 0.2 without label_noise",
        validate(data__builder={"noise_rate": 0.2}), C.ConfigError, ("noise_rate > 0 needs label_noise",)),
    Row("tau-norm-without-first-stage", "config", "train.tau_norm: 1, trainable: none, no train.init_from",
        validate(train__trainable="none", train__tau_norm=1.0, train__epochs=1), C.ConfigError,
        ("train.init_from:", "tau_norm make a second stage", "set train.init_from to a checkpoint_* folder")),
    Row("tune-space-empty", "config", "tune.space: {}", validate(tune={"space": {}}), C.ConfigError,
        ("tune.space is empty", "give at least one dotted path")),
    Row("tune-choice-empty", "config", "tune.space.optim.lr: {choice: []}",
        validate(tune={"space": {"optim.lr": {"choice": []}}}), C.ConfigError, ("choice needs at least one value",)),
    Row("tune-loguniform-zero", "config", "tune.space.optim.lr: {loguniform: [0, 0.1]}",
        validate(tune={"space": {"optim.lr": {"loguniform": [0, 0.1]}}}), C.ConfigError,
        ("loguniform needs low > 0",)),
    Row("tune-uniform-empty-range", "config", "tune.space.optim.lr: {uniform: [0.1, 0.1]}",
        validate(tune={"space": {"optim.lr": {"uniform": [0.1, 0.1]}}}), C.ConfigError,
        ("uniform needs low < high",)),
    Row("tune-unknown-path", "config", "tune.space.optim.lrr: {choice: [0.1]}",
        validate(tune={"space": {"optim.lrr": {"choice": [0.1]}}}), C.ConfigError,
        ("tune.space.optim.lrr=0.1", "unknown key")),
    Row("tune-invalid-value", "config", "tune.space.method.lam: {choice: [0, 1]} with absgd",
        validate(method=ABSGD, tune={"space": {"method.lam": {"choice": [0, 1]}}}), C.ConfigError,
        ("tune.space.method.lam=0", "nonzero")),
    Row("tune-grid-continuous", "config", "tune.search: grid with a uniform dimension",
        validate(tune={"space": {"optim.lr": {"uniform": [0.01, 0.1]}}, "search": "grid"}), C.ConfigError,
        ("search: grid needs every dimension to be grid or choice",)),
    # paths: resolved without following them out of their roots
    Row("resume-outside-output-dir", "paths", "resume: a folder outside output_dir", train(_resume_outside),
        PathError, ("resume=", "is outside", "Fix: resume from a checkpoint_* folder under")),
    Row("resume-symlink-escape", "paths", "resume: a symlink inside output_dir pointing outside it",
        train(_resume_symlink), PathError, ("is outside", "it resolves to", "Fix:")),
    Row("resume-not-a-checkpoint", "paths", "resume: an empty folder inside output_dir", train(_resume_not_ckpt),
        NotACheckpoint, ("is not an rwray checkpoint", "use a checkpoint_* folder under")),
    Row("resume-pickled-object", "paths", "resume: a state.pt holding a pickled object that would create a file",
        train(_resume_evil), C.ConfigError, ("refusing to load checkpoint", "Unsupported global",
                                             "Fix: resume from a checkpoint_* folder this project wrote")),
    Row("run-name-path", "paths", "tracking.run_name: ../escape", train(tracking__run_name="../escape"), PathError,
        ("tracking.run_name='../escape' contains '/'", "Fix: use letters")),
    # data: verified before Ray starts (sha256, Parquet footers, schema, label range, class counts, paths)
    Row("data-dir-missing", "data", "data.dir: a folder that does not exist",
        train(lambda ctx: {"data__dir": str(ctx.tmp / "nope")}), DataError,
        ("does not exist", "Fix: create it with `rwray data prepare")),
    Row("manifest-missing", "data", "shard folder without manifest.json",
        data(lambda d, ctx: (d / "manifest.json").unlink()), DataError,
        ("manifest.json is missing", "Fix: run `rwray data prepare")),
    Row("manifest-not-json", "data", "manifest.json is not JSON",
        data(lambda d, ctx: (d / "manifest.json").write_text("{not json")), DataError,
        ("is not valid JSON", "Fix: re-create the directory")),
    Row("parquet-truncated", "data", "a train shard cut in half (checksum updated)", data(_truncate), DataError,
        ("truncated or corrupt", "Fix: re-create it")),
    Row("checksum-mismatch", "data", "one byte of a train shard flipped", data(_flip_byte), DataError,
        ("sha256 mismatch", "the file changed after it was written", "Fix: re-create it")),
    Row("shard-missing", "data", "a listed shard deleted", data(lambda d, ctx: first_shard(d, "test").unlink()),
        DataError, ("listed in the manifest but missing", "Fix: restore it or re-create it")),
    Row("image-shape-wrong", "data", "manifest image_shape [1, 9, 9] for 8x8 images", data(_wrong_shape),
        DataError, ("image column is", "expected fixed-size list of 81", "Fix:")),
    Row("label-out-of-range", "data", "a train label of 10 with 10 classes", data(_labels(10)), DataError,
        ("label values span", "outside [0, 10) for 10 classes", "Fix:")),
    Row("label-negative", "data", "a train label of -1", data(_labels(-1)), DataError,
        ("label values span [-1,", "Fix:")),
    Row("column-missing", "data", "a train shard without its index column", data(_drop_index_column), DataError,
        ("differ from the manifest's", "Fix:")),
    Row("class-without-samples", "data", "manifest: class 3 has zero training samples", data(_zero_class),
        DataError, ("1 class has zero training samples: 3;", "Fix:")),
    Row("no-validation-split", "data", "manifest: val split empty", data(_no_val), DataError,
        ("has no validation split", "prepare it with --val-per-class > 0")),
    Row("shard-symlink-escape", "data", "a train shard replaced by a symlink to a file outside data.dir",
        data(_symlink_out), DataError, ("lists files outside itself", "a symlink to", "Fix: copy the real files")),
    Row("manifest-dotdot-entry", "data", "manifest lists ../train-00000.parquet", data(_dotdot_entry), DataError,
        ("lists files outside itself", "../train-00000.parquet", "Fix:")),
    Row("group-column-missing", "data", "method group_dro grouped by a 'bias' column the data does not have",
        train(method__name="group_dro", method__group="bias", method__num_groups=10), DataError,
        ("group column 'bias' is not in the data", "its extra columns: none")),
    Row("second-stage-other-model", "data", "train.init_from: a checkpoint of a wider small_cnn",
        train(_other_models_checkpoint), C.ConfigError,
        ("holds another model than this job's", "size mismatch", "Fix: point it at a checkpoint of the same model")),
    Row("tau-norm-other-model", "data", "train.tau_norm: 1 on a checkpoint of a wider small_cnn",
        train(_tau_norm_on_another_model), C.ConfigError,
        ("holds another model than this job's", "size mismatch", "Fix: point it at a checkpoint of the same model")),
    Row("tau-norm-cosine-head", "data", "train.tau_norm: 1 on a first stage with a cosine classifier",
        train(_tau_norm_on_a_cosine_head), C.ConfigError,
        ("train.tau_norm: the model's classifier is a NormedLinear", "τ-norm would change nothing",
         "Fix: τ-normalise a first stage trained with the plain linear head")),
    Row("select-metric-needs-bias", "data", "train.select_metric: val/bias/worst_cell_acc on data without bias",
        train(train__select_metric="val/bias/worst_cell_acc"), C.ConfigError,
        ("needs a 'bias' column in the data", "choose val/worst_class_acc")),
    # image datasets: read and checked before anything is written or trained
    Row("image-list-problems", "data", "data.source imagenet_lt whose list names 2 missing files and label 7 of 5",
        train(_oltr_with_problems), DataError,
        ("3 problems", "ImageNet_LT_train.txt:1: file train/n00000000/gone_1.JPEG does not exist",
         "ImageNet_LT_train.txt:2:", "label 7 outside [0, 5)")),
    Row("image-unreadable", "data", "data.source image_folder with one truncated JPEG",
        train(lambda ctx: {"data__dir": str(ctx.tmp / "img-shards"),
                           "data__source": {"name": "image_folder", "root": str(_image_dir(ctx, corrupt=True)),
                                            }, "data__builder": {"workers": 1}}), DataError,
        ("images that cannot be read", "001.JPEG: unreadable image", "nothing was written")),
    Row("encoded-in-memory", "data", "data.stream: memory on JPEG shards",
        train(lambda ctx: {"data__dir": str(_image_shards(ctx)), "data__stream": "memory",
                           "model": {"name": "simple_conv"}}), C.ConfigError,
        ("data.stream: memory keeps decoded arrays", "use stream or auto")),
    Row("rrc-on-arrays", "data", "data.augment: rrc_flip on array (digits) shards", train(data__augment="rrc_flip"),
        C.ConfigError, ("rrc_flip is for encoded (JPEG) images", "use none, flip or crop_flip")),
    Row("mix-with-groups", "data", "data.mix: cutmix with a method reading single targets (GroupDRO)",
        train(data__mix="cutmix", method={"name": "group_dro"}), C.ConfigError,
        ("data.mix: cutmix trains on mixed samples", "method group_dro", "method erm / absgd")),
    Row("cutout-too-large", "data", "data.cutout: larger than the 8 px digits",
        train(data__cutout=12), C.ConfigError, ("data.cutout: 12 is larger than the model's input (8 px a side)",)),
    Row("sampler-streamed", "data", "data.sampler: sqrt with data.stream: stream",
        train(data__sampler="sqrt", data__stream="stream"), C.ConfigError,
        ("draws class quotas over the whole split", "use uniform")),
    Row("weights-missing", "data", "model.weights: a file that does not exist",
        train(lambda ctx: {"model": {"name": "resnet10", "weights": str(ctx.tmp / "nope.pth")}}),
        checkpoint.CheckpointError, ("model.weights: no such file", "nope.pth", "Fix: set model.weights")),
    # runtime: the loop's own handlers, exercised without Ray or a GPU
    Row("nan-loss", "runtime", "a model producing NaN logits for sample 31", runtime_train("nan"), NonFiniteLoss,
        ("non-finite loss at epoch 2, step 0, for sample index [31]", "lower optim.lr")),
    Row("inf-input", "runtime", "an input pixel of +inf in sample 33", runtime_train(x=_inf_input()),
        NonFiniteLoss, ("for sample index [33]", "Inspect those samples")),
    Row("cuda-oom-train", "runtime", "torch.cuda.OutOfMemoryError raised in forward (batch of 4)",
        runtime_train("oom"), BatchTooLarge,
        ("out of accelerator memory at epoch 2, step 0 with data.batch_size=4 per worker",
         "Fix: lower data.batch_size (e.g. data.batch_size=2 and train.grad_accum=2")),
    Row("cuda-oom-eval", "runtime", "torch.cuda.OutOfMemoryError raised while evaluating", runtime_eval,
        BatchTooLarge, ("while evaluating with data.eval_batch_size=4", "Fix: lower data.eval_batch_size")),
    Row("checkpoint-pickled-object", "runtime", "checkpoint.load of a state.pt holding a pickled object",
        load_evil, checkpoint.CheckpointError, ("refusing to load checkpoint", "Unsupported global", "Fix:")),
    Row("checkpoint-truncated", "runtime", "checkpoint.load of a truncated state.pt", load_truncated,
        checkpoint.CheckpointError, ("not a readable torch file", "Fix: resume from an earlier checkpoint_*")),
    Row("run-in-use", "runtime", "a second driver for a run name another process is training",
        train(_held_lock), RunInUse, ("is being trained by another process", "Fix: wait for it to finish")),
    # tracking: checked by preflight before anything is written
    Row("tracking-unreachable", "tracking", "tracking.uri: http://127.0.0.1:<free port>", tracking(None),
        TrackingError, ("cannot reach the MLflow tracking server", "Start it", "Nothing was trained")),
    Row("tracking-bad-credentials", "tracking", "a server answering 401 to user/password",
        tracking(401, {"MLFLOW_TRACKING_USERNAME": "me", "MLFLOW_TRACKING_PASSWORD": "wrong"}), TrackingError,
        ("refused the credentials (HTTP 401)", "set MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD")),
    Row("tracking-bad-token", "tracking", "a server answering 403 to a bearer token",
        tracking(403, {"MLFLOW_TRACKING_TOKEN": "expired"}), TrackingError,
        ("refused the credentials (HTTP 403)", "MLFLOW_TRACKING_TOKEN")),
    Row("tracking-not-mlflow", "tracking", "tracking.uri: an HTTP server that is not MLflow (404)", tracking(404),
        TrackingError, ("answered HTTP 404", "is it an MLflow tracking server?")),
    Row("tracking-remote-output-local-store", "tracking", "output_dir: s3://... with no tracking.uri",
        train(_remote_output), TrackingError, ("a local MLflow store cannot live there", "Set tracking.uri")),
    # the cluster: an address is checked with one TCP connection (ray.init would retry it for minutes)
    Row("ray-unreachable", "runtime", "RAY_ADDRESS=127.0.0.1:<free port>", train(_unreachable_ray),
        ClusterUnreachable, ("cannot reach the Ray cluster at RAY_ADDRESS=", "ray start --head", "unset it")),
]


def _tree(root: Path) -> dict[str, tuple]:
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        out[str(p.relative_to(root))] = (p.is_dir(), st.st_size if not p.is_dir() else 0, st.st_mtime_ns)
    return out


def test_table_is_large_enough():
    assert len(ROWS) >= 30 and len({r.id for r in ROWS}) == len(ROWS)
    assert {r.group for r in ROWS} == {"config", "paths", "data", "runtime", "tracking"}


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_bad_input(row: Row, tmp_path, digits_dir, stub_servers, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    ctx = SimpleNamespace(tmp=tmp_path, digits=digits_dir, stubs=stub_servers, monkeypatch=monkeypatch, after=[],
                          cleanup=[])
    RECORD.replacements.update({str(tmp_path): "<tmp>", str(digits_dir): "<shards>"})
    happened, ok = "no error raised", False
    try:
        thunk = row.make(ctx)
        before = _tree(tmp_path)
        with pytest.raises(BaseException) as e:
            thunk()
        msg = " ".join(str(e.value).split())
        happened = f"{type(e.value).__name__}: {msg}"
        assert isinstance(e.value, row.error), happened
        missing = [f for f in row.fragments if f not in msg]
        assert not missing, f"{missing} not in: {msg}"
        assert "Traceback" not in msg
        after = _tree(tmp_path)
        assert after == before, f"written: {sorted(set(after.items()) ^ set(before.items()))}"
        assert all(check() for check in ctx.after), "a side effect of the input happened"
        ok = True
    finally:
        for undo in ctx.cleanup:
            undo()
        RECORD.add(row.id, row.tried, f"{row.error.__name__}: " + " … ".join(row.fragments), happened, ok, row.group)
