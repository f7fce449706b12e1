"""cluster.yaml validates against Ray's own cluster-config schema; the Dockerfile uses an official Ray image."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def test_cluster_yaml_validates_against_ray_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((REPO / "cluster.yaml").read_text())
    validate_config(prepare_config(raw))  # raises on any schema violation
    assert raw["provider"]["type"] == "aws"
    workers = raw["available_node_types"]["a100"]
    assert workers["min_workers"] == 0 and workers["node_config"]["InstanceType"].startswith("p4d")
    assert raw["available_node_types"]["head"]["resources"] == {"CPU": 0}
    assert any("mlflow server" in c for c in raw["head_start_ray_commands"])
    # the checkout is synced without the virtualenv, history and results (gigabytes to every node)
    assert {".venv", ".git", "runs"} <= set(raw["rsync_exclude"])
    assert any("torch==2.13.0" in c for c in raw["setup_commands"])


def test_dockerfile_uses_official_ray_gpu_image_and_installs_package():
    text = (REPO / "docker" / "Dockerfile").read_text()
    assert re.search(r"^FROM rayproject/ray:[\d.]+-py311-gpu$", text, re.M)
    assert "pip install" in text and "sweep" in text
    assert re.search(r"^COPY .*\bLICENSE\b", text, re.M)  # pyproject's license-files
    assert "[test]" not in text  # no test tools in the runtime image
