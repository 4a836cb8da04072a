"""The job schema. A YAML file in jobs/ is its serialisation; ``a.b=v`` overrides any field by dotted path.

Validation reports every problem at once, each with its dotted path; for registered names (data source, model,
method, loss) the message lists the valid choices.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Literal, Sequence

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from rwray.data.sources import SOURCES
from rwray.data.splits import BuilderParams
from rwray.errors import ConfigError
from rwray.methods import MethodConfig
from rwray.methods.erm import ERMParams
from rwray.models import ModelConfig
from rwray.optim import OptimConfig, ScheduleConfig
from rwray.registry import union_of
from rwray.train.sampling import Sampler

SourceConfig = union_of(SOURCES)

# Model selection happens on these (validation split only: the test split is reported, never used to choose).
# Worst-group selection: the worst class, or (data with a bias column) the worst / mean (class, bias) cell.
SelectMetric = Literal["val/balanced_acc", "val/top1", "val/many_acc", "val/medium_acc", "val/few_acc",
                       "val/worst_class_acc", "val/macro_f1", "val/bias/worst_cell_acc", "val/bias/cell_mean_acc"]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def raise_at_fields(title: str, problems: list[tuple[str, str]]) -> None:
    """A cross-field check's problems, (field, message) each, raised together so that each is reported at its own
    dotted path (a plain ValueError would be one problem at the section's path)."""
    if problems:
        raise ValidationError.from_exception_data(title, [
            InitErrorDetails(type=PydanticCustomError("value_error", "{why}", {"why": why}), loc=(field,), input=None)
            for field, why in problems])


class DataConfig(Section):
    dir: Path  # shard directory written by `rwray data prepare`
    source: SourceConfig | None = None  # when set and `dir` holds no shards yet, they are built from it first
    builder: BuilderParams = BuilderParams()  # long-tail / validation / noise options used with `source`
    batch_size: int = Field(128, ge=1)  # per worker
    eval_batch_size: int = Field(512, ge=1)  # per worker
    # Array shards: none | flip | crop_flip (pad by crop_padding, random crop), batched on the device. Encoded
    # (JPEG) shards: none (eval crop) | flip | rrc_flip (RandomResizedCrop(crop_size) + flip + ColorJitter), per
    # sample on the decoding CPUs, seeded by (seed, epoch, index).
    augment: Literal["none", "flip", "crop_flip", "rrc_flip"] = "none"
    crop_padding: int = Field(4, ge=0)
    crop_size: int = Field(224, ge=8)  # encoded shards: the square crop the model sees
    eval_resize: int = Field(256, ge=8)  # encoded shards: eval resizes the shorter side to this, then centre-crops
    color_jitter: float = Field(0.4, ge=0, le=1)  # rrc_flip's brightness / contrast / saturation strength
    # After the geometry, per train sample (torchvision v2, seeded by (seed, epoch, index)): AutoAugment with one
    # of its learned policy sets, or RandAugment with N ops of magnitude M (0..30).
    policy: Literal["none", "autoaugment", "randaugment"] = "none"
    autoaugment_policy: Literal["cifar10", "imagenet", "svhn"] = "cifar10"
    randaugment_ops: int = Field(2, ge=1, le=14)
    randaugment_magnitude: int = Field(9, ge=0, le=30)
    # Cutout: zero one square of this side (pixels of the model's input; 16 on CIFAR) per train image; 0: off.
    cutout: int = Field(0, ge=0)
    # mixup / CutMix of each train batch with a permutation of itself, λ ~ Beta(mix_alpha, mix_alpha); the
    # per-sample loss is mixed alike (methods that support it: ERM, ABSGD).
    mix: Literal["none", "mixup", "cutmix"] = "none"
    mix_alpha: float = Field(1.0, gt=0)
    # How a worker reads the train split: memory (read once, kept; small data), stream (row groups of its share of
    # the epoch plan, decoded on Ray Data CPU actors, bounded memory), auto (stream encoded shards and splits over
    # memory_limit_gb on disk).
    stream: Literal["auto", "memory", "stream"] = "auto"
    memory_limit_gb: float = Field(2.0, gt=0)
    decode_actors: int = Field(2, ge=0)  # per worker, streaming; 0: decode in the train process
    decode_cpus: float = Field(1.0, gt=0)  # logical CPUs each decoding actor reserves
    decode_window: int = Field(2, ge=1)  # pieces (<= 64 rows) in flight per decoding actor: the decode-ahead bound
    # Node labels the decoding actors must run on (e.g. {"node-role": "cpu"} for CPU nodes started with
    # `ray start --labels node-role=cpu`); None: anywhere.
    decode_node_labels: dict[str, str] | None = None
    # Which train samples an epoch visits (rwray.train.sampling): every one once (uniform), or exact class quotas
    # with p_c ∝ 1 (class_balanced), ∝ sqrt(n_c) (sqrt), or moving from n_c to 1 over the epochs (progressive).
    sampler: Sampler = "uniform"
    # Drop each worker's last, partial batch of an epoch (a batch of one image cannot train BatchNorm).
    drop_last: bool = False


class TrainConfig(Section):
    epochs: int = Field(10, ge=1)
    seed: int = 0
    grad_accum: int = Field(1, ge=1)
    # Clip the global L2 norm of the model's gradient to this before each update (torch's clip_grad_norm_); None: off.
    clip_grad_norm: float | None = Field(None, gt=0)
    # Keep an exponential moving average of the weights (θ_ema ← d·θ_ema + (1 − d)·θ after each update; BatchNorm
    # statistics too) and evaluate, select and report it instead of the raw weights; None: off.
    ema_decay: float | None = Field(None, gt=0, lt=1)
    # Model weights and input batches in channels_last memory layout (faster convolutions on recent GPUs).
    channels_last: bool = False
    # Run the model under torch.compile with this backend (inductor: generated kernels; CPU needs a C++ compiler).
    # Checked on every worker before the first step: where it cannot run, the run stops with the reason.
    compile: bool = False
    compile_backend: Literal["inductor", "aot_eager", "eager"] = "inductor"
    # Decoupled training, second stage (Kang et al. 2020): start from the model weights of a first-stage checkpoint
    # (a checkpoint_* folder under output_dir; a new run, not a resume), train only the classifier (features
    # frozen; see frozen_mode for their BatchNorm) or only a per-class scale of its logits (LWS), and/or re-initialise
    # it. cRT = classifier + reinit_classifier + data.sampler=class_balanced; LWS = scales + class_balanced.
    # τ-norm = none + tau_norm: no training; each class row of the classifier's weight becomes w_k / ‖w_k‖^τ, its
    # bias 0 (rwray.train.decoupled.apply_tau_norm), and the run evaluates val and test once, as its epoch 0 of 1.
    init_from: Path | None = None
    # scales: LWS, the classifier frozen too; none: an evaluation-only run (needs tau_norm and epochs: 1)
    trainable: Literal["all", "classifier", "scales", "none"] = "all"
    reinit_classifier: bool = False
    tau_norm: float | None = Field(None, ge=0)  # τ: 0 keeps the weight rows, 1 makes them unit-norm
    # How the frozen features run while the classifier trains: eval (BatchNorm uses and keeps the first stage's
    # running statistics, dropout off) or train (only their gradients are off, as in the Balanced Meta-Softmax and
    # classifier-balancing code: BatchNorm normalises with batch statistics and its running statistics keep moving
    # with the second stage's batches, which are what evaluation then uses).
    frozen_mode: Literal["eval", "train"] = "eval"

    @model_validator(mode="after")
    def _second_stage_needs_a_first(self) -> "TrainConfig":
        problems = []  # (field, why + fix): each reported at its own dotted path, all at once
        if self.init_from is None and (self.trainable != "all" or self.reinit_classifier or self.tau_norm is not None):
            problems.append(("init_from", "trainable=classifier|scales|none / reinit_classifier / tau_norm make a "
                             "second stage: set train.init_from to a checkpoint_* folder of the first stage's run"))
        if self.tau_norm is not None and self.trainable != "none":
            problems.append(("trainable", f"tau_norm rescales the first stage's classifier without training it: "
                             f"set train.trainable: none (got {self.trainable})"))
        if self.frozen_mode != "eval" and self.trainable not in ("classifier", "scales"):
            problems.append(("frozen_mode", f"frozen_mode says how frozen features run while the classifier "
                             f"trains: it needs train.trainable: classifier or scales (got {self.trainable})"))
        if self.trainable == "none":
            if self.tau_norm is None:
                problems.append(("tau_norm", "trainable: none trains nothing, and the first stage's own run already "
                                 "logged that model's metrics: set train.tau_norm (τ >= 0; 1: unit-norm class "
                                 "weights)"))
            if self.reinit_classifier:
                problems.append(("reinit_classifier", "an evaluation-only run (trainable: none) would score a random "
                                 "classifier: leave it false"))
            if self.epochs != 1:
                problems.append(("epochs", f"an evaluation-only run (trainable: none) scores the model once, as its "
                                 f"epoch 0 of 1: set train.epochs: 1 (got {self.epochs})"))
        raise_at_fields("TrainConfig", problems)
        return self
    # auto: bf16 autocast on GPU, none on CPU; fp16: float16 autocast with a dynamic loss scale (GradScaler)
    amp: Literal["auto", "bf16", "fp16", "none"] = "auto"
    select_metric: SelectMetric = "val/balanced_acc"
    # Ray Train restarts a worker group that lost a worker this many times, from the last checkpoint (0: never).
    max_failures: int = Field(3, ge=0, le=1000)
    # Starting a job whose run (same output_dir + run name + configuration) is unfinished continues that run.
    auto_resume: bool = True
    # Hand Ray Train a checkpoint every N epochs (and always after the last). A restart resumes exactly from the
    # latest one; the epochs after it are trained again, and their metrics reach MLflow with the next checkpoint
    # (so under an ASHA sweep, keep 1: a trial stopped between checkpoints never logs its last epochs).
    checkpoint_every: int = Field(1, ge=1)
    # Also hand Ray Train a checkpoint every N steps inside an epoch (long epochs on large data): a restart resumes
    # the epoch at that step, with exactly the samples not yet consumed. None: at epoch ends only.
    checkpoint_every_steps: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _steps_whole_updates(self) -> "TrainConfig":
        if self.checkpoint_every_steps is not None and self.checkpoint_every_steps % self.grad_accum:
            raise ValueError(f"checkpoint_every_steps={self.checkpoint_every_steps} must be a multiple of "
                             f"grad_accum={self.grad_accum}: a checkpoint cannot hold half-accumulated gradients")
        return self


class ScalingConfig(Section):
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(1.0, gt=0)
    # Memory each worker reserves, in GiB (2**30 bytes, as `ray status` counts); Ray places workers only where it
    # is free. None: no reservation.
    memory_per_worker_gb: float | None = Field(None, gt=0)
    # When the current nodes cannot hold the workers but an autoscaler may add nodes, how long to wait for them
    # before giving up (rwray.train.resources.check); with no autoscaler the run is refused at once.
    resource_wait_s: float = Field(600.0, ge=0, le=86400)


# `tracking.register` shadows ABCMeta.register (pydantic models' metaclass), which no config ever calls; the key is
# MLflow's word for what it does.
warnings.filterwarnings("ignore", message='Field name "register" in "TrackingConfig" shadows', category=UserWarning)


class TrackingConfig(Section):
    uri: str | None = None  # None: $MLFLOW_TRACKING_URI if set, else sqlite:///<output_dir>/mlflow.db
    experiment: str = "rwray"
    run_name: str | None = None
    # At the end of a run, how long to wait for buffered metrics and artifacts to reach an unreachable server
    # before leaving them in the spool (sent at the run's next start).
    flush_timeout_s: float = Field(300.0, gt=0, le=86400)
    # MLflow system metrics (CPU, memory, disk, network; GPU where nvidia-ml-py finds one) sampled every
    # system_metrics_s seconds on each worker node, as system/node_<node rank>/...; 0: off.
    system_metrics_s: float = Field(10.0, ge=0, le=3600)
    # At the end of a run, log the weights chosen on validation as an MLflow model named `model` (uint8 images in,
    # class probabilities out: `mlflow.pyfunc.load_model`).
    log_model: bool = True
    # ... and add it as a new version of this registered model (`rwray train` runs; a sweep's trials only log it).
    # The registry is asked before training whether it accepts the name. None: no registration.
    register: str | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _register_needs_a_model(self) -> "TrackingConfig":
        if self.register is not None and not self.log_model:
            raise ValueError("tracking.register registers the logged model: it needs tracking.log_model=true")
        return self


class Distribution(Section):
    """One search dimension: exactly one of the keys, e.g. {loguniform: [1e-3, 1e-1]} or {choice: [1, 5, 10]}."""

    choice: list[Any] | None = None  # sampled uniformly (random / optuna); every value (grid)
    grid: list[Any] | None = None  # every value, crossed with the other grid dimensions
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    randint: tuple[int, int] | None = None  # [low, high)

    @model_validator(mode="after")
    def _one(self) -> "Distribution":
        set_ = [k for k in ("choice", "grid", "uniform", "loguniform", "randint") if getattr(self, k) is not None]
        if len(set_) != 1:
            raise ValueError(f"give exactly one of choice, grid, uniform, loguniform, randint (got {set_ or 'none'})")
        kind = set_[0]
        value = getattr(self, kind)
        if kind in ("choice", "grid") and not value:
            raise ValueError(f"{kind} needs at least one value")
        if kind in ("uniform", "loguniform", "randint") and not value[0] < value[1]:
            raise ValueError(f"{kind} needs low < high (got {list(value)})")
        if kind == "loguniform" and value[0] <= 0:
            raise ValueError(f"loguniform needs low > 0 (got {value[0]})")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in ("choice", "grid", "uniform", "loguniform", "randint") if getattr(self, k) is not None)

    def example(self) -> Any:
        v = getattr(self, self.kind)
        return v[0]


