"""Cheap checks before any compute: paths, the resume checkpoint and the data, so bad input fails before anything
is spent or written (tracking is checked by `rwray.tracking.store.preflight`)."""

from __future__ import annotations

from pathlib import Path

from rwray import output, paths
from rwray.config import Config
from rwray.data import Manifest, prepare, verify
from rwray.errors import CheckpointError, ConfigError, DataError, NotACheckpoint
from rwray.train import checkpoint
from rwray.train.identity import run_name


def check_paths(cfg: Config) -> None:
    """Refuse paths that leave their roots (rwray.paths): before resolve_paths, so messages show what the user
    wrote. The run name becomes a folder under output_dir/ray."""
    paths.safe_component(run_name(cfg), "tracking.run_name" if cfg.tracking.run_name else "name")
    if cfg.resume is not None and not cfg.remote_output:
        paths.require_inside(cfg.output_dir, cfg.resume, "resume",
                             f"Fix: resume from a checkpoint_* folder under {cfg.storage('ray')} (copy a checkpoint "
                             f"from elsewhere into output_dir first)")
    if cfg.train.init_from is not None and not cfg.remote_output:
        paths.require_inside(cfg.output_dir, cfg.train.init_from, "train.init_from",
                             f"Fix: start from a checkpoint_* folder under {cfg.storage('ray')} (the first stage's "
                             f"run, with the same output_dir)")


def resolve_paths(cfg: Config) -> Config:
    """Absolute paths everywhere: Ray Train workers run in their own working directory."""
    cfg = cfg.model_copy(deep=True)
    if not cfg.remote_output:
        cfg.output_dir = str(Path(cfg.output_dir).expanduser().resolve())
    cfg.data.dir = Path(cfg.data.dir).expanduser().resolve()
    if cfg.resume is not None:
        cfg.resume = Path(cfg.resume).expanduser().resolve()
    if cfg.train.init_from is not None:
        cfg.train.init_from = Path(cfg.train.init_from).expanduser().resolve()
    for key in ("root", "image_root", "imagenet_a_root", "clusters_csv"):  # a source's folders and files
        if cfg.data.source is not None and getattr(cfg.data.source, key, None) is not None:
            setattr(cfg.data.source, key, Path(getattr(cfg.data.source, key)).expanduser().resolve())
    return cfg


def check_resume(cfg: Config) -> None:
    """resume= names a readable rwray checkpoint: refuse an unsafe or unreadable file here, not in every worker."""
    if cfg.resume is not None:
        read_checkpoint(cfg.resume, "resume", f"a checkpoint_* folder under {cfg.storage('ray')}")


def read_checkpoint(folder: Path, field: str, use: str) -> dict:
    """The state of the rwray checkpoint ``folder`` that the job's ``field`` names; NotACheckpoint when it holds no
    state file, ConfigError when that file is unsafe or unreadable (``use``: what to point the field at)."""
    if not (folder / checkpoint.STATE).is_file():
        raise NotACheckpoint(f"{field}={folder} is not an rwray checkpoint (no {checkpoint.STATE}); use {use}")
    try:
        return checkpoint.load(folder)
    except CheckpointError as e:
        raise ConfigError([f"{field}: {e}"], field) from None


def ensure_data(cfg: Config) -> Manifest:
    """Build the shards from data.source on first use; verify checksums, shapes and labels either way."""
    d = cfg.data.dir
    if not (d / "manifest.json").is_file() and cfg.data.source is not None:
        output.say(f"preparing {cfg.data.source.name} shards in {d} (first use)")
        prepare(cfg.data.source, d, cfg.data.builder)
    listed = Manifest.load(d)  # before verify reads a byte: every listed file must be inside d
    paths.check_shard_files(d, [s["file"] for split in listed.data["splits"].values()
                                for s in (split.get("shards", []) if isinstance(split, dict) else [])])
    manifest = verify(d)
    if manifest.num_samples("val") == 0:
        raise DataError(f"{d} has no validation split, and models are selected on validation only: prepare it "
                        f"with --val-per-class > 0 (data.builder.val_per_class)")
    check_fit(cfg, manifest)
    return manifest


