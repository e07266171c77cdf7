"""[failures]: dropouts, crashes and stragglers are reproducible, recorded, and never fatal;
too few replies retry or stop; NaN updates are rejected; a diverging run stops clearly."""

import json

import numpy as np
import pytest

import fedsim
from fedsim.cli import main
from fedsim.client.failures import client_fate, is_straggler, simulated_seconds
from fedsim.config import FailuresConfig, Scenario
from fedsim.errors import ScenarioError

BASE = ["partition.kind=iid", "partition.num_clients=8", "partition.holdout_clients=0.0",
        "server.clients_per_round=4", "server.rounds=3", "client.epochs=1", "model.width=8"]
# iid digits: 1437 train images / 8 clients * 0.8 → 143-144 local images → 9 steps of 16
FLAKY = BASE + ["failures.dropout=0.25", "failures.crash=0.25", "failures.straggler=0.4",
                "failures.slowdown=4", "failures.deadline=20", "failures.retries=5"]
STEPS = 9


def rounds_of(path):
    return [json.loads(line) for line in (path / "rounds.jsonl").read_text().splitlines()]


def test_fates_are_derived_reproducible_and_at_the_configured_rates():
    cfg = FailuresConfig(dropout=0.2, crash=0.3)
    fates = [client_fate(cfg, 7, r, c) for r in range(1, 21) for c in range(100)]
    assert fates == [client_fate(cfg, 7, r, c) for r in range(1, 21) for c in range(100)]
    drop = sum(f.dropout for f in fates) / len(fates)
    crash = sum(f.crash_at > 0 for f in fates) / sum(not f.dropout for f in fates)
    assert abs(drop - 0.2) < 0.04 and abs(crash - 0.3) < 0.04
    assert not any(f.dropout and f.crash_at for f in fates)
    assert {f.crash_at for f in fates if f.crash_at} == {1, 2, 3, 4}
    retried = [client_fate(cfg, 7, r, c, attempt=1) for r in range(1, 21) for c in range(100)]
    assert retried != fates  # a retried round draws anew
    assert client_fate(FailuresConfig(), 7, 1, 1) == client_fate(FailuresConfig(), 8, 2, 3)


def test_stragglers_are_a_fixed_fraction_of_clients_and_slower():
    cfg = FailuresConfig(straggler=0.25, slowdown=3.0, step_seconds=0.5)
    slow = [c for c in range(2000) if is_straggler(cfg, 0, c)]
    assert abs(len(slow) / 2000 - 0.25) < 0.03
    assert simulated_seconds(cfg, 0, slow[0], 10) == 15.0
    fast = next(c for c in range(2000) if c not in slow)
    assert simulated_seconds(cfg, 0, fast, 10) == 5.0


def test_failures_config_is_validated():
    for key, value, pattern in [("dropout", 1.0, r"failures.dropout = 1.0"),
                                ("on_too_few", "ignore", "retry' or 'stop"),
                                ("slowdown", 0.5, ">= 1"), ("deadline", -1.0, ">= 0")]:
        with pytest.raises(ScenarioError, match=pattern):
            FailuresConfig(**{key: value})
    with pytest.raises(ScenarioError, match="failures.min_replies = 11 exceeds"):
        Scenario(failures=FailuresConfig(min_replies=11))


@pytest.fixture(scope="module")
def flaky_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("flaky") / "inprocess"
    return fedsim.run("scenarios/quickstart.toml", FLAKY, out=out)


def expected_failures(record, cfg, seed=0):
    """What the derived draws say must have happened to the clients sampled this round."""
    sampled = {(f.get("attempt", 0), f["client"]) for f in record["failures"]}
    sampled |= {(record["attempts"] - 1, c) for c in record["clients"]}
    want = set()
    for attempt, cid in sampled:
        fate = client_fate(cfg, seed, record["round"], cid, attempt)
        if fate.dropout:
            want.add((attempt, cid, "dropout"))
        elif fate.crash_at:
            want.add((attempt, cid, "crash"))
        elif simulated_seconds(cfg, seed, cid, STEPS) > cfg.deadline:
            want.add((attempt, cid, "deadline"))
    return want


