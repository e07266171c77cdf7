"""Vectorized cohorts equal the sequential path; unsupported combinations are refused."""

import copy

import numpy as np
import pytest
import torch
from cohort_setup import seeded_model  # tests/cohort_setup.py
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

import fedsim
import fedsim.models.batched as batched_module
from fedsim import compat
from fedsim.arrays import model_to_record, record_to_state, state_to_record
from fedsim.client.app import handle_train
from fedsim.client.hooks import CLIENT_HOOKS, ClientHook, LocalArraysHook, sets_modes
from fedsim.client.runtime import shared_runtime
from fedsim.client.train import train_local
from fedsim.config import ClientConfig, load_scenario
from fedsim.engine.inprocess import set_task_identity
from fedsim.engine.vectorized import (
    CohortMember,
    CohortTrainer,
    _padded_data,
    train_cohort,
)
from fedsim.errors import ScenarioError
from fedsim.models import build_model, uses_batch_statistics
from fedsim.models.batched import fold_for_cohort
from fedsim.models.local_sgd import plan_batches
from fedsim.models.norm import norm_layers
from fedsim.models.sgd_step import mode_key, set_modes
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
    model, start, bufs = seeded_model(arch, norm)
    drop = uses_batch_statistics(norm)
    members, expected = [], []
    # BN after a linear layer cannot train on a lone sample (sequentially neither)
    sizes = (13, 8, 21, 3) if arch == "mlp" and drop else SIZES
    for cid, (x, y) in enumerate(clients(sizes=sizes)):
        plan = plan_batches(len(x), CFG, torch_generator(0, "t", cid), drop_singleton=drop)
        members.append(CohortMember(start, x, y, plan, bufs))
        ref = copy.deepcopy(model)
        res = train_local(ref, x, y, CFG, torch_generator(0, "t", cid), drop_singleton=drop)
        expected.append((ref.state_dict(), res))
    finals, results = train_cohort(fold_for_cohort(model), members, CFG)
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
    for name in (fn, "max_pool"):
        real = getattr(batched_module, name)
        monkeypatch.setattr(batched_module, name, lambda *a, _r=real, _n=name: calls.append(_n)
                            or _r(*a))
    model, start, bufs = seeded_model("cnn", norm, image_size=28)
    g = torch.Generator().manual_seed(0)
    members = [CohortMember(start, torch.randn(8, 1, 28, 28, generator=g),
                            torch.randint(0, 10, (8,), generator=g), [torch.arange(8)], bufs)
               for _ in range(3)]
    train_cohort(fold_for_cohort(model), members, CFG)
    # one step: two norm layers, two pooling layers (28x28 inputs: a stem pool)
    assert sorted(calls) == sorted([fn, fn, "max_pool", "max_pool"])


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

    model, start, bufs = seeded_model("cnn", norm)
    assert vectorized.shares_batch_statistics(model) == uses_batch_statistics(norm)
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

    def on_receive(self, model, arrays):
        rec = self.ctx.state.array_records.get("local")
        if rec is not None:
            arrays["head.bias"] = record_to_state(rec)["head.bias"]

    def on_reply(self, model, arrays):
        self.ctx.state["local"] = state_to_record({"head.bias": arrays["head.bias"]})
        return {k: v for k, v in arrays.items() if k != "head.bias"}


def small_quickstart(server_round: int, hooks: str):
    """A 6-client quickstart (width 8), its global arrays and a train config naming
    ``hooks``: the setting of the cohort-trainer tests below."""
    set_task_identity(1)
    scenario = load_scenario("scenarios/quickstart.toml", [
        "partition.num_clients=6", "partition.holdout_clients=0.0", "model.width=8",
        "server.clients_per_round=3", "client.epochs=1"])
    config = ConfigRecord({"server-round": server_round, "client-hooks": hooks})
    return scenario, model_to_record(shared_runtime(scenario).model), config


def train_message(arrays, config, node: int) -> Message:
    m = Message(RecordDict({"arrays": arrays, "config": config}), node, MessageType.TRAIN)
    compat.set_message_id(m, f"m{node}")
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
    rt = shared_runtime(scenario)
    sequential = [handle_train(m, c, rt) for m, c in zip(messages(), seq_ctx)]
    vec_ctx = contexts()
    vectorized = CohortTrainer(rt)(messages(), vec_ctx)
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