def check_fit(cfg: Config, manifest: Manifest) -> None:
    """What the job asks of its data, before any worker starts: a selection metric the data can produce, and the
    method built once against the data's info (a group column it does not have is found here, not on a worker)."""
    from rwray.methods import METHODS

    info = manifest.data_info(cfg.data.crop_size)
    check_input(cfg, manifest)
    if cfg.train.select_metric.startswith("val/bias/") and "bias" not in info.extra_columns:
        raise ConfigError([f"train.select_metric: {cfg.train.select_metric} needs a 'bias' column in the data, and "
                           f"{cfg.data.dir} has {', '.join(info.extra_columns) or 'no extra columns'}; choose "
                           f"val/worst_class_acc or val/balanced_acc"])
    method = METHODS.build(cfg.method, info)
    if cfg.data.mix != "none" and not method.supports_mix:
        raise ConfigError([f"data.mix: {cfg.data.mix} trains on mixed samples, which have two targets, and method "
                           f"{cfg.method.name} reads single targets beyond its loss (groups, class tables); use "
                           f"data.mix=none, or method erm / absgd"])
    if method.requires_frozen_features and cfg.train.trainable != "classifier":
        raise ConfigError([f"method {cfg.method.name} learns from training features kept across steps, which holds only "
                           f"while the feature extractor is frozen: run it as a decoupled second stage, "
                           f"train.trainable=classifier with train.init_from=<a first-stage checkpoint> "
                           f"(got train.trainable={cfg.train.trainable})"])
    if getattr(cfg.model, "weights", None) is not None:  # a missing or mismatched weights file fails here, once
        from rwray.models import MODELS

        MODELS.build(cfg.model, info)
    if cfg.train.init_from is not None or cfg.train.trainable != "all" or cfg.train.reinit_classifier:
        check_stage(cfg, info)


def check_input(cfg: Config, manifest: Manifest) -> None:
    """How the job reads its data fits the data: encoded images stream and are augmented per sample; the class
    samplers need the split in memory."""
    from rwray.train.inputs import streams

    d, problems = cfg.data, []
    if manifest.encoded:
        if d.stream == "memory":
            problems.append("data.stream: memory keeps decoded arrays, and this shard directory holds encoded "
                            "(JPEG) images; use stream or auto")
        if d.augment == "crop_flip":
            problems.append("data.augment: crop_flip (pad and crop) is for fixed-size arrays; encoded images use "
                            "rrc_flip (RandomResizedCrop + flip + ColorJitter), flip or none")
    elif d.augment == "rrc_flip":
        problems.append("data.augment: rrc_flip is for encoded (JPEG) images; array shards use none, flip or "
                        "crop_flip")
    side = min(manifest.data_info(d.crop_size).image_shape[1:])
    if d.cutout > side:
        problems.append(f"data.cutout: {d.cutout} is larger than the model's input ({side} px a side); use at most "
                        f"{side} (16 on 32 px CIFAR images)")
    if d.sampler != "uniform" and streams(cfg, manifest):
        problems.append(f"data.sampler: {d.sampler} draws class quotas over the whole split, which the streaming "
                        "input does not hold; use uniform (or data.stream: memory for array shards that fit)")
    if problems:
        raise ConfigError(problems, str(cfg.data.dir))


def check_stage(cfg: Config, info) -> None:
    """A second stage's first-stage checkpoint is readable and holds this job's model (same architecture and
    class count), and train.tau_norm has a linear classifier to rescale: the model is built here and the weights
    loaded (and τ-normalised), as every worker will."""
    from rwray.models import MODELS
    from rwray.train.decoupled import prepare_stage

    state = None
    if cfg.train.init_from is not None:
        state = read_checkpoint(cfg.train.init_from, "train.init_from",
                                f"a checkpoint_* folder of the first stage's run under {cfg.storage('ray')}")
    prepare_stage(MODELS.build(cfg.model, info), info.num_classes, cfg.train.init_from, cfg.train.trainable,
                  cfg.train.reinit_classifier, state, tau_norm=cfg.train.tau_norm)
