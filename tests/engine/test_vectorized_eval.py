"""Vectorized evaluation equals one client at a time: cold starts, saved arrays, any hook."""

import copy

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

import fedsim.engine.vectorized_eval as vectorized_eval
from fedsim.arrays import model_to_record, state_to_record
from fedsim.client.app import handle_evaluate
from fedsim.client.hooks import CLIENT_HOOKS, ClientHook, estimate_statistics
from fedsim.client.runtime import shared_runtime
from fedsim.client.train import evaluate
from fedsim.config import load_scenario
from fedsim.engine.inprocess import InProcessGrid, set_task_identity
from fedsim.engine.vectorized_eval import CohortEvaluator, EvalMember, evaluate_cohort
from fedsim.models import build_model
from fedsim.models.batched import fold_for_cohort

NORMS = ["bn", "hybrid", "gn", "ln", "in", "none"]


def data(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def one_at_a_time(model, members, bn_eval="running"):
    """The reference: each member loaded into a copy of the model, its cold start done by
    ``estimate_statistics``, then ``evaluate``."""
    out = []
    for m in members:
        ref = copy.deepcopy(model)
        ref.load_state_dict({**m.params, **m.buffers})
        if m.estimate_x is not None:
            layers = [ref.get_submodule(name) for name in m.estimate_layers]
            estimate_statistics(ref, m.estimate_x, layers)
        out.append(evaluate(ref, m.x, m.y, bn_eval=bn_eval))
    return out


def mixed_members(model):
    """Members with shared and per-client arrays, test splits of 5, 8, 1, 0, 8 and 7
    samples, and cold starts over 40, 3 and 300 train samples (one, one and two AdaBN
    chunks)."""
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    stat_layers = tuple(n for n, m in model.named_modules()
                        if getattr(m, "running_mean", None) is not None)
    members = []
    for i, (n_test, n_train, own) in enumerate([(5, 40, False), (8, 3, True), (1, 300, False),
                                                 (0, 40, True), (8, 0, False), (7, 40, True)]):
        p, b = dict(params), dict(buffers)
        if own:  # this client's own head and (where it has them) running statistics
            g = torch.Generator().manual_seed(i)
            p["head.bias"] = torch.randn(p["head.bias"].shape, generator=g)
            for name in b:
                if name.endswith("running_mean"):
                    b[name] = torch.randn(b[name].shape, generator=g) * 0.1
        x, y = data(n_test, seed=i)
        cold = i % 3 != 1 and stat_layers
        members.append(EvalMember(p, b, x, y, data(n_train, seed=100 + i)[0] if cold else None,
                                  stat_layers if cold else ()))
    return members


@pytest.mark.parametrize("fold", ["fold", "vmap-rule", "3 samples per call"])
@pytest.mark.parametrize("arch,norm", [("cnn", n) for n in NORMS] + [("mlp", "bn")])
def test_cohort_evaluation_equals_evaluate_per_client(arch, norm, fold, monkeypatch,
                                                      vmap_rules):
    """Members with shared and per-client arrays, test splits of 5, 8, 1 and 0 samples, and
    cold starts over 40, 3 and 300 train samples (one, one and two AdaBN chunks): each
    member's loss, accuracy and count equal ``estimate_statistics`` + ``evaluate``; also
    when a memory budget of 3 samples per call splits the cohort and each test split."""
    if fold == "3 samples per call":
        monkeypatch.setattr(vectorized_eval, "MAX_ELEMENTS", 3 * 64)
    if fold == "vmap-rule":
        vmap_rules()
    torch.manual_seed(0)
    model = build_model(arch, norm, in_channels=1, image_size=8, num_classes=10, width=8,
                        groups=4)
    members = mixed_members(model)
    results = evaluate_cohort(fold_for_cohort(model), members)
    assert len(results) == len(members)
    for m, (loss, acc, n), (e_loss, e_acc, e_n) in zip(members, results,
                                                        one_at_a_time(model, members)):
        assert n == e_n == len(m.y)
        if n == 0:
            assert loss != loss and acc != acc  # nan, as evaluate gives
            continue
        assert loss == pytest.approx(e_loss, rel=1e-5, abs=1e-6)
        assert acc == e_acc


@pytest.mark.parametrize("fold", ["fold", "vmap-rule", "3 samples per call"])
@pytest.mark.parametrize("arch,norm", [("cnn", "bn"), ("cnn", "hybrid"), ("resnet", "bn")])
def test_cohort_evaluation_with_batch_statistics_equals_evaluate_per_client(
        arch, norm, fold, monkeypatch, vmap_rules):
    """model.bn_eval = "batch": the same members (two with splits of 8 run together, a split
    of one is its own batch) give each client's ``evaluate(..., bn_eval="batch")``, and the
    members' arrays are left as they were."""
    if fold == "3 samples per call":
        monkeypatch.setattr(vectorized_eval, "MAX_ELEMENTS", 3 * 64)
    if fold == "vmap-rule":
        vmap_rules()
    torch.manual_seed(0)
    model = build_model(arch, norm, in_channels=1, image_size=8, num_classes=10, width=8)
    members = mixed_members(model)
    before = [{k: v.clone() for k, v in m.buffers.items()} for m in members]
    results = evaluate_cohort(fold_for_cohort(model), members, bn_eval="batch")
    expected = one_at_a_time(model, members, bn_eval="batch")
    running = one_at_a_time(model, members)
    for m, (loss, acc, n), (e_loss, e_acc, e_n), r in zip(members, results, expected, running):
        assert n == e_n == len(m.y)
        if n == 0:
            assert loss != loss and acc != acc
            continue
        assert loss == pytest.approx(e_loss, rel=1e-5, abs=1e-6)
        assert acc == e_acc
        assert loss != pytest.approx(r[0], rel=1e-4)  # not the running statistics' result
    for m, b in zip(members, before):
        assert all(torch.equal(m.buffers[k], v) for k, v in b.items())


def test_cohort_evaluation_leaves_module_settings_as_it_found_them():
    model = build_model("cnn", "bn", in_channels=1, image_size=8, num_classes=10, width=8)
    model.train()
    bn = [n for n, m in model.named_modules() if getattr(m, "running_mean", None) is not None]
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    before = copy.deepcopy(model.state_dict())
    evaluate_cohort(model, [EvalMember(params, buffers, *data(4, 0), data(9, 1)[0], tuple(bn))])
    assert model.training
    assert all(model.get_submodule(n).momentum == 0.1 for n in bn)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the model is untouched
    assert all(torch.equal(buffers[k], model.state_dict()[k]) for k in buffers)  # inputs too
    assert evaluate_cohort(model, []) == []


# --------------------------------------------------------------------------- messages


@CLIENT_HOOKS.register("test-eval-head")
class OwnHead(ClientHook):
    """A hook that shifts the received head bias by the client id (on top of FedBN's
    layers): the evaluator must give it the client's arrays, as handle_evaluate does."""

    def on_receive(self, model, arrays):
        arrays["head.bias"] = arrays["head.bias"] + float(self.ctx.client_id)


def fedbn_setting(clients: int = 8, holdout: float = 0.0):
    """A small FedBN quickstart under feature skew: scenario, client runtime, BN keys."""
    import strategies  # noqa: F401  (registers the fedbn hook)

    set_task_identity(1)
    scenario = load_scenario("scenarios/quickstart.toml", [
        f"partition.num_clients={clients}", f"partition.holdout_clients={holdout}",
        "model.width=8", "model.norm=bn", "server.strategy=fedbn", "partition.kind=feature",
        "server.clients_per_round=3"])
    rt = shared_runtime(scenario)
    norm = [k for k in rt.model.state_dict() if k.startswith(("features.1.", "features.5."))]
    return scenario, rt, norm


def saved_state(rt, norm, node):
    g = torch.Generator().manual_seed(node)
    saved = {k: (torch.tensor(7 * node) if k.endswith("num_batches_tracked") else
                 torch.rand_like(v, generator=g) + 0.5)
             for k, v in rt.model.state_dict().items() if k in norm}
    return RecordDict({"fedbn.local": state_to_record(saved)})


@pytest.mark.parametrize("hooks", ["fedbn", "fedbn,test-eval-head"])
def test_cohort_evaluator_replies_like_handle_evaluate(hooks):
    """Odd nodes hold saved FedBN layers, even nodes never trained (cold start); node 99
    does not exist (its own error reply). With a non-array hook beside FedBN's, every
    client runs the hooks eagerly, and the replies are still handle_evaluate's."""
    scenario, rt, norm = fedbn_setting()
    arrays = model_to_record(rt.model)
    config = ConfigRecord({"personalized": 1, "client-hooks": hooks})
    nodes = (1, 2, 3, 4, 99, 5)

    def messages_and_contexts():
        pairs = []
        for node in nodes:
            state = saved_state(rt, norm, node) if node % 2 else RecordDict()
            ctx = Context(run_id=1, node_id=node, node_config={"partition-id": node - 1},
                          state=state, run_config={})
            msg = Message(RecordDict({"arrays": arrays, "config": config}), node,
                          MessageType.EVALUATE)
            pairs.append((msg, ctx))
        return pairs

    sequential = [handle_evaluate(m, c, rt) if c.node_id != 99 else None
                  for m, c in messages_and_contexts()]
    pairs = messages_and_contexts()
    vectorized = CohortEvaluator(rt)([m for m, _ in pairs], [c for _, c in pairs])
    for node, a, b in zip(nodes, sequential, vectorized):
        if node == 99:
            assert b.has_error() and "partition-id 98 is outside" in b.error.reason
            continue
        assert not b.has_error(), b.error.reason if b.has_error() else ""
        assert dict(a.content.config_records["client"]) == dict(b.content.config_records["client"])
        ma, mb = a.content.metric_records["metrics"], b.content.metric_records["metrics"]
        assert ma["num-examples"] == mb["num-examples"]
        assert ma["eval_accuracy"] == mb["eval_accuracy"]
        assert ma["eval_loss"] == pytest.approx(mb["eval_loss"], rel=1e-5)
    accs = {float(r.content.metric_records["metrics"]["eval_accuracy"])
            for r in vectorized if not r.has_error()}
    assert len(accs) > 1  # the clients' models really differ


def test_a_cold_start_really_reestimates_the_statistics():
    """A cold start changes the result: evaluating with the global statistics instead
    would give different losses (so the equality above tests the estimation)."""
    scenario, rt, norm = fedbn_setting()
    arrays = model_to_record(rt.model)
    ctx = Context(run_id=1, node_id=2, node_config={"partition-id": 1}, state=RecordDict(),
                  run_config={})
    with_hook = Message(RecordDict({"arrays": arrays, "config": ConfigRecord(
        {"client-hooks": "fedbn"})}), 2, MessageType.EVALUATE)
    without = Message(RecordDict({"arrays": arrays, "config": ConfigRecord()}), 2,
                      MessageType.EVALUATE)
    a, b = CohortEvaluator(rt)([with_hook, without], [ctx, ctx])
    la = a.content.metric_records["metrics"]["eval_loss"]
    lb = b.content.metric_records["metrics"]["eval_loss"]
    assert abs(la - lb) > 1e-3


def test_grid_hands_evaluate_messages_to_the_cohort_evaluator_in_cohorts():
    """Cohorts of ``cohort_size`` per message type; each message gets its own reply back."""
    from fedsim.client.app import make_client_app

    scenario, rt, norm = fedbn_setting()
    seen = []

    def evaluator(msgs, contexts):
        seen.append([m.metadata.dst_node_id for m in msgs])
        return CohortEvaluator(rt)(msgs, contexts)

    grid = InProcessGrid(make_client_app(rt), 8, cohort_evaluator=evaluator,
                         cohort_size=3)
    arrays = model_to_record(rt.model)
    config = ConfigRecord({"client-hooks": "fedbn"})
    msgs = [Message(RecordDict({"arrays": arrays, "config": config}), n, MessageType.EVALUATE)
            for n in range(1, 8)]
    replies = list(grid.send_and_receive(msgs))
    assert seen == [[1, 2, 3], [4, 5, 6], [7]]
    assert [r.metadata.src_node_id for r in replies] == list(range(1, 8))
    sequential = [handle_evaluate(m, grid.context(m.metadata.dst_node_id), rt)
                  for m in msgs]
    for a, b in zip(sequential, replies):
        assert a.content.metric_records["metrics"]["eval_accuracy"] == \
            b.content.metric_records["metrics"]["eval_accuracy"]


def test_holdout_cohorts_equal_the_sequential_holdout_evaluation():
    from fedsim.server.evaluate import Evaluator
    from fedsim.server.personalized import PersonalizedEvaluator

    scenario, rt, _ = fedbn_setting(clients=10, holdout=0.5)
    data = rt.data
    device = torch.device("cpu")
    evaluator = Evaluator(scenario.output, scenario.seed, data, rt.model, device)

    class NoGrid:
        def get_node_ids(self):
            return []

        def nodes_of(self, clients):
            return []

    arrays = model_to_record(rt.model)
    accs = []
    for cohort in (None, 2):
        personal = PersonalizedEvaluator(("fedbn",), NoGrid(), evaluator, data, rt.model,
                                         device, cohort_size=cohort)
        accs.append(personal._holdout(arrays))
    assert len(accs[0]) == len(data.holdout) == 5
    assert accs[0] == accs[1]


def test_whole_run_evaluations_equal_the_one_at_a_time_reference(tmp_path, monkeypatch):
    """A vectorized FedBN run with federated evaluation, personalized evaluation and holdout
    clients, then the same run with the cohort kernel replaced by the one-at-a-time
    reference: training is identical, so every evaluation metric must agree."""
    import json

    import fedsim

    overrides = ["server.rounds=2", "partition.num_clients=8", "server.clients_per_round=4",
                 "partition.holdout_clients=0.25", "model.width=8", "model.norm=bn",
                 "server.strategy=fedbn", "server.fraction_evaluate=0.5",
                 "output.eval_every=1", "engine.vectorize=true", "engine.cohort_size=3"]
    a = fedsim.run("scenarios/quickstart.toml", overrides, out=tmp_path / "cohorts")
    monkeypatch.setattr(vectorized_eval, "evaluate_cohort", one_at_a_time)
    b = fedsim.run("scenarios/quickstart.toml", overrides, out=tmp_path / "reference")
    ra, rb = (json.loads((r.path / "rounds.jsonl").read_text().splitlines()[-1]) for r in (a, b))
    assert set(ra["federated_evaluation"]) >= {"eval_loss", "eval_accuracy"}
    assert not a.summary["failures"]
    for key in ("personalized_accuracy", "personalized_holdout_accuracy"):
        assert ra[key]["n"] > 0
        for stat, value in ra[key].items():
            assert value == pytest.approx(rb[key][stat], rel=1e-9), (key, stat)
    for key, value in ra["federated_evaluation"].items():
        assert value == pytest.approx(rb["federated_evaluation"][key], rel=1e-5), key
