"""Where the trackers write, decided without starting them: MLflow's store and W&B's mode."""

from fedsim.config import load_scenario
from fedsim.sinks import Tracking
from fedsim.sinks.mlflow import params, store
from fedsim.sinks.wandb import wandb_mode


def scenario(*overrides):
    return load_scenario("scenarios/quickstart.toml", list(overrides))


def test_mlflow_store_precedence_sweep_then_scenario_then_environment_then_the_folder(
        monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    folder = tmp_path / "run"
    assert store(scenario(), folder, Tracking()) == (
        f"sqlite:///{folder.resolve() / 'mlflow.db'}", (folder.resolve() / "mlartifacts").as_uri())
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    assert store(scenario(), folder, Tracking()) == ("http://tracking.example:5000", None)
    mine = scenario('output.mlflow_uri="sqlite:///my.db"')
    assert store(mine, folder, Tracking()) == ("sqlite:///my.db", None)
    sweep = Tracking(mlflow_uri="sqlite:///sweep/mlflow.db", mlflow_parent="abc")
    assert store(mine, folder, sweep) == ("sqlite:///sweep/mlflow.db", None)


def test_wandb_is_offline_unless_the_user_says_otherwise(monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert wandb_mode(scenario()) == "offline"
    assert wandb_mode(scenario('output.wandb_mode="disabled"')) == "disabled"
    monkeypatch.setenv("WANDB_MODE", "online")
    assert wandb_mode(scenario()) == "online"


def test_mlflow_params_are_the_flattened_scenario_as_text():
    got = params(scenario("server.rounds=3"))
    assert got["server.rounds"] == "3" and got["model.norm"] == "gn"
    assert got["partition.transforms"] == '["rotate", "contrast", "noise", "invert"]'
    assert all(isinstance(v, str) and len(v) <= 6000 for v in got.values())