class SchedulerConfig(Section):
    name: Literal["asha", "fifo"] = "asha"
    grace_period: int = Field(1, ge=1)  # epochs every trial runs before ASHA may stop it
    reduction_factor: float = Field(2.0, gt=1)


class TuneConfig(Section):
    space: dict[str, Distribution]  # dotted config path -> distribution
    metric: SelectMetric = "val/balanced_acc"
    mode: Literal["max", "min"] = "max"
    num_samples: int = Field(4, ge=1)  # samples from the space (with grid: repeats of the whole grid)
    max_concurrent: int = Field(2, ge=1)
    scheduler: SchedulerConfig = SchedulerConfig()
    search: Literal["random", "grid", "optuna"] = "random"

    @model_validator(mode="after")
    def _space(self) -> "TuneConfig":
        if not self.space:
            raise ValueError("tune.space is empty: give at least one dotted path, e.g. method.lam: {choice: [1, 5]}")
        if self.search == "grid" and any(d.kind not in ("grid", "choice") for d in self.space.values()):
            raise ValueError("search: grid needs every dimension to be grid or choice")
        return self


ReferenceMetric = Literal["test/top1", "test/balanced_acc", "test/few_acc", "test/many_acc", "test/medium_acc",
                          "test/macro_f1", "test/cluster_unbiased_acc", "test_unbiased/top1", "imagenet_a/top1"]