def test_failures_happen_as_drawn_and_are_recorded_per_round(flaky_run):
    cfg = fedsim.load_scenario(flaky_run.path / "scenario.toml").failures
    recs = rounds_of(flaky_run.path)[1:]
    assert len(recs) == 3 and flaky_run.summary["failures"] > 0
    reasons = set()
    for rec in recs:
        got = {(f.get("attempt", 0), f["client"], f["reason"]) for f in rec["failures"]}
        assert got == expected_failures(rec, cfg)
        reasons |= {f["reason"] for f in rec["failures"]}
        assert rec["updates"] == len(rec["clients"]) >= 1
        for f in rec["failures"]:
            if f["reason"] == "crash":
                assert "SimulatedCrash" in f["detail"] and f"client {f['client']}" in f["detail"]
        if rec["attempts"] == 1:  # simulated time: the slowest reply, or the deadline when
            # a reply is missing (dropout, too late); crashes answer at once with an error
            missing = any(f["reason"] in ("dropout", "deadline") for f in rec["failures"])
            assert rec["sim_seconds"] == (cfg.deadline if missing else STEPS * cfg.step_seconds)
    assert {"dropout", "crash", "deadline"} <= reasons
    assert sum(flaky_run.summary["failure_reasons"].values()) == flaky_run.summary["failures"]


@pytest.mark.slow
def test_ray_engine_survives_crashing_clients_and_draws_the_same_failures(flaky_run, tmp_path):
    """Clients raise inside Flower's Ray engine: no hang, no crash, the same records."""
    ray = fedsim.run("scenarios/quickstart.toml", FLAKY + ["engine.kind=ray"],
                     out=tmp_path / "ray")
    keep = ("round", "clients", "failures", "updates", "attempts", "sim_seconds")
    strip = lambda recs: [{k: r[k] for k in keep if k in r} for r in recs]  # noqa: E731
    assert strip(rounds_of(ray.path)) == strip(rounds_of(flaky_run.path))
    acc = [s.summary["final"]["global_test_accuracy"] for s in (ray, flaky_run)]
    assert abs(acc[0] - acc[1]) < 0.02


def test_too_few_replies_retry_with_a_new_sample(tmp_path):
    run = fedsim.run("scenarios/quickstart.toml",
                     BASE + ["failures.dropout=0.5", "failures.min_replies=3",
                             "failures.retries=20"], out=tmp_path / "r")
    recs = rounds_of(run.path)[1:]
    assert all(r["updates"] >= 3 for r in recs)
    retried = [r for r in recs if r["attempts"] > 1]
    assert retried, "with p=0.5 dropout and 3 of 4 needed, some round must have retried"
    assert any(f.get("attempt", 0) >= 1 for r in retried for f in r["failures"])


def test_too_few_replies_stop_keeps_results_and_exits_2(tmp_path, capsys):
    out = tmp_path / "stop"
    code = main(["run", "scenarios/quickstart.toml", "--out", str(out), "--quiet",
                 *[a for s in BASE + ["failures.dropout=0.6", "failures.min_replies=4",
                                      "failures.on_too_few=stop"] for a in ("--set", s)]])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: round 1: only ") and "\n" not in err
    assert "failures.min_replies = 4" in err and "dropout" in err
    recs = rounds_of(out)
    assert recs[-1]["round"] == 1 and recs[-1]["stopped"] in err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped"]["round"] == 1 and (out / "model.pt").exists()
    assert summary["stopped"]["kind"] == "failure" and summary["stopped"]["planned"] is False


def test_nan_updates_are_rejected_before_aggregation(tmp_path):
    run = fedsim.run("scenarios/quickstart.toml",
                     ["partition.num_clients=4", "partition.holdout_clients=0.0",
                      "server.clients_per_round=4", "server.rounds=2",
                      "server.strategy=tests/resilience/stateful_strategy.py:PoisonFedAvg"],
                     out=tmp_path / "nan")
    for rec in rounds_of(run.path)[1:]:
        assert rec["clients"] == [1, 2, 3] and rec["updates"] == 3
        assert [(f["client"], f["reason"]) for f in rec["failures"]] == [(0, "non-finite")]
        assert "NaN/Inf" in rec["failures"][0]["detail"]
    assert 0 < run.summary["final"]["global_test_accuracy"] <= 1