def test_cohort_trainer_and_evaluator_run_the_folded_layers(monkeypatch):
    """The engine's cohort backends fold the model themselves (the folded path is chosen
    once, when the runtime first builds its cohort model): their GN and pooling layers run
    as one native call per cohort, counted here."""
    from fedsim.engine.vectorized_eval import CohortEvaluator

    calls = []
    for name in ("group_norm", "max_pool"):
        real = getattr(batched_module, name)
        monkeypatch.setattr(batched_module, name, lambda *a, _r=real, _n=name: calls.append(_n)
                            or _r(*a))
    scenario, arrays, config = small_quickstart(1, "")
    nodes = (1, 2, 3)

    def contexts():
        return [Context(run_id=1, node_id=n, node_config={"partition-id": n - 1},
                        state=RecordDict(), run_config={}) for n in nodes]

    replies = CohortTrainer(shared_runtime(scenario))(
        [train_message(arrays, config, n) for n in nodes], contexts())
    assert not any(r.has_error() for r in replies)
    assert calls.count("group_norm") > 0 and calls.count("max_pool") > 0
    assert shared_runtime(scenario).cohort_model is shared_runtime(scenario).cohort_model
    calls.clear()
    evals = []
    for n in nodes:
        m = Message(RecordDict({"arrays": arrays, "config": config}), n, MessageType.EVALUATE)
        compat.set_message_id(m, f"e{n}")
        evals.append(m)
    replies = CohortEvaluator(shared_runtime(scenario))(evals, contexts())
    assert not any(r.has_error() for r in replies)
    assert calls.count("group_norm") > 0


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
    # Ray runs cohorts on actors now; more actors than this machine's CPUs would never start
    (["engine.kind=ray", "engine.ray_workers=64"], "engine.ray_workers = 64 actors"),
    # DP-SGD runs vectorized, but never with batch statistics
    (["client.dp.noise_multiplier=1.0", "model.norm=bn"], "depends on the other samples"),
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
    """FedBN's hook lays saved arrays over the stacked start (no per-client model load);
    replies and saved states must equal ``handle_train``'s."""
    import strategies  # noqa: F401  (registers the fedbn hook)

    set_task_identity(1)
    scenario = load_scenario("scenarios/quickstart.toml", [
        "partition.num_clients=6", "partition.holdout_clients=0.0", "model.width=8",
        "model.norm=bn", "server.strategy=fedbn", "client.epochs=1",
        "server.clients_per_round=3"])
    rt = shared_runtime(scenario)
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
            compat.set_message_id(msg, f"m{node}")
            replies.append((msg, ctx))
            states.append(ctx)
        return trainer(replies), states

    seq, seq_ctx = run(lambda pairs: [handle_train(m, c, rt) for m, c in pairs])
    vec, vec_ctx = run(lambda pairs: CohortTrainer(rt)([m for m, _ in pairs],
                                                       [c for _, c in pairs]))
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
    weight): a cohort must ask every client."""

    state_key = "by-client"

    def local_keys(self, model):
        return ["head.bias"] if self.ctx.client_id % 2 else ["head.weight"]


@CLIENT_HOOKS.register("test-freeze-norms")
class FreezeNorms(ClientHook):
    """Changes modes: every norm layer in eval mode (as FixBN's statistics freeze)."""

    def before_train(self, model):
        for _, layer in norm_layers(model):
            layer.eval()


@CLIENT_HOOKS.register("test-see-modes")
class SeeModes(ClientHook):
    """Keeps modes; records the modes the model is in when the cohort calls it."""

    seen: list = []

    def on_receive(self, model, arrays):
        SeeModes.seen.append(("receive", self.ctx.client_id, mode_key(model)))

    def on_reply(self, model, arrays):
        SeeModes.seen.append(("reply", self.ctx.client_id, mode_key(model)))
        return arrays


def test_hooks_that_keep_modes_need_no_walk_and_see_the_modes_set_modes_would_leave():
    """Only a hook overriding ``before_train`` changes modes (``sets_modes``); the cohort
    skips the per-client mode walk for the others, yet every hook sees the model in the
    modes the per-client ``set_modes`` of the clients before it would have left."""
    scenario, arrays, _ = small_quickstart(2, "")
    rt = shared_runtime(scenario)
    model = rt.cohort_model
    train = set_modes(model, [])
    frozen = set_modes(model, [FreezeNorms(None)])
    assert frozen != train
    assert not sets_modes([]) and not sets_modes([SeeModes(None), LocalHead(None)])
    assert sets_modes([SeeModes(None), FreezeNorms(None)])
    hooks = {1: "test-freeze-norms,test-see-modes", 2: "test-see-modes",
             3: "test-freeze-norms,test-see-modes", 4: "test-see-modes"}
    msgs = [train_message(arrays, ConfigRecord({"server-round": 2, "client-hooks": h}), n)
            for n, h in hooks.items()]
    ctxs = [Context(run_id=1, node_id=n, node_config={"partition-id": n - 1},
                    state=RecordDict(), run_config={}) for n in hooks]
    SeeModes.seen = []
    replies = CohortTrainer(rt)(msgs, ctxs)
    assert not any(r.has_error() for r in replies)
    cid = {n: rt.client_id(c) for n, c in zip(hooks, ctxs)}
    receive = {c: m for what, c, m in SeeModes.seen if what == "receive"}
    reply = {c: m for what, c, m in SeeModes.seen if what == "reply"}
    # on_receive: the modes the previous client's set_modes left (all training at first)
    assert [receive[cid[n]] for n in hooks] == [train, frozen, train, frozen]
    # on_reply: the modes the client's own group trained in
    assert [reply[cid[n]] for n in hooks] == [frozen, train, frozen, train]
    assert model.training and mode_key(model) == train  # left training, as before


def test_cohort_asks_each_client_for_its_local_keys():
    scenario, arrays, config = small_quickstart(2, "test-keys-by-client")
    nodes = (1, 2, 3, 4)
    msgs = [train_message(arrays, config, node) for node in nodes]
    ctxs = [Context(run_id=1, node_id=n, node_config={"partition-id": n - 1},
                    state=RecordDict(), run_config={}) for n in nodes]
    replies = CohortTrainer(shared_runtime(scenario))(msgs, ctxs)
    for reply, ctx in zip(replies, ctxs):
        cid = int(reply.content.config_records["client"]["client-id"])
        kept = ["head.bias"] if cid % 2 else ["head.weight"]
        assert list(ctx.state.array_records["by-client"].keys()) == kept
        assert not set(kept) & set(reply.content.array_records["arrays"].keys())


def test_saved_arrays_are_laid_over_the_stacks_as_client_arrays_read_them():
    """A cohort of members with and without saved arrays stacks exactly what a client's
    ``ClientArrays`` read: saved floats in place, saved integers rounded back, flattened
    arrays reshaped, members without saved arrays on their own start."""
    from fedsim.client.step import ClientArrays
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
        arrays = ClientArrays({**start, **bufs})
        if rec is not None:
            arrays.load(rec)
        expected.append(({n: arrays[n] for n in start}, {n: arrays[n] for n in bufs}))
        members.append(arrays.overrides)
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
        ClientArrays({**start, **bufs}).load(state_to_record({"nope": torch.zeros(1)}))


def _step_hooks(cid: int, start: dict, dtype=torch.float32):
    """FedProx's proximal term and SCAFFOLD's correction with client-specific c_i (as after
    earlier rounds): hooks whose terms enter every local step."""
    from flwr.app import Array

    import strategies.scaffold as scaffold
    from fedsim.client.hooks import HookContext as Ctx
    from fedsim.client.hooks import ProximalHook

    g = torch.Generator().manual_seed(100 + cid)
    c = {n: (0.01 * torch.randn(p.shape, generator=g)).numpy() for n, p in start.items()}
    c_i = {n: (0.01 * torch.randn(p.shape, generator=g)).numpy() for n, p in start.items()}
    message = RecordDict({scaffold.SERVER_RECORD: ArrayRecord({n: Array(v) for n, v in c.items()})})
    state = RecordDict({scaffold.STATE_KEY: ArrayRecord({n: Array(v) for n, v in c_i.items()})})
    config = ConfigRecord({"proximal-mu": 0.1})
    return [ProximalHook(Ctx(cid, config, state, message=message)),
            scaffold.ScaffoldHook(Ctx(cid, config, state, message=message))]


@pytest.mark.parametrize("norm", ["gn", "bn"])
def test_cohort_with_step_hooks_equals_sequential_within_float64_derived_tolerance(norm):
    """FedProx + SCAFFOLD terms, clients of different sizes: each cohort member's final
    parameters equal ``train_local``'s within a multiple of how far float32 ``train_local``
    itself is from a float64 run of the same computation."""
    from fedsim.models.sgd_step import HookTerms

    model, start, bufs = seeded_model("cnn", norm)
    drop = uses_batch_statistics(norm)
    members, expected = [], []
    for cid, (x, y) in enumerate(clients(sizes=(13, 8, 21, 3))):
        plan = plan_batches(len(x), CFG, torch_generator(0, "t", cid), drop_singleton=drop)
        members.append(CohortMember(start, x, y, plan, bufs,
                                    terms=HookTerms(_step_hooks(cid, start), start)))
        runs = []
        for dtype in (torch.float32, torch.float64):
            ref = copy.deepcopy(model).to(dtype)
            ref_start = {k: v.detach().clone() for k, v in ref.named_parameters()}
            train_local(ref, x.to(dtype), y, CFG, torch_generator(0, "t", cid),
                        _step_hooks(cid, ref_start), drop_singleton=drop)
            runs.append(dict(ref.named_parameters()))
        expected.append(runs)
    finals, results = train_cohort(model, members, CFG)
    for (seq, ref64), final in zip(expected, finals):
        for name, p in seq.items():
            err64 = (p.double() - ref64[name]).abs().max().item()
            bound = 10 * err64 + 4 * torch.finfo(torch.float32).eps * p.abs().max().item()
            gap = (final[name].double() - p.double()).abs().max().item()
            assert gap <= bound, (name, gap, err64)


STEP_RUN = TINY + ["model.norm=ln", "server.rounds=3", "partition.kind=dirichlet"]


@pytest.mark.parametrize("overrides", [
    ["server.strategy=fedprox", "server.params.proximal_mu=0.1"],
    ["server.strategy=scaffold"],
    ["failures.crash=0.3"],
    ["model.norm=bn", "server.strategy=fixbn", "server.params.warmup=1",
     "server.params.lr_scale=0.5"],
    ["client.dp.noise_multiplier=1.0", "server.strategy=fedprox",
     "server.params.proximal_mu=0.1"],
], ids=["fedprox", "scaffold", "crash", "fixbn", "dpsgd-fedprox"])
def test_vectorized_run_with_step_hooks_matches_sequential_run(tmp_path, overrides):
    """FedProx, SCAFFOLD (client control variates carried across rounds in client state),
    simulated crashes, FixBN's frozen statistics (a mode change; its frozen phase's step
    scaled per client) and DP-SGD with FedProx
    run vectorized: the same clients fail for the same reasons, and the final model equals
    the sequential in-process engine's within float tolerance (DP-SGD: each client's noise
    from its own generator on both)."""
    import json

    args = STEP_RUN + overrides
    a = fedsim.run("scenarios/quickstart.toml", args, out=tmp_path / "seq")
    b = fedsim.run("scenarios/quickstart.toml", args + ["engine.vectorize=true",
                                                        "engine.cohort_size=3"],
                   out=tmp_path / "vec")

    def failures(run):
        rows = [json.loads(line) for line in (run.path / "rounds.jsonl").read_text().splitlines()]
        return [[(f["client"], f["reason"]) for f in r.get("failures", [])] for r in rows]

    assert failures(a) == failures(b)
    if "failures.crash=0.3" in overrides:
        assert any(reason == "crash" for rnd in failures(a) for _, reason in rnd)
    sa = torch.load(a.path / "model.pt", weights_only=True)
    sb = torch.load(b.path / "model.pt", weights_only=True)
    # a few dozen SGD steps per client in float32 (see the BN run above for the bound)
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=1e-3, atol=1e-3)
    assert a.summary["timing"]["client_updates"] == b.summary["timing"]["client_updates"]
    if "client.dp.noise_multiplier=1.0" in overrides:  # the same steps: the same ε
        assert a.summary["client_dp"] == b.summary["client_dp"]


