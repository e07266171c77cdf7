"""The run context: built once per run, each part handed its own section."""

import pickle

import pytest
import torch

import fedsim
from fedsim.client.runtime import ClientRuntime, ClientSettings, shared_runtime
from fedsim.config import load_scenario
from fedsim.context import RunContext
from fedsim.privacy.audits.pool import MembershipPool, ShadowData

TINY = ["server.rounds=1", "partition.num_clients=6", "server.clients_per_round=3",
        "partition.holdout_clients=0.0", "client.epochs=1", "model.width=8",
        "output.eval_clients=2"]


def tiny(*extra: str):
    return load_scenario("scenarios/quickstart.toml", TINY + list(extra))


def test_model_factory_gives_fresh_copies_of_the_seeded_initial_model():
    run = RunContext.build(tiny())
    a, b = run.new_model(), run.new_model()
    assert a is not b
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    with torch.no_grad():
        next(a.parameters()).add_(1.0)
    assert not torch.equal(next(a.parameters()), next(run.new_model().parameters()))


def test_client_settings_are_the_clients_section_of_the_scenario():
    scn = tiny("model.norm=bn", "seed=3")
    s = ClientSettings.of(scn)
    assert (s.client, s.seed, s.rounds, s.norm, s.strategy) == (
        scn.client, 3, scn.server.rounds, "bn", scn.server.strategy)
    assert s.batch_statistics and not ClientSettings.of(tiny("model.norm=gn")).batch_statistics


def test_a_runtime_travels_as_its_scenario_and_is_built_once_per_process():
    """What Ray does with the ClientApp for every message: pickle it, unpickle it in a
    worker; the worker finds its one runtime of the run again."""
    scn = tiny("seed=7101")
    rt = ClientRuntime.for_run(RunContext.build(scn))
    first, second = pickle.loads(pickle.dumps(rt)), pickle.loads(pickle.dumps(rt))
    assert first is second is shared_runtime(scn)
    assert first.data is rt.data and first.settings == rt.settings


def test_a_runtime_over_substituted_data_refuses_to_leave_the_process():
    scn = tiny()
    run = RunContext.build(scn)
    pool = MembershipPool.build(run.data, scn.seed)
    shadow = ShadowData.for_shadow(run.data, pool, pool.shadow_masks(2, scn.seed), 0)
    rt = ClientRuntime.for_run(RunContext.build(scn, shadow))
    with pytest.raises(TypeError, match="runs in-process only"):
        pickle.dumps(rt)


def test_a_run_builds_its_context_once(tmp_path, monkeypatch):
    calls = []
    real = RunContext.build.__func__

    def counted(cls, scenario, data=None):
        calls.append(scenario.name)
        return real(cls, scenario, data)

    monkeypatch.setattr(RunContext, "build", classmethod(counted))
    fedsim.run(tiny(), out=tmp_path / "r")
    assert calls == ["quickstart"]
