"""Vectorized cohorts equal the sequential path; unsupported combinations are refused."""

import copy

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

import fedsim
import fedsim.models.norm as norm_module
import fedsim.models.pool as pool_module
from fedsim.arrays import model_to_record, record_to_state, state_to_record
from fedsim.client.app import handle_train
from fedsim.client.hooks import CLIENT_HOOKS, ClientHook, LocalArraysHook
from fedsim.client.train import train_local
from fedsim.config import ClientConfig, load_scenario
from fedsim.engine.inprocess import set_task_identity
from fedsim.engine.vectorized import CohortMember, CohortTrainer, plan_batches, train_cohort
from fedsim.errors import ScenarioError
from fedsim.models import build_model, uses_batch_statistics
from fedsim.rng import torch_generator

CFG = ClientConfig(epochs=2, batch_size=8, lr=0.1, momentum=0.9, weight_decay=1e-3)
SIZES = (13, 8, 21, 1)  # a partial last batch, an exact one, several, a single sample


def clients(seed: int = 0, sizes=SIZES):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g))
            for n in sizes]


NORMS = ["gn", "ln", "in", "none", "bn", "hybrid"]


@pytest.mark.parametrize("fold", ["fold", "vmap-rule"])
@pytest.mark.parametrize("arch,norm", [("cnn", n) for n in NORMS] + [("mlp", n) for n in NORMS
                                                                       if n != "gn"])
def test_cohort_equals_sequential_training(arch, norm, fold, vmap_rules):
    """Every norm, clients of 13, 8, 21 and 1 samples (partial, exact, several batches,
    a lone sample), two epochs with momentum and weight decay: parameters, running
    statistics and metrics equal ``train_local`` per client, whether the norm and pooling
    layers fold the cohort (fedsim.models.batched) or keep vmap's own rules."""
    if fold == "vmap-rule":
        vmap_rules()
    torch.manual_seed(0)
    model = build_model(arch, norm, in_channels=1, image_size=8, num_classes=10, width=8,
                        groups=4)
    drop = uses_batch_statistics(norm)
    start = {k: v.detach().clone() for k, v in model.named_parameters()}
    bufs = {k: v.detach().clone() for k, v in model.named_buffers()}
    members, expected = [], []
    # BN after a linear layer cannot train on a lone sample (sequentially neither)
    sizes = (13, 8, 21, 3) if arch == "mlp" and drop else SIZES
    for cid, (x, y) in enumerate(clients(sizes=sizes)):
        plan = plan_batches(len(x), CFG, torch_generator(0, "t", cid), drop_singleton=drop)
        members.append(CohortMember(start, x, y, plan, bufs))
        ref = copy.deepcopy(model)
        res = train_local(ref, x, y, CFG, torch_generator(0, "t", cid), drop_singleton=drop)
        expected.append((ref.state_dict(), res))
    finals, results = train_cohort(model, members, CFG)
    for (state, res), final, got in zip(expected, finals, results):
        assert got.steps == res.steps and got.num_examples == res.num_examples
        if res.steps == 0:
            continue
        assert got.accuracy == pytest.approx(res.accuracy, abs=1e-12)
        assert got.loss == pytest.approx(res.loss, rel=1e-5)
        assert set(final) == set(state)
        for name, ref_value in state.items():
            torch.testing.assert_close(final[name], ref_value, rtol=1e-4, atol=1e-5)
        assert any(not torch.equal(final[n], start[n]) for n in start)  # it did train
    if bufs:  # running statistics moved, and differently per client
        key = next(k for k in bufs if k.endswith("running_mean"))
        assert not torch.equal(finals[0][key], bufs[key])
        assert not torch.equal(finals[0][key], finals[2][key])


@pytest.mark.parametrize("norm,fn", [("bn", "batch_norm_train"), ("gn", "group_norm")])
def test_cohort_layers_take_the_folded_path(norm, fn, monkeypatch):
    """A cohort runs its norm and pooling layers folded (one native call for all clients),
    not through vmap's own rules: both are counted."""
    calls = []
    for module, name in ((norm_module, fn), (pool_module, "_folded_max_pool")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _r=real, _n=name: calls.append(_n)
                            or _r(*a))
    torch.manual_seed(0)
    model = build_model("cnn", norm, in_channels=1, image_size=28, num_classes=10, width=8,
                        groups=4)
    start = {k: v.detach().clone() for k, v in model.named_parameters()}
    bufs = {k: v.detach().clone() for k, v in model.named_buffers()}
    g = torch.Generator().manual_seed(0)
    members = [CohortMember(start, torch.randn(8, 1, 28, 28, generator=g),
                            torch.randint(0, 10, (8,), generator=g), [torch.arange(8)], bufs)
               for _ in range(3)]
    train_cohort(model, members, CFG)
    # one step: two norm layers, two pooling layers (28x28 inputs: a stem pool)
    assert sorted(calls) == sorted([fn, fn, "_folded_max_pool", "_folded_max_pool"])