@pytest.mark.parametrize("norm", ["gn", "ln", "none"])
def test_dpsgd_cohort_equals_one_client_at_a_time(norm):
    """DP-SGD in a cohort: per-sample gradients nested in the vmap over clients, each
    client's Poisson batches, gradient canaries and noise from its own generator, with
    FedProx's and SCAFFOLD's terms, momentum and weight decay, clients of 13, 8, 21 and 3
    samples (4, 2, 6 and 2 steps): each member's parameters and metrics equal
    ``train_dpsgd`` on the client alone.

    In float64, so both runs draw the very same noise and only summation order differs:
    ~16 steps of sums over at most 21 samples and ~2k parameters leave relative rounding
    below ~1e-12, and 1e-9 keeps a 1000x margin, while a wrong batch, noise draw, canary
    or clip moves a parameter by about lr·σC/(q·n) ≈ 1e-2."""
    from fedsim.canaries import unit_directions
    from fedsim.client.dpsgd import poisson_plan, train_dpsgd
    from fedsim.config import ClientDPConfig
    from fedsim.models.dp_sgd import DPSGD
    from fedsim.models.sgd_step import HookTerms

    model, start, bufs = seeded_model("cnn", norm)
    model = model.double()
    start = {k: v.double() for k, v in start.items()}
    bufs = {k: v.double() if v.is_floating_point() else v for k, v in bufs.items()}
    cfg = ClientConfig(epochs=2, batch_size=8, lr=0.1, momentum=0.9, weight_decay=1e-3,
                       dp=ClientDPConfig(noise_multiplier=1.0, max_grad_norm=0.5))
    dim = sum(p.numel() for p in start.values())
    members, expected = [], []
    for cid, (x, y) in enumerate(clients(sizes=(13, 8, 21, 3))):
        x = x.double()
        canaries = (torch.from_numpy(unit_directions(dim, 0, "t", [cid, cid + 10])).double()
                    if cid in (0, 2) else None)
        plan = poisson_plan(len(x), cfg, 1.0, torch_generator(0, "dp", cid), canaries)
        members.append(CohortMember(start, x, y, plan, bufs,
                                    terms=HookTerms(_step_hooks(cid, start), start)))
        ref = copy.deepcopy(model)
        ref_start = {k: v.detach().clone() for k, v in ref.named_parameters()}
        res = train_dpsgd(ref, x, y, cfg, 1.0, torch_generator(0, "dp", cid),
                          _step_hooks(cid, ref_start), canaries)
        expected.append((dict(ref.named_parameters()), res))
    finals, results = train_cohort(fold_for_cohort(model), members, cfg,
                                   rule=DPSGD(cfg.dp.max_grad_norm))
    assert [r.steps for r in results] == [4, 2, 6, 2]
    for (params, res), final, got in zip(expected, finals, results):
        assert (got.steps, got.num_examples) == (res.steps, res.num_examples)
        assert got.loss == pytest.approx(res.loss, rel=1e-9)
        assert got.accuracy == pytest.approx(res.accuracy, abs=1e-12)
        for name, p in params.items():
            torch.testing.assert_close(final[name], p.detach(), rtol=1e-9, atol=1e-12)
            assert not torch.equal(final[name], start[name])  # it did train


def test_padded_data_is_each_members_data_then_zeros():
    """The cohort's data stacks, built in one scatter, equal a fill member by member
    (exact: copies), with members of different sizes, an empty one and a single sample."""
    g = torch.Generator().manual_seed(0)
    sizes = [5, 0, 3, 1, 5]
    mem = [CohortMember({}, torch.randn(n, 2, 3, 3, generator=g),
                        torch.randint(0, 10, (n,), generator=g), []) for n in sizes]
    xs, ys = _padded_data(mem, torch.device("cpu"))
    assert xs.shape == (5, 5, 2, 3, 3) and ys.shape == (5, 5) and ys.dtype == torch.long
    for i, m in enumerate(mem):
        assert torch.equal(xs[i, : len(m.x)], m.x) and torch.equal(ys[i, : len(m.y)], m.y)
        assert not xs[i, len(m.x):].any() and not ys[i, len(m.y):].any()
    empty, _ = _padded_data(mem[1:2], torch.device("cpu"))
    assert empty.shape == (1, 1, 2, 3, 3) and not empty.any()