@pytest.mark.parametrize(
    ("sets", "pattern"),
    [(["client.lr=1e30", "failures.on_too_few=stop"],
      r"round 1: .*every update was NaN/Inf.*client\.lr = 1e\+30"),
     (["server.strategy=fedadam", "server.params.eta=1e30"],
      r"round 1: the (global test loss is (nan|inf)|aggregated global model has NaN/Inf).*"
      r"client\.lr = 0\.05")],
)
def test_a_diverging_run_stops_naming_the_round_and_the_learning_rate(tmp_path, capsys, sets,
                                                                      pattern):
    out = tmp_path / "div"
    code = main(["run", "scenarios/quickstart.toml", "--out", str(out), "--quiet",
                 *[a for s in BASE + sets for a in ("--set", s)]])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "\n" not in err, err
    assert __import__("re").search(pattern, err), err
    assert [r["round"] for r in rounds_of(out)] == [0, 1]  # results so far are kept
    assert json.loads((out / "summary.json").read_text())["stopped"]["round"] == 1


class SlowGrid:
    """A grid whose nodes connect one by one, as Flower's Ray SuperNodes do."""

    def __init__(self, total):
        self.total, self.calls = total, 0

    def get_node_ids(self):
        self.calls += 1
        return list(range(101, 101 + min(self.calls, self.total)))

    def send_and_receive(self, messages, timeout=None):
        from flwr.app import ConfigRecord, Message, RecordDict

        return [Message(RecordDict({"client": ConfigRecord(
            {"client-id": m.metadata.dst_node_id - 101})}), reply_to=m) for m in messages]


def test_client_ordering_waits_until_every_node_has_connected():
    """Asking Ray too early used to freeze a partial node list: sampling then hung forever."""
    from fedsim.engine.inprocess import set_task_identity
    from fedsim.engine.ordered import ClientOrderedGrid

    set_task_identity(1)
    grid = ClientOrderedGrid(SlowGrid(4), expected_nodes=4)
    assert list(grid.get_node_ids()) == [101, 102, 103, 104]
    with pytest.raises(RuntimeError, match="only 1 of 4 client nodes connected"):
        list(ClientOrderedGrid(SlowGrid(1), expected_nodes=4, connect_timeout=0.2).get_node_ids())


def test_a_round_of_replies_is_screened_together_and_a_bad_one_named_alone():
    """The round's arrays are checked in one pass (errors and replies without content left
    out); one NaN anywhere fails it, and each reply is then named on its own."""
    from flwr.app import Array, ArrayRecord, Error, Message, MetricRecord, RecordDict

    from fedsim import compat
    from fedsim.server.loop import _arrays_finite, _nonfinite

    def reply(w, b=None, loss=0.5):
        b = np.zeros(2, np.float64) if b is None else b
        return Message(RecordDict({"arrays": ArrayRecord({"w": Array(w), "b": Array(b)}),
                                   "metrics": MetricRecord({"loss": loss})}), dst_node_id=1,
                       message_type="train")

    with compat.task_identity_restored():
        compat.set_task_identity(1)
        good = [reply(np.ones((2, 2), np.float32)), reply(np.arange(3, dtype=np.int64))]
        error = Message(Error(code=1, reason="boom"), reply_to=good[0])
        bad = reply(np.array([1.0, np.inf], np.float32))
        nan_b = reply(np.ones(2, np.float32), np.array([np.nan]))
        nan_loss = reply(np.ones(2, np.float32), loss=float("nan"))
    assert _arrays_finite([*good, error]) and _arrays_finite([])
    assert not _arrays_finite([*good, bad]) and not _arrays_finite([nan_b])
    assert [_nonfinite(r.content) for r in [*good, bad]] == [
        None, None, "array 'w' has NaN/Inf values"]
    assert _nonfinite(nan_loss.content, True) == "metric 'loss' is nan"  # metrics still