@pytest.mark.parametrize("norm,calls", [
    # clients of 25, 13 and 8 samples, batch 8, 2 epochs: 8, 4 and 2 steps. Step sizes
    # (8,8,8) (8,5,8) (8,8) (1,5) (8) (8) (8) (1): padded, one call per step (8); grouped by
    # size, 10
    ("gn", 8), ("ln", 8), ("in", 8), ("none", 8), ("bn", 10), ("hybrid", 10)])
def test_per_sample_norms_pad_each_step_into_one_call(norm, calls, monkeypatch):
    """Layers that never mix samples let a step's unequal batches run as one padded vmap
    call; BN and hybrid keep one call per batch size (padding would change their batch
    statistics)."""
    import fedsim.engine.vectorized as vectorized

    torch.manual_seed(0)
    model = build_model("cnn", norm, in_channels=1, image_size=8, num_classes=10, width=8,
                        groups=4)
    assert vectorized.shares_batch_statistics(model) == uses_batch_statistics(norm)
    start = {k: v.detach().clone() for k, v in model.named_parameters()}
    bufs = {k: v.detach().clone() for k, v in model.named_buffers()}
    members = [CohortMember(start, x, y, plan_batches(len(x), CFG, torch_generator(0, "t", c),
                                                      drop_singleton=False), bufs)
               for c, (x, y) in enumerate(clients(sizes=(25, 13, 8)))]
    counted = []
    real = vectorized.functional_call
    monkeypatch.setattr(vectorized, "functional_call",
                        lambda *a, **k: counted.append(1) or real(*a, **k))
    _, results = train_cohort(model, members, CFG)
    assert len(counted) == calls
    assert [r.steps for r in results] == [8, 4, 2]


@CLIENT_HOOKS.register("test-local-head")
class LocalHead(ClientHook):
    """A FedBN-like hook: ``head.bias`` stays on the client, in Context.state."""

    def on_receive(self, model):
        rec = self.ctx.state.array_records.get("local")
        if rec is not None:
            model.head.bias.data.copy_(record_to_state(rec)["head.bias"])

    def on_reply(self, model, arrays):
        self.ctx.state["local"] = state_to_record({"head.bias": model.head.bias})
        return {k: v for k, v in arrays.items() if k != "head.bias"}


def small_quickstart(server_round: int, hooks: str):
    """A 6-client quickstart (width 8), its global arrays and a train config naming
    ``hooks``: the setting of the cohort-trainer tests below."""
    from fedsim.client.runtime import client_runtime

    set_task_identity(1)
    scenario = load_scenario("scenarios/quickstart.toml", [
        "partition.num_clients=6", "partition.holdout_clients=0.0", "model.width=8",
        "server.clients_per_round=3", "client.epochs=1"])
    config = ConfigRecord({"server-round": server_round, "client-hooks": hooks})
    return scenario, model_to_record(client_runtime(scenario).model), config


def train_message(arrays, config, node: int) -> Message:
    m = Message(RecordDict({"arrays": arrays, "config": config}), node, MessageType.TRAIN)
    m.metadata.__dict__["_message_id"] = f"m{node}"
    return m


def test_cohort_trainer_replies_like_handle_train_with_client_state():
    scenario, arrays, config = small_quickstart(3, "test-local-head")

    def messages():
        return [train_message(arrays, config, node) for node in (1, 3, 5)]

    def contexts():  # each client already holds a local head from an earlier round
        ctxs = []
        for node in (1, 3, 5):
            st = RecordDict({"local": state_to_record({"head.bias": torch.full((10,), node / 10)})})
            ctxs.append(Context(run_id=1, node_id=node, node_config={"partition-id": node - 1},
                                state=st, run_config={}))
        return ctxs

    seq_ctx = contexts()
    sequential = [handle_train(m, c, scenario) for m, c in zip(messages(), seq_ctx)]
    vec_ctx = contexts()
    vectorized = CohortTrainer(scenario)(messages(), vec_ctx)
    for a, b, ca, cb in zip(sequential, vectorized, seq_ctx, vec_ctx):
        assert not b.has_error()
        assert dict(a.content.config_records["client"]) == dict(b.content.config_records["client"])
        ma, mb = a.content.metric_records["metrics"], b.content.metric_records["metrics"]
        assert ma["num-examples"] == mb["num-examples"]
        assert ma["train_accuracy"] == pytest.approx(mb["train_accuracy"], abs=1e-12)
        assert ma["train_loss"] == pytest.approx(mb["train_loss"], rel=1e-5)
        sa, sb = (record_to_state(r.content.array_records["arrays"]) for r in (a, b))
        assert set(sa) == set(sb) and "head.bias" not in sa
        for k in sa:
            torch.testing.assert_close(sa[k], sb[k], rtol=1e-4, atol=1e-5)
        la = record_to_state(ca.state.array_records["local"])["head.bias"]
        lb = record_to_state(cb.state.array_records["local"])["head.bias"]
        torch.testing.assert_close(la, lb, rtol=1e-4, atol=1e-5)