class Reference(Section):
    """A published number this job reproduces (docs/references.md registers each with its upstream source)."""

    value: float  # in percent, as papers print it
    metric: ReferenceMetric = "test/top1"
    source: str  # paper + table (+ repository when the number is from its README)
    # The same row's other published columns, metric -> value (e.g. ReBias's unbiased and ImageNet-A accuracy):
    # a report shows each beside the table column of that metric.
    also: dict[ReferenceMetric, float] = {}


class Config(Section):
    name: str = "rwray"
    # Ray Train storage (checkpoints), sweeps and, for local tracking, the MLflow store. A folder, or an object-store
    # URI (s3://bucket/prefix, gs://...) that every node of a cluster can reach; a URI needs tracking.uri.
    output_dir: str = "runs"
    resume: Path | None = None  # a checkpoint directory to continue from
    data: DataConfig
    model: ModelConfig
    method: MethodConfig = ERMParams()
    optim: OptimConfig = OptimConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    train: TrainConfig = TrainConfig()
    scaling: ScalingConfig = ScalingConfig()
    tracking: TrackingConfig = TrackingConfig()
    tune: TuneConfig | None = None  # used by `rwray tune`; ignored by `rwray train`
    reference: Reference | None = None  # the paper's number for this job and its source (used by reports)

    @property
    def method_label(self) -> str:
        """``method/loss`` (erm/ce, absgd/ldam), or the method alone for those with a fixed objective (rebias)."""
        loss = getattr(self.method, "loss", None)
        return f"{self.method.name}/{loss.name}" if loss is not None else self.method.name

    @property
    def remote_output(self) -> bool:
        return "://" in self.output_dir

    def storage(self, *parts: str) -> str:
        """A path (or URI) under output_dir."""
        return "/".join([self.output_dir.rstrip("/"), *parts])

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def flat(self) -> dict[str, Any]:
        """Dotted-path view of every field (MLflow params)."""
        return flatten(self.model_dump(mode="json"))


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> tuple[dict[str, Any], list[str]]:
    """Apply ``a.b=v`` overrides (v parsed as YAML) to a copy of raw; returns (new dict, problems)."""
    import copy

    out, problems = copy.deepcopy(raw), []
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            problems.append(f"override {item!r}: expected dotted.path=value, e.g. optim.lr=0.05")
            continue
        try:
            value = yaml.safe_load(text) if text else ""
        except yaml.YAMLError as e:
            problems.append(f"override {item!r}: value is not valid YAML ({e.__class__.__name__})")
            continue
        node, parts = out, key.split(".")
        for i, part in enumerate(parts[:-1]):
            nxt = node.setdefault(part, {})
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                problems.append(f"override {item!r}: {'.'.join(parts[: i + 1])} is a value, not a section")
                break
            node = nxt
        else:
            node[parts[-1]] = value
    return out, problems


