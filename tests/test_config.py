"""The job schema: every shipped job validates, overrides round-trip, and bad input is reported all at once."""

from pathlib import Path

import pytest
import yaml

from rwray import config as C

# every job file (and the recipes bundled in the package); jobs/tables/ holds table files, checked by test_tables.py
JOBS = sorted([*(p for p in (Path(__file__).parent.parent / "jobs").rglob("*.yaml") if p.parent.name != "tables"),
               *C.RECIPES.glob("*.yaml")])
MINIMAL = {"data": {"dir": "d"}, "model": {"name": "small_cnn"}}


@pytest.mark.parametrize("job", JOBS, ids=[str(j.relative_to(j.parents[1])) for j in JOBS])
def test_every_job_file_validates(job):
    cfg = C.load(job)
    # serialisation round-trip: dumping and re-validating gives the same config
    assert C.validate(yaml.safe_load(cfg.to_yaml())) == cfg


def test_jobs_exist():
    assert any(j.name == "quickstart.yaml" for j in JOBS)


def test_a_bundled_recipe_loads_by_name_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no jobs/ here: the recipe comes from the package
    assert C.recipes() == ["quickstart", "quickstart_balanced_softmax"]
    cfg = C.load("quickstart", ["train.epochs=3"])
    assert cfg.name == "quickstart-erm" and cfg.train.epochs == 3
    assert C.load("quickstart.yaml") == C.load("quickstart")
    with pytest.raises(C.ConfigError, match="bundled recipe: quickstart, quickstart_balanced_softmax"):
        C.load("quickstrat")


def test_reliability_fields_are_declared_typed_and_ranged():
    """train.max_failures, train.auto_resume and tracking.flush_timeout_s (docs/reliability.md) are schema fields:
    settable by override, validated, defaulted."""
    cfg = C.validate(MINIMAL)
    assert (cfg.train.max_failures, cfg.train.auto_resume, cfg.tracking.flush_timeout_s) == (3, True, 300.0)
    job = {**MINIMAL, "train": {"max_failures": 0, "auto_resume": False}, "tracking": {"flush_timeout_s": 5}}
    cfg = C.validate(job)
    assert (cfg.train.max_failures, cfg.train.auto_resume, cfg.tracking.flush_timeout_s) == (0, False, 5.0)
    bad = {**MINIMAL, "train": {"max_failures": -1, "auto_resume": "sometimes"}, "tracking": {"flush_timeout_s": 0}}
    with pytest.raises(C.ConfigError) as e:
        C.validate(bad)
    assert len(e.value.problems) == 3
    assert all(any(p.startswith(k) for p in e.value.problems)
               for k in ("train.max_failures", "train.auto_resume", "tracking.flush_timeout_s"))


def test_override_round_trip(tmp_path):
    job = tmp_path / "j.yaml"
    job.write_text(yaml.safe_dump(MINIMAL))
    cfg = C.load(job, ["optim.lr=0.05", "scaling.num_workers=4", "schedule.milestones=[160, 180]",
                       "method.name=erm", "model.norm=group", "train.amp=none"])
    assert cfg.optim.lr == 0.05 and cfg.scaling.num_workers == 4 and cfg.schedule.milestones == [160, 180]
    assert cfg.model.norm == "group" and cfg.train.amp == "none"
    flat = cfg.flat()
    assert flat["optim.lr"] == 0.05 and flat["model.name"] == "small_cnn"
    again = C.load(job, [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"
                         for k, v in flat.items() if v is not None])
    assert again == cfg


def _problems(raw, overrides=()):
    raw, override_problems = C.apply_overrides(raw, overrides)
    with pytest.raises(C.ConfigError) as e:
        C.validate(raw)
    return e.value.problems


def test_all_errors_reported_at_once_with_paths():
    raw = {**MINIMAL, "optim": {"lr": "fast", "momentumm": 0.9}, "train": {"epochs": 0},
           "scaling": {"num_workers": "two"}, "bogus": 1}
    problems = _problems(raw)
    text = "\n".join(problems)
    assert len(problems) == 5, text
    assert "optim.lr: Input should be a valid number" in text and "'fast'" in text
    assert "optim.momentumm: unknown key" in text
    assert "train.epochs: Input should be greater than or equal to 1" in text
    assert "scaling.num_workers: Input should be a valid integer" in text
    assert "bogus: unknown key" in text


@pytest.mark.parametrize("section,bad,choices", [
    ("model", {"name": "resnet999"}, ["resnet18", "resnet32", "small_cnn"]),
    ("method", {"name": "magic"}, ["erm"]),
])
def test_unknown_registered_name_lists_choices(section, bad, choices):
    problems = _problems({**MINIMAL, section: bad})
    assert len(problems) == 1
    assert f"{section}.name: unknown {section} '{bad['name']}'" in problems[0]
    for c in choices:
        assert c in problems[0]


def test_unknown_dataset_name_lists_choices():
    problems = _problems({**MINIMAL, "data": {"dir": "d", "source": {"name": "imagenet"}}})
    assert "data.source.name: unknown source 'imagenet'" in problems[0]
    assert "digits" in problems[0] and "cifar10" in problems[0]


def test_nested_registered_param_error_path_drops_union_tag():
    problems = _problems({**MINIMAL, "model": {"name": "resnet32", "norm": "layer", "widht": 3}})
    text = "\n".join(problems)
    assert "model.norm: Input should be 'batch' or 'group'" in text
    assert "model.widht: unknown key" in text


def test_validation_selects_on_val_only():
    problems = _problems({**MINIMAL, "train": {"select_metric": "test/balanced_acc"}})
    assert problems[0].startswith("train.select_metric: Input should be 'val/balanced_acc'")


def test_bad_override_syntax_and_missing_file(tmp_path):
    job = tmp_path / "j.yaml"
    job.write_text(yaml.safe_dump(MINIMAL))
    with pytest.raises(C.ConfigError) as e:
        C.load(job, ["optim.lr", "optim.lr=-1", "optim.lr.x=1"])
    text = str(e.value)
    assert "override 'optim.lr': expected dotted.path=value" in text
    assert "optim.lr is a value, not a section" in text
    assert "optim.lr: Input should be greater than 0" in text
    with pytest.raises(C.ConfigError, match="no such job file"):
        C.load(tmp_path / "nope.yaml")


def test_milestones_must_increase():
    problems = _problems({**MINIMAL, "schedule": {"milestones": [160, 120]}})
    assert "milestones must be strictly increasing" in problems[0]


def test_method_label_names_the_loss_only_where_there_is_one():
    """The driver's start line and the summary table print it: methods with a fixed objective have no loss."""
    assert C.load("jobs/rebias/biased_digits_rebias.yaml").method_label == "rebias"
    assert C.load("jobs/longtail/digits_erm.yaml").method_label == "erm/ce"
