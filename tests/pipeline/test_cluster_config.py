"""cluster.yaml passes Ray's own cluster-config validation, offline."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import fillout_defaults, validate_config

CLUSTER = Path(__file__).resolve().parents[2] / "cluster.yaml"


def load() -> dict:
    return yaml.safe_load(CLUSTER.read_text())


def test_cluster_yaml_is_valid_for_ray():
    validate_config(fillout_defaults(load()))


def test_gpu_workers_scale_from_zero_on_spot_and_install_the_project():
    config = load()
    gpu = config["available_node_types"]["gpu_worker"]
    assert config["provider"]["type"] == "aws"
    assert gpu["min_workers"] == 0 and gpu["max_workers"] >= 1
    assert gpu["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
    assert config["available_node_types"]["head"]["resources"] == {"CPU": 0}
    assert any("-e ~/densepure" in c for c in config["setup_commands"])


def test_validation_rejects_a_broken_config():
    config = load()
    config["available_node_types"]["gpu_worker"]["min_workrs"] = 0
    with pytest.raises(Exception):
        validate_config(fillout_defaults(config))