def _describe(err: dict[str, Any], raw: Any) -> str:
    # Drop the union tag pydantic inserts into locations (method.absgd.lam -> method.lam).
    path, node = [], raw
    for part in err["loc"]:
        if isinstance(node, dict) and part == node.get("name") and part not in node:
            continue
        path.append(str(part))
        node = node.get(part) if isinstance(node, dict) else (node[part] if isinstance(node, list) and isinstance(part, int) and part < len(node) else None)
    where = ".".join(path) or "(top level)"
    kind, msg = err["type"], err["msg"]
    if kind == "union_tag_invalid":
        section = path[-1] if path else "part"
        tags = err.get("ctx", {}).get("expected_tags", "")
        return f"{where}.name: unknown {section} {err['ctx'].get('tag')!r}; choose one of: {tags.replace(chr(39), '')}"
    if kind == "union_tag_not_found":
        return f"{where}: missing 'name' (which {path[-1] if path else 'part'} to use)"
    if kind == "extra_forbidden":
        return f"{where}: unknown key (check the spelling; see `rwray schema` for every valid key)"
    if kind == "missing":
        return f"{where}: required"
    if kind == "literal_error" and where.endswith("name"):
        return f"{where}: {msg} (got {err.get('input')!r})"
    if kind == "value_error":
        msg = msg.removeprefix("Value error, ")
    shown = err.get("input")
    return f"{where}: {msg}" + (f" (got {shown!r})" if not isinstance(shown, dict) and kind != "value_error" else "")


