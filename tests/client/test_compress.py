"""``client.compress``: QSGD and top-k with error feedback, and the bytes each round records."""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, RecordDict

import fedsim
from fedsim.arrays import from_array, state_to_record
from fedsim.client.compress import (
    RESIDUAL_KEY,
    QSGDHook,
    TopKHook,
    qsgd_bytes,
    qsgd_quantize,
    topk_bytes,
    topk_count,
    topk_sparsify,
)
from fedsim.client.hooks import HookContext, hooks_for
from fedsim.config import ClientConfig, ScenarioError, load_scenario

TINY = ["server.rounds=2", "partition.num_clients=8", "server.clients_per_round=3",
        "partition.holdout_clients=0.0", "client.epochs=1", "model.width=8"]


# --------------------------------------------------------------------------- QSGD


def test_qsgd_is_unbiased_within_its_variance_bound():
    """Mean of n draws ≈ v: Var[q_i] <= ||v||²/(4s²), so each coordinate's mean is within
    6 standard deviations, 6·||v||/(2s·sqrt(n)), of v_i."""
    v = torch.tensor([0.3, -1.2, 0.05, 0.0, 2.0, -0.7], dtype=torch.float32)
    bits, n = 2, 20000
    s = 2**bits - 1
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([qsgd_quantize(v, bits, gen) for _ in range(n)])
    tol = 6 * float(v.norm()) / (2 * s * math.sqrt(n))
    assert torch.allclose(draws.double().mean(0), v.double(), atol=tol, rtol=0)
    assert not torch.equal(draws[0], draws[1])  # it is random


def test_qsgd_levels_are_integers_in_0_to_s_with_the_sign_of_v():
    v = torch.randn(3, 50, generator=torch.Generator().manual_seed(1))
    for bits in (1, 4, 8):
        s = 2**bits - 1
        q = qsgd_quantize(v, bits, torch.Generator().manual_seed(2))
        norm = float(v.norm().to(torch.float32))
        levels = (q.double().abs() * s / norm)
        assert torch.allclose(levels, levels.round(), atol=1e-4)
        assert levels.max() <= s + 1e-4
        assert torch.all((torch.sign(q) == torch.sign(v)) | (q == 0))
    assert torch.equal(qsgd_quantize(torch.zeros(4), 8, torch.Generator()), torch.zeros(4))


def test_encoded_sizes():
    assert qsgd_bytes(10, 8) == math.ceil(10 * 9 / 8) + 4 == 16
    assert qsgd_bytes(1, 1) == 1 + 4
    assert topk_count(1000, 0.01) == 10 and topk_count(5, 0.01) == 1 and topk_count(3, 1) == 3
    assert topk_bytes(10) == 80


# --------------------------------------------------------------------------- top-k


def test_topk_keeps_exactly_k_largest_and_conserves_the_rest():
    u = torch.tensor([[0.1, -3.0, 0.5], [2.0, -0.2, 0.0]])
    sent, residual = topk_sparsify(u, 2)
    assert torch.equal(sent, torch.tensor([[0.0, -3.0, 0.0], [2.0, 0.0, 0.0]]))
    assert torch.equal(sent + residual, u)
    assert int((sent != 0).sum()) == 2


def _hook_reply(cls, client: ClientConfig, state: RecordDict, model, received: dict,
                rnd: int = 1):
    message = RecordDict({"arrays": state_to_record(received)})
    ctx = HookContext(3, ConfigRecord({"server-round": rnd}), state, message=message,
                      client=client, seed=0)
    hook = cls(ctx)
    return hook, hook.on_reply(model, dict(model.state_dict()))


