"""A user's strategy plugs in by file path or module path; bad ones fail before training."""

import json
import sys
import textwrap

import pytest
import torch

import fedsim
from fedsim.cli import main
from fedsim.data.federated import build_federated_data
from fedsim.server.strategies import strategy_class

TINY = ["partition.num_clients=4", "server.clients_per_round=2", "partition.holdout_clients=0",
        "client.epochs=1", "model.width=8"]

USER_STRATEGY = '''
"""A user's strategy: FedAvg whose aggregate makes the model always predict one class."""

import numpy as np
from flwr.app import Array, ArrayRecord
from flwr.serverapp.strategy import FedAvg

CALLS = []


class Marked(FedAvg):
    def __init__(self, favour=0, **kwargs):
        super().__init__(**kwargs)
        self.favour = favour

    def configure_train(self, server_round, arrays, config, grid):
        CALLS.append(("configure_train", server_round))
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round, replies):
        arrays, metrics = super().aggregate_train(server_round, replies)
        CALLS.append(("aggregate_train", server_round))
        bias = np.zeros_like(arrays["head.bias"].numpy())
        bias[self.favour] = 1.0 + server_round
        weight = np.zeros_like(arrays["head.weight"].numpy())  # logits = bias, whatever the input
        marked = {"head.bias": Array(bias), "head.weight": Array(weight)}
        out = ArrayRecord({k: marked.get(k, arrays[k]) for k in arrays.keys()})
        return out, metrics


class NotAStrategy:
    pass
'''


def rounds_of(path):
    return [json.loads(line) for line in (path / "rounds.jsonl").read_text().splitlines()]


def write_strategy(tmp_path):
    path = tmp_path / "user_strategies" / "marked.py"
    path.parent.mkdir()
    path.write_text(textwrap.dedent(USER_STRATEGY))
    return path


def test_strategy_from_a_file_is_called_every_round_and_its_aggregate_is_used(tmp_path):
    spec = f"{write_strategy(tmp_path)}:Marked"
    result = fedsim.run("scenarios/quickstart.toml",
                        TINY + ["server.rounds=3", f"server.strategy={spec}",
                                "server.params.favour=3"], out=tmp_path / "run")
    calls = sys.modules[strategy_class(spec).__module__].CALLS
    assert calls == [(hook, r) for r in (1, 2, 3) for hook in ("configure_train",
                                                                "aggregate_train")]
    state = torch.load(result.path / "model.pt", weights_only=True)
    assert state["head.bias"][3].item() == 4.0 and state["head.bias"].abs().sum() == 4.0
    assert not state["head.weight"].any()
    # the server evaluated the user's aggregate: it predicts class 3 for every test image
    _, y = build_federated_data(fedsim.load_scenario(result.path / "scenario.toml")).global_test()
    for record in rounds_of(result.path)[1:]:
        assert record["global_test_accuracy"] == pytest.approx((y == 3).float().mean().item())


def test_example_strategy_loads_by_file_path_and_by_module_path():
    by_file = strategy_class("strategies/examples/fedper.py:FedPer")
    by_module = strategy_class("strategies.examples.fedper:FedPer")  # same file, imported again
    assert by_file.__name__ == by_module.__name__ == "FedPer"
    assert by_file.personal_hooks == by_module.personal_hooks == ("example-local-head",)


def test_example_fedper_scenario_keeps_heads_local(tmp_path):
    scn = fedsim.load_scenario("scenarios/custom_strategy.toml")
    assert scn.server.strategy == "strategies/examples/fedper.py:FedPer"
    result = fedsim.run(scn, TINY + ["server.rounds=2"], out=tmp_path / "r")
    from fedsim.context import build_global_model

    scn = fedsim.load_scenario(result.path / "scenario.toml")
    init = build_global_model(scn, build_federated_data(scn)).state_dict()
    final = torch.load(result.path / "model.pt", weights_only=True)
    assert torch.equal(final["head.weight"], init["head.weight"])  # heads never averaged
    assert not torch.equal(final["features.0.weight"], init["features.0.weight"])
    assert result.summary["final"]["personalized_accuracy"]["n"] == 4


@pytest.mark.parametrize(
    ("strategy", "params", "pattern"),
    [
        ("{dir}/missing.py:Marked", [], "not found"),
        ("{dir}/broken.py:Broken", [], "does not import (ZeroDivisionError"),
        ("no_such_package.module:Thing", [], "does not import (ModuleNotFoundError"),
        ("{dir}/marked.py:Nothing", [], "has no attribute 'Nothing'"),
        ("{dir}/marked.py:NotAStrategy", [], "is not a subclass of flwr.serverapp.strategy"),
        ("{dir}/marked.py:Marked", ["server.params.favor=1"],
         "[server.params] do not fit Marked: unexpected keyword argument(s) 'favor'"),
        ("fixbn", ["server.params.warmup=-1"], "warmup must be >= 0"),
        ("fixbn", ["server.params.lr_scale=0"], "lr_scale must be in (0, 1]"),
    ],
)
def test_bad_strategies_exit_2_before_training(tmp_path, capsys, strategy, params, pattern):
    folder = write_strategy(tmp_path).parent
    (folder / "broken.py").write_text("1 / 0\n")
    sets = [a for p in [f"server.strategy={strategy.format(dir=folder)}", *params]
            for a in ("--set", p)]
    out = tmp_path / "out"
    code = main(["run", "scenarios/quickstart.toml", "--out", str(out), "--quiet", *sets])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("error: ") and "\n" not in err and pattern in err, err
    assert not out.exists()


def test_dp_settings_are_checked_before_training(tmp_path, capsys):
    for sets, pattern in ((["server.dp.kind=gaussian"], "server.dp.kind"),
                          (["server.dp.kind=adaptive", "server.dp.noise_multiplier=1.0"],
                           "clipped_count_stddev")):
        code = main(["run", "scenarios/quickstart.toml", "--out", str(tmp_path / "o"), "--quiet",
                     *[a for s in sets for a in ("--set", s)]])
        err = capsys.readouterr().err.strip()
        assert code == 2 and err.startswith("error: ") and pattern in err, err