def _errors(raw: dict[str, Any]) -> list[str]:
    try:
        Config.model_validate(raw)
        return []
    except ValidationError as e:
        return [_describe(err, raw) for err in e.errors()]


def _space_problems(raw: dict[str, Any]) -> list[str]:
    """Each tune.space path must name a real field and each of its values must be valid there.

    Checked on the raw input (so these are reported together with every other problem): each value is applied as
    an override to the job without its tune block, and only the errors it introduces are reported.
    """
    tune = raw.get("tune")
    space = tune.get("space") if isinstance(tune, dict) else None
    if not isinstance(space, dict):
        return []
    base = {k: v for k, v in raw.items() if k != "tune"}
    known = set(_errors(base))
    problems: list[str] = []
    for path, dim in space.items():
        if not isinstance(dim, dict) or len(dim) != 1:
            continue  # the schema reports malformed dimensions
        (kind, values), = dim.items()
        if not isinstance(values, list) or not values:
            continue
        for v in values if kind in ("choice", "grid") else values[:1]:
            changed, bad = apply_overrides(base, [f"{path}={json.dumps(v)}"])
            new = bad + [e for e in _errors(changed) if e not in known]
            problems += [f"tune.space.{path}={v!r}: {e}" for e in new]
    return list(dict.fromkeys(problems))