def test_topk_error_feedback_conserves_update_plus_residual_exactly():
    """sent + new residual == update + old residual, bitwise, over two rounds; BN buffers
    pass through uncompressed."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.BatchNorm1d(4))
    cfg = ClientConfig(compress="topk", compress_ratio=0.25)
    state = RecordDict()
    old = {k: torch.zeros_like(v) for k, v in model.state_dict().items()
           if v.dtype.is_floating_point}
    for rnd in (1, 2):
        received = {k: v.clone() + 0.01 * rnd for k, v in model.state_dict().items()}
        hook, out = _hook_reply(TopKHook, cfg, state, model, received, rnd)
        res = {k: torch.from_numpy(from_array(v)) for k, v in state[RESIDUAL_KEY].items()}
        for name, p in model.named_parameters():
            update = p.detach() - received[name]
            sent = out[name] - received[name]  # the decoded update (ref + sent, then - ref)
            k = topk_count(p.numel(), 0.25)
            assert int((sent != 0).sum()) <= k
            kept = torch.topk((update + old[name]).abs().reshape(-1), k).indices
            raw_sent = torch.zeros(p.numel())
            raw_sent[kept] = (update + old[name]).reshape(-1)[kept]
            assert torch.equal(raw_sent.reshape(p.shape) + res[name], update + old[name])
            assert hook.encoded_sizes()[name] == topk_bytes(k)
        for name, b in model.named_buffers():
            assert torch.equal(out[name], b) and name not in hook.encoded_sizes()
        old = res


def test_qsgd_hook_draws_from_seed_round_and_client():
    model = torch.nn.Linear(5, 3)
    received = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    cfg = ClientConfig(compress="qsgd", compress_bits=2)
    a = _hook_reply(QSGDHook, cfg, RecordDict(), model, received, 1)[1]
    b = _hook_reply(QSGDHook, cfg, RecordDict(), model, received, 1)[1]
    c = _hook_reply(QSGDHook, cfg, RecordDict(), model, received, 2)[1]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_hooks_for_appends_the_compressor_last():
    ctx = HookContext(0, ConfigRecord({"proximal-mu": 0.1}), RecordDict(),
                      client=ClientConfig(compress="topk"))
    assert [type(h).__name__ for h in hooks_for(ctx)] == ["ProximalHook", "TopKHook"]
    assert hooks_for(HookContext(0, ConfigRecord(), RecordDict(), client=ClientConfig())) == []


@pytest.mark.parametrize("key, value", [("compress", "gzip"), ("compress_bits", 0),
                                        ("compress_bits", 17), ("compress_ratio", 0.0),
                                        ("compress_ratio", 1.5)])
def test_bad_compress_settings_are_refused(key, value):
    with pytest.raises(ScenarioError, match=f"client.{key}"):
        setting = f"client.{key}={value!r}".replace("'", '"')
        load_scenario(Path("scenarios/quickstart.toml"), [setting])


# --------------------------------------------------------------------------- runs


def _run(tmp_path, name, extra):
    return fedsim.run("scenarios/quickstart.toml", TINY + extra, out=tmp_path / name)


def _rounds(path):
    return [json.loads(line) for line in (path / "rounds.jsonl").read_text().splitlines()]


def _shapes(path):
    state = torch.load(path / "model.pt", weights_only=True)
    return state, {k for k, _ in fedsim_model_params(path)}


def fedsim_model_params(path):
    from fedsim.client.runtime import shared_runtime

    return list(shared_runtime(load_scenario(path / "scenario.toml")).model.named_parameters())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compress")
    return {name: _run(tmp, name, extra) for name, extra in [
        ("none", []),
        ("qsgd", ["client.compress=qsgd", "client.compress_bits=4"]),
        ("topk", ["client.compress=topk", "client.compress_ratio=0.1"]),
    ]}


def test_bytes_recorded_are_the_encoded_sizes(runs):
    state, params = _shapes(runs["none"].path)
    raw = sum(v.element_size() * v.numel() for v in state.values())
    qsgd = sum(qsgd_bytes(v.numel(), 4) if k in params else v.element_size() * v.numel()
               for k, v in state.items())
    topk = sum(topk_bytes(topk_count(v.numel(), 0.1)) if k in params
               else v.element_size() * v.numel() for k, v in state.items())
    for name, per_client in (("none", raw), ("qsgd", qsgd), ("topk", topk)):
        for r in _rounds(runs[name].path)[1:]:  # round 0: the initial evaluation
            comm = r["communication"]
            assert comm["uploaded"] == {"mean": per_client, "max": per_client,
                                        "total": per_client * r["updates"]}, name
            assert comm["downloaded"] == {"mean": raw, "max": raw, "total": raw * 3}
        summary = runs[name].summary["communication"]
        assert summary == {"bytes_uploaded": per_client * 6, "bytes_downloaded": raw * 6}
    assert raw / qsgd > 5 and raw / topk > 4  # 32/5 and 32/(8·0.1), less the buffers


def test_compressed_runs_are_finite_and_reproducible(runs, tmp_path):
    for name in ("qsgd", "topk"):
        acc = runs[name].summary["final"]["global_test_accuracy"]
        assert acc is not None and math.isfinite(acc)
    again = _run(tmp_path, "again", ["client.compress=topk", "client.compress_ratio=0.1"])
    a = torch.load(runs["topk"].path / "model.pt", weights_only=True)
    b = torch.load(again.path / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_vectorized_cohorts_compress_like_the_sequential_path(runs, tmp_path):
    vec = _run(tmp_path, "vec", ["client.compress=topk", "client.compress_ratio=0.1",
                                 "engine.vectorize=true"])
    seq = _rounds(runs["topk"].path)
    assert ([r.get("communication") for r in _rounds(vec.path)]
            == [r.get("communication") for r in seq])
    a = torch.load(runs["topk"].path / "model.pt", weights_only=True)
    b = torch.load(vec.path / "model.pt", weights_only=True)
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-5) for k in a)


def test_client_update_mia_sees_the_compressed_upload(tmp_path, monkeypatch):
    """The audit's client-update attack reads the reply: at most k entries per parameter
    differ from the global model the client received."""
    from fedsim.privacy.audits.client_mia import ClientMembership

    seen = []
    original = ClientMembership.observe

    def spy(self, view):
        if view.round == self.round:
            seen.extend((u.arrays, view.sent) for u in view.uploads)
        return original(self, view)

    monkeypatch.setattr(ClientMembership, "observe", spy)
    run = _run(tmp_path, "mia", ["client.compress=topk", "client.compress_ratio=0.05",
                                 'privacy.audits=["client_mia"]', "privacy.client_mia.round=1",
                                 "partition.test_fraction=0.5"])
    assert run.summary["privacy"]["client_mia"]
    params = dict(fedsim_model_params(run.path))
    assert len(seen) == 3
    for upload, sent in seen:
        changed = {key: int((from_array(upload[key]) != from_array(sent[key])).sum())
                   for key in params}
        assert all(changed[key] <= topk_count(p.numel(), 0.05) for key, p in params.items())
        assert sum(changed.values()) > 0


def _interrupted(ref, dst):
    """``ref`` as a kill right after round 2's checkpoint (of 3) would leave it."""
    shutil.copytree(ref, dst)
    for name in ("summary.json", "model.pt", "learning_curves.png", "checkpoint.pt"):
        (dst / name).unlink()
    (dst / "checkpoint.prev.pt").rename(dst / "checkpoint.pt")
    return dst


