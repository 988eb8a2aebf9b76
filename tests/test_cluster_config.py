import subprocess
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER_YAML = Path(__file__).resolve().parents[1] / "cluster.yaml"


def test_cluster_yaml_passes_rays_own_schema():
    config = prepare_config(yaml.safe_load(CLUSTER_YAML.read_text()))
    validate_config(config)  # ray/autoscaler/ray-schema.json plus Ray's own consistency checks
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"].get("GPU", 0) == 0
    assert any(t["resources"].get("GPU", 0) >= 1 for t in types.values())
    assert any("pip install" in command and "-e ." in command for command in config["setup_commands"])


def test_schema_check_is_not_a_rubber_stamp():
    config = yaml.safe_load(CLUSTER_YAML.read_text())
    config["available_node_types"]["gpu_worker"]["unknown_field"] = 1
    with pytest.raises(Exception, match="unknown_field"):
        validate_config(prepare_config(config))


def _config() -> dict:
    return prepare_config(yaml.safe_load(CLUSTER_YAML.read_text()))


def test_every_node_mounts_the_shared_file_system_and_refuses_the_placeholder():
    [mount] = [command for command in _config()["initialization_commands"] if "mount -t nfs4" in command]
    assert mount.rstrip().endswith('"$SHARED_NFS" /mnt/shared') and "mountpoint -q /mnt/shared ||" in mount
    # Left as shipped, the placeholder stops `ray up` with a message instead of a failed mount.
    result = subprocess.run(["bash", "-c", mount], capture_output=True, text=True, timeout=30)
    assert result.returncode == 1 and "set SHARED_NFS to your NFS/EFS address" in result.stderr
    assert subprocess.run(["bash", "-n", "-c", mount.replace("FILL-ME", "fs-0")], timeout=30).returncode == 0


def test_every_node_starts_ray_with_token_auth_and_gets_the_token():
    config = _config()
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    starts = [c for c in config["head_start_ray_commands"] + config["worker_start_ray_commands"] if "ray start" in c]
    assert len(starts) == 2 and all(command.startswith("RAY_AUTH_MODE=token ray start") for command in starts)
    assert any("export RAY_AUTH_MODE=token" in command for command in config["initialization_commands"])