def prepare_params(source: dict[str, Any], builder: dict[str, Any], where: str) -> tuple[Any, BuilderParams]:
    """A data source's parameters (``source["name"]`` picks it) and the split builder's, every problem of both at
    once: what `rwray data prepare` validates before it reads a file."""
    entry = SOURCES[source["name"]]
    problems, params, built = [], None, None
    try:
        params = entry.params.model_validate(source)
    except ValidationError as e:
        problems += [f"source {_describe(err, source)}" for err in e.errors()]
    try:
        built = BuilderParams.model_validate(builder)
    except ValidationError as e:
        problems += [_describe(err, builder) for err in e.errors()]
    if problems:
        raise ConfigError(problems, where)
    return params, built


def validate(raw: dict[str, Any], source: str = "config") -> Config:
    problems = _errors(raw) + _space_problems(raw)
    if problems:
        raise ConfigError(problems, source)
    return Config.model_validate(raw)


# Jobs shipped inside the package (package data), so `rwray quickstart` / `rwray train quickstart` work from any
# install, not only from a checkout that has jobs/.
RECIPES = Path(__file__).resolve().parent / "recipes"


def recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES.glob("*.yaml"))


def find_job(path: str | Path) -> Path:
    """A job file: the path itself, else the bundled recipe of that name (``quickstart``)."""
    path = Path(path)
    if path.is_file():
        return path
    if path.parent == Path(".") and (RECIPES / f"{path.stem}.yaml").is_file() and path.suffix in ("", ".yaml"):
        return RECIPES / f"{path.stem}.yaml"
    raise ConfigError([f"no such job file: {path} (give a job YAML, e.g. from jobs/, or a bundled recipe: "
                       f"{', '.join(recipes())})"], str(path))


def load(path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """Read a job YAML (or a bundled recipe by name), apply overrides, validate. Raises ConfigError listing every
    problem."""
    path = find_job(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError([f"not valid YAML: {e}"], str(path)) from None
    if not isinstance(raw, dict):
        raise ConfigError(["the top level must be a mapping of sections (data:, model:, method:, ...)"], str(path))
    raw, problems = apply_overrides(raw, overrides)
    try:
        cfg = validate(raw, str(path))
    except ConfigError as e:
        raise ConfigError(problems + e.problems, str(path)) from None
    if problems:
        raise ConfigError(problems, str(path))
    return cfg