TINY = ["server.rounds=2", "partition.num_clients=6", "server.clients_per_round=4",
        "partition.holdout_clients=0.0", "model.width=8", "output.eval_clients=2"]
# (not GN here: with one channel per group it can divide by a ~0 variance and amplify 1e-7)


@pytest.mark.parametrize("norm,strategy", [("ln", "fedavg"), ("bn", "fedavg"), ("bn", "fedbn")])
def test_vectorized_run_matches_sequential_run(tmp_path, norm, strategy):
    """Whole runs; with FedBN every client keeps its BN layers in Context.state."""
    tiny = TINY + [f"model.norm={norm}", f"server.strategy={strategy}"]
    a = fedsim.run("scenarios/quickstart.toml", tiny, out=tmp_path / "seq")
    b = fedsim.run("scenarios/quickstart.toml", tiny + ["engine.vectorize=true",
                                                        "engine.cohort_size=3"],
                   out=tmp_path / "vec")
    sa = torch.load(a.path / "model.pt", weights_only=True)
    sb = torch.load(b.path / "model.pt", weights_only=True)
    # ~100 SGD steps per client; with BN the summation-order differences of batched kernels
    # grow to ~3e-4 with one torch thread (1e-7 with two), so the bound is absolute 1e-3
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=1e-3, atol=1e-3)
    assert a.summary["timing"]["client_updates"] == b.summary["timing"]["client_updates"] == 8


@pytest.mark.parametrize("overrides,match", [
    (["server.strategy=fedprox", "server.params.proximal_mu=0.1"], "ProximalHook"),
    (["server.strategy=fixbn", "server.params.warmup=1", "model.norm=bn"],
     "FixBNHook.*in round 2"),
    (["engine.kind=ray"], "applies to the inprocess engine"),
])
def test_unsupported_combinations_are_refused_before_training(tmp_path, overrides, match):
    with pytest.raises(ScenarioError, match=match):
        fedsim.run("scenarios/quickstart.toml", TINY + ["engine.vectorize=true", *overrides],
                   out=tmp_path / "r")
    assert not (tmp_path / "r").exists()


def test_empty_cohort_and_arrayrecord_passthrough():
    assert train_cohort(torch.nn.Linear(2, 2), [], CFG) == ([], [])
    assert isinstance(model_to_record(torch.nn.Linear(2, 2)), ArrayRecord)


def test_fedbn_cohort_swaps_saved_arrays_like_the_sequential_client():
    """FedBN's hook takes the cohort's fast path (saved arrays laid over the stacked start,
    no per-client model load); replies and saved states must equal ``handle_train``'s."""
    import strategies  # noqa: F401  (registers the fedbn hook)
    from fedsim.client.hooks import hooks_for
    from fedsim.engine.vectorized import swaps_arrays_only

    set_task_identity(1)
    scenario = load_scenario("scenarios/quickstart.toml", [
        "partition.num_clients=6", "partition.holdout_clients=0.0", "model.width=8",
        "model.norm=bn", "server.strategy=fedbn", "client.epochs=1",
        "server.clients_per_round=3"])
    from fedsim.client.runtime import client_runtime

    rt = client_runtime(scenario)
    arrays = model_to_record(rt.model)
    config = ConfigRecord({"server-round": 3, "client-hooks": "fedbn"})
    norm_keys = [k for k in rt.model.state_dict() if k.startswith("features.1.")
                 or k.startswith("features.5.")]

    def run(trainer):
        replies, states = [], []
        for node in (1, 3, 5):
            saved = {k: (torch.tensor(7 * node) if k.endswith("num_batches_tracked") else
                         torch.rand_like(v, generator=torch.Generator().manual_seed(node)))
                     for k, v in rt.model.state_dict().items() if k in norm_keys}
            ctx = Context(run_id=1, node_id=node, node_config={"partition-id": node - 1},
                          state=RecordDict({"fedbn.local": state_to_record(saved)}),
                          run_config={})
            msg = Message(RecordDict({"arrays": arrays, "config": config}), node,
                          MessageType.TRAIN)
            msg.metadata.__dict__["_message_id"] = f"m{node}"
            replies.append((msg, ctx))
            states.append(ctx)
        return trainer(replies), states

    seq, seq_ctx = run(lambda pairs: [handle_train(m, c, scenario) for m, c in pairs])
    vec, vec_ctx = run(lambda pairs: CohortTrainer(scenario)([m for m, _ in pairs],
                                                             [c for _, c in pairs]))
    from fedsim.client.hooks import HookContext

    assert swaps_arrays_only(hooks_for(HookContext(0, config, RecordDict())))
    for a, b, ca, cb in zip(seq, vec, seq_ctx, vec_ctx):
        assert not b.has_error()
        sa, sb = (record_to_state(r.content.array_records["arrays"]) for r in (a, b))
        assert set(sa) == set(sb) and not set(sa) & set(norm_keys)
        for k in sa:
            torch.testing.assert_close(sa[k], sb[k], rtol=1e-4, atol=1e-5)
        la = record_to_state(ca.state.array_records["fedbn.local"])
        lb = record_to_state(cb.state.array_records["fedbn.local"])
        assert set(la) == set(lb) == set(norm_keys)
        for k in la:
            torch.testing.assert_close(la[k], lb[k], rtol=1e-4, atol=1e-5)
            assert la[k].dtype == lb[k].dtype


