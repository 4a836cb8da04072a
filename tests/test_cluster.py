"""cluster.yaml: valid for the cluster launcher of the installed Ray, pinned like pyproject, closed to the internet."""

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _cluster():
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_cluster_yaml_matches_the_schema_shipped_in_ray():
    import copy

    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = prepare_config(copy.deepcopy(_cluster()))  # fills the launcher's defaults, as `ray up` does
    validate_config(cfg)  # jsonschema against ray/autoscaler/ray-schema.json + the launcher's own checks
    assert cfg["head_node_type"] in cfg["available_node_types"]
    assert cfg["available_node_types"]["gpu_worker"]["max_workers"] >= 1


def test_cluster_pins_match_pyproject():
    import ray

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = dict(re.match(r"([\w\-\[\],]+)==([\w.]+)", d).groups() for d in deps if "==" in d)
    setup = " ".join(_cluster()["setup_commands"])
    for name, version in pins.items():
        assert f'"{name}=={version}"' in setup, f"cluster.yaml setup does not pin {name}=={version}"
    image = _cluster()["docker"]["image"]
    assert f":{ray.__version__}-py311" in image, image


def test_dashboard_and_mlflow_are_not_public():
    head = " ".join(_cluster()["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head
    assert "0.0.0.0" not in (ROOT / "cluster.yaml").read_text()
