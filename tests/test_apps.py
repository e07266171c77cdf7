"""The Flower apps themselves: federated evaluation, the query handler, device checks."""

import pytest
import torch

import fedsim
from fedsim import compat
from fedsim.errors import ScenarioError

TINY = ["server.rounds=1", "partition.num_clients=4", "server.clients_per_round=2",
        "partition.holdout_clients=0.0"]


def test_federated_evaluation_runs_the_clientapp_evaluate_handler(tmp_path):
    result = fedsim.run("scenarios/quickstart.toml", TINY + ["server.fraction_evaluate=1.0"],
                        out=tmp_path / "r")
    import json

    rec = [json.loads(x) for x in (result.path / "rounds.jsonl").read_text().splitlines()][-1]
    fed = rec["federated_evaluation"]
    assert set(fed) == {"eval_loss", "eval_accuracy"}
    assert 0 <= fed["eval_accuracy"] <= 1 and fed["eval_loss"] > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_cuda_request_without_cuda_is_refused_before_training(tmp_path):
    with pytest.raises(ScenarioError, match="CUDA is not available"):
        fedsim.run("scenarios/quickstart.toml", TINY + ["engine.device=cuda"], out=tmp_path / "c")
    assert not (tmp_path / "c").exists()


def test_module_level_apps_read_the_scenario_from_the_run_config():
    from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp

    from fedsim.client.app import app as client_app
    from fedsim.engine.inprocess import set_task_identity
    from fedsim.server.app import app as server_app

    assert isinstance(client_app, ClientApp) and isinstance(server_app, ServerApp)
    set_task_identity(1)
    ctx = Context(run_id=1, node_id=5, node_config={"partition-id": 3, "num-partitions": 18},
                  state=RecordDict(), run_config={"scenario": "scenarios/quickstart.toml"})
    msg = Message(RecordDict({"config": ConfigRecord({})}), 5, MessageType.QUERY)
    compat.set_message_id(msg, "m1")
    reply = client_app(msg, ctx)
    data_client = reply.content.config_records["client"]["client-id"]
    from fedsim.data.federated import build_federated_data

    data = build_federated_data(fedsim.load_scenario("scenarios/quickstart.toml"))
    assert data_client == data.participating[3]


@pytest.mark.parametrize("preset,expected", [(None, "0"), ("1", "1")])
def test_flower_telemetry_is_off_for_fedsim_unless_the_user_set_it(preset, expected):
    """Flower reads FLWR_TELEMETRY_ENABLED once, at import: importing fedsim first turns it
    off, and a user's own setting wins."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "FLWR_TELEMETRY_ENABLED"}
    if preset is not None:
        env["FLWR_TELEMETRY_ENABLED"] = preset
    code = ("import fedsim, flwr.supercore.telemetry as t; "
            "print(t.FLWR_TELEMETRY_ENABLED)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, check=True).stdout.split()
    assert out[-1] == expected