@CLIENT_HOOKS.register("test-keys-by-client")
class KeysByClient(LocalArraysHook):
    """Local keys that depend on the client (odd ids keep the head's bias, even ids its
    weight): ``keys_from_model_only`` stays False, so a cohort must ask every client."""

    state_key = "by-client"

    def local_keys(self, model):
        return ["head.bias"] if self.ctx.client_id % 2 else ["head.weight"]


def test_cohort_asks_each_client_for_its_local_keys_unless_they_depend_on_the_model_only():
    from fedsim.client.hooks import HookContext, hooks_for
    from fedsim.engine.vectorized import swaps_arrays_only

    scenario, arrays, config = small_quickstart(2, "test-keys-by-client")
    assert swaps_arrays_only(hooks_for(HookContext(0, config, RecordDict())))
    nodes = (1, 2, 3, 4)
    msgs = [train_message(arrays, config, node) for node in nodes]
    ctxs = [Context(run_id=1, node_id=n, node_config={"partition-id": n - 1},
                    state=RecordDict(), run_config={}) for n in nodes]
    replies = CohortTrainer(scenario)(msgs, ctxs)
    for reply, ctx in zip(replies, ctxs):
        cid = int(reply.content.config_records["client"]["client-id"])
        kept = ["head.bias"] if cid % 2 else ["head.weight"]
        assert list(ctx.state.array_records["by-client"].keys()) == kept
        assert not set(kept) & set(reply.content.array_records["arrays"].keys())


def test_saved_arrays_are_laid_over_the_stacks_as_overlay_lays_them():
    """A cohort of members with and without saved arrays stacks exactly what
    ``overlay`` + ``torch.stack`` give: saved floats in place, saved integers rounded back,
    flattened arrays reshaped, members without saved arrays on their own start."""
    from fedsim.engine.cohort_arrays import overlay, saved_arrays
    from fedsim.engine.vectorized import _stack

    torch.manual_seed(0)
    model = build_model("cnn", "bn", in_channels=1, image_size=8, num_classes=10, width=4)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    bufs = {n: b.detach().clone() for n, b in model.named_buffers()}
    records = [None,
               state_to_record({"features.1.weight": torch.randn(4),
                                "features.1.num_batches_tracked": torch.tensor(6.6)}),
               None,
               state_to_record({"features.5.running_var": torch.rand(8).double(),
                                "head.bias": torch.randn(10).reshape(2, 5)})]
    expected, members = [], []
    for rec in records:
        s, b = (start, bufs) if rec is None else overlay(start, bufs, rec)
        expected.append((s, b))
        members.append({} if rec is None else saved_arrays(rec, start, bufs))
    params = _stack([start] * 4, members, torch.device("cpu"))
    buffers = _stack([bufs] * 4, members, torch.device("cpu"))
    for i, (s, b) in enumerate(expected):
        for stacked, want in ((params, s), (buffers, b)):
            for n, t in want.items():
                assert stacked[n][i].dtype == t.dtype and torch.equal(stacked[n][i], t), n
    assert buffers["features.1.num_batches_tracked"][1].item() == 7
    # a dtype numpy has no name for (bfloat16) takes the tensor path, with the same result
    half = {"w": torch.zeros(3, dtype=torch.bfloat16)}
    got = _stack([half, half], [{}, {"w": np.array([1.5, 2.0, 3.0], np.float32)}],
                 torch.device("cpu"))["w"]
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, torch.tensor([[0.0, 0, 0], [1.5, 2, 3]], dtype=torch.bfloat16))
    with pytest.raises(KeyError, match="does not belong"):
        saved_arrays(state_to_record({"nope": torch.zeros(1)}), start, bufs)
