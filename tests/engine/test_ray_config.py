"""The Ray engine's backend configuration: client resources and cluster address."""

from fedsim.config import EngineConfig
from fedsim.engine.ray import backend_config


def test_local_ray_gets_client_resources_and_this_machines_cpus():
    cfg = backend_config(EngineConfig(kind="ray", ray_num_cpus=1.0, client_gpus=0.25))
    assert cfg["client_resources"] == {"num_cpus": 1.0, "num_gpus": 0.25}
    assert "address" not in cfg["init_args"] and cfg["init_args"]["num_cpus"] >= 1


def test_ray_address_joins_an_existing_cluster():
    cfg = backend_config(EngineConfig(kind="ray", ray_address="10.0.0.5:6379"))
    assert cfg["init_args"] == {"address": "10.0.0.5:6379", "log_to_driver": False}