def test_resume_is_exact_with_topk_residuals_in_client_state(tmp_path, monkeypatch):
    """The checkpoint carries the residuals; a resume without them gives another model."""
    ref = fedsim.run("scenarios/quickstart.toml",
                     TINY[1:] + ["server.rounds=3", "client.compress=topk",
                                 "client.compress_ratio=0.1"], out=tmp_path / "ref").path
    dst = _interrupted(ref, tmp_path / "resumed")
    resumed = fedsim.resume(dst)
    assert resumed.summary["resumed_from"] == [2]
    a = torch.load(ref / "model.pt", weights_only=True)
    b = torch.load(dst / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    drop = {"seconds", "train_seconds"}
    assert ([{k: v for k, v in r.items() if k not in drop} for r in _rounds(ref)]
            == [{k: v for k, v in r.items() if k not in drop} for r in _rounds(dst)])
    assert np.isfinite(resumed.summary["final"]["global_test_accuracy"])

    from fedsim.engine.inprocess import InProcessGrid

    monkeypatch.setattr(InProcessGrid, "import_states", lambda self, states: None)
    lost = fedsim.resume(_interrupted(ref, tmp_path / "lost")).path
    c = torch.load(lost / "model.pt", weights_only=True)
    assert not all(torch.equal(a[k], c[k]) for k in a)
