"""server.bn_statistics: pooled statistics equal those of the clients' concatenated data
(float64), recalibrated ones a centralized pass over the union for the global model, on the
sequential and the vectorized engine; what is recorded; what is refused."""

import copy

import pytest
import torch
from bn_reference import assert_recalibrated, rounds  # tests/bn_reference.py
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

import fedsim
from fedsim import compat
from fedsim.arrays import record_to_state, state_to_record
from fedsim.client.bn_moments import upload_exact_moments
from fedsim.client.messages import BN_COUNTS
from fedsim.engine.inprocess import set_task_identity
from fedsim.errors import RunStopped, ScenarioError
from fedsim.models import build_model
from fedsim.server.bn_statistics import BNStatistics

F64 = 1e-12


def reply(arrays: dict, counts: dict | None, cid: int) -> Message:
    set_task_identity(1)
    instruction = Message(RecordDict(), dst_node_id=cid + 1, message_type=MessageType.TRAIN)
    compat.set_message_id(instruction, f"m{cid}")
    content = RecordDict({"arrays": state_to_record(arrays),
                          "metrics": MetricRecord({"num-examples": 1}),
                          "client": ConfigRecord({"client-id": cid})})
    if counts is not None:
        content[BN_COUNTS] = ConfigRecord(counts)
    return Message(content, reply_to=instruction)


def skewed_clients():
    g = torch.Generator().manual_seed(5)
    return [torch.randn(n, 1, 8, 8, generator=g, dtype=torch.float64) * s + m
            for n, m, s in ((6, -2.0, 0.5), (19, 1.0, 1.5), (3, 4.0, 0.2))]


def trained_model(k: int) -> torch.nn.Module:
    """A float64 CNN with BN whose weights differ per client (as after local training)."""
    torch.manual_seed(0)
    model = build_model("cnn", "bn", in_channels=1, image_size=8, num_classes=10,
                        width=4).double()
    g = torch.Generator().manual_seed(100 + k)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=torch.float64))
    return model


def layer_inputs_with_own_exact_statistics(model, x):
    """Reference for one client, with torch's own BatchNorm: its first BN layer's input
    (conv1(x)), then that layer's statistics set by a train-mode pass over all of x as one
    batch (momentum 1), then its second BN layer's input in eval mode."""
    ref = copy.deepcopy(model).eval()
    norm1 = ref.features[1]
    with torch.no_grad():
        h1 = ref.features[0](x)
        norm1.train()
        norm1.momentum = 1.0
        norm1(h1)
        norm1.eval()
        h2 = ref.features[:5](x)
    return h1, h2


def union(hs):
    u = torch.cat(hs).transpose(0, 1).reshape(hs[0].shape[1], -1)
    return u.mean(1), u.var(1, unbiased=True)


def test_pooled_statistics_equal_those_of_the_clients_concatenated_layer_inputs():
    """float64, hand-made clients of different sizes and label skew, each with its own
    trained weights: every client uploads exact moments (what handle_train uploads), the
    server pools them; each BN layer's global statistics are the mean and unbiased variance
    of the concatenation of the clients' inputs to that layer, each client's under its own
    model — the law of total variance, exactly. Averaging the variances is far off."""
    xs = skewed_clients()
    models = [trained_model(k) for k in range(len(xs))]
    replies, refs = [], []
    for cid, (model, x) in enumerate(zip(models, xs)):
        refs.append(layer_inputs_with_own_exact_statistics(model, x))
        arrays = dict(model.state_dict())
        counts = upload_exact_moments(model, x, arrays)
        assert counts == {"features.1": len(x) * 64, "features.5": len(x) * 64}
        replies.append(reply(arrays, counts, cid))
    step = BNStatistics("pooled", models[0], (1, 8, 8))
    assert step.train_config() == {"bn-moments": 1}
    start = state_to_record(dict(models[0].state_dict()))
    out, record = step.step(1, replies[::-1], start, grid=None)
    assert record == {"mode": "pooled", "applied": True, "layers": 2, "clients": 3}
    state = record_to_state(out)
    for name, i in (("features.1", 0), ("features.5", 1)):
        mean, var = union([r[i] for r in refs])
        torch.testing.assert_close(state[f"{name}.running_mean"], mean, rtol=F64, atol=F64)
        torch.testing.assert_close(state[f"{name}.running_var"], var, rtol=F64, atol=F64)
        w = torch.tensor([len(x) for x in xs], dtype=torch.float64)
        averaged = sum(wk * r[i].transpose(0, 1).reshape(r[i].shape[1], -1).var(1)
                       for wk, r in zip(w, refs)) / w.sum()
        assert (averaged < 0.9 * var).any()  # the between-client term FedAvg drops
    for key in ("features.0.weight", "features.5.num_batches_tracked"):  # left as aggregated
        assert torch.equal(state[key], record_to_state(start)[key])


def test_pooled_replies_without_moments_stop_the_round_naming_the_cause():
    model = trained_model(0)
    arrays = dict(model.state_dict())
    step = BNStatistics("pooled", model, (1, 8, 8))
    with pytest.raises(RunStopped, match="configure_train must pass on the config"):
        step.step(3, [reply(arrays, None, 0)], state_to_record(arrays), grid=None)
    average = BNStatistics("average", model, (1, 8, 8))
    same = state_to_record(arrays)
    assert average.step(1, [reply(arrays, None, 0)], same, None) == (same, {"mode": "average"})
    assert average.train_config() == {}


TINY = ["server.rounds=2", "partition.num_clients=6", "server.clients_per_round=4",
        "partition.holdout_clients=0.0", "model.width=8", "model.norm=bn", "client.epochs=1",
        "output.eval_clients=2"]


def test_recalibrate_equals_a_centralized_pass_over_the_union_sequential_and_vectorized(
        tmp_path):
    """After the last round's aggregation, every BN layer of the global model holds the
    statistics of a centralized pass over the union of that round's clients' training data
    with the new weights, on the sequential and the vectorized engine, whose runs agree
    within the bound the existing whole-run comparisons use."""
    sc = TINY + ["server.bn_statistics=recalibrate"]
    a = fedsim.run("scenarios/quickstart.toml", sc, out=tmp_path / "seq")
    b = fedsim.run("scenarios/quickstart.toml", sc + ["engine.vectorize=true",
                                                      "engine.cohort_size=3"],
                   out=tmp_path / "vec")
    for result in (a, b):
        assert_recalibrated(result.path, sc)
        recs = rounds(result.path)
        assert "bn_statistics" not in recs[0]
        for r in recs[1:]:
            bn = r["bn_statistics"]
            assert bn["mode"] == "recalibrate" and bn["applied"] and bn["layers"] == 2
            assert bn["clients"] == 4 and bn["messages"] == 8 and bn["bytes_uploaded"] > 0
            assert r["bn_seconds"] >= 0
        summary = result.summary["bn_statistics"]
        assert summary["mode"] == "recalibrate" and summary["rounds_applied"] == 2
        assert summary["layers"] == ["features.1", "features.5"] and not summary["noised"]
    sa = torch.load(a.path / "model.pt", weights_only=True)
    sb = torch.load(b.path / "model.pt", weights_only=True)
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=1e-3, atol=1e-3)


def test_pooled_runs_agree_sequential_and_vectorized_and_differ_from_average(tmp_path):
    sc = TINY + ["server.bn_statistics=pooled"]
    a = fedsim.run("scenarios/quickstart.toml", sc, out=tmp_path / "seq")
    b = fedsim.run("scenarios/quickstart.toml", sc + ["engine.vectorize=true",
                                                      "engine.cohort_size=3"],
                   out=tmp_path / "vec")
    c = fedsim.run("scenarios/quickstart.toml", TINY, out=tmp_path / "avg")
    sa, sb, sc_ = (torch.load(r.path / "model.pt", weights_only=True) for r in (a, b, c))
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=1e-3, atol=1e-3)
    assert not torch.allclose(sa["features.5.running_var"], sc_["features.5.running_var"])
    assert [r["bn_statistics"] for r in rounds(a.path)[1:]] == [
        {"mode": "pooled", "applied": True, "layers": 2, "clients": 4}] * 2
    assert [r["bn_statistics"] for r in rounds(c.path)[1:]] == [{"mode": "average"}] * 2
    assert c.summary["bn_statistics"]["rounds_applied"] == 0


def test_fixbn_freezes_the_pooled_statistics_of_its_warm_up(tmp_path):
    """FixBN uploads statistics during its warm-up only: the step pools them then, and after
    the freeze it finds none to pool and says so, leaving the frozen statistics as they are."""
    sc = TINY + ["server.rounds=3", "server.strategy=fixbn", "server.params.warmup=1",
                 "server.bn_statistics=pooled", "output.checkpoint_every=0"]
    run = fedsim.run("scenarios/quickstart.toml", sc, out=tmp_path / "fixbn")
    recs = rounds(run.path)
    assert recs[1]["bn_statistics"]["applied"] is True
    for r in recs[2:]:
        assert r["bn_statistics"]["applied"] is False
        assert "FixBN after its warm-up" in r["bn_statistics"]["reason"]
    assert run.summary["bn_statistics"]["rounds_applied"] == 1


@pytest.mark.parametrize("overrides,match", [
    (["model.norm=gn", "server.bn_statistics=pooled"], "needs BatchNorm running statistics"),
    (["server.strategy=fedbn", "server.bn_statistics=recalibrate"], "nothing to pool"),
    (["server.strategy=silobn", "server.bn_statistics=pooled"], "keep their BN running"),
    (["model.norm=ln", "model.bn_eval=batch"], "changes nothing"),
    (["model.arch=mlp", "model.bn_eval=batch"], "test batch of one sample"),
    (["server.bn_statistics=mean"], "use one of average, pooled, recalibrate"),
    (["model.bn_eval=test"], "use one of running, batch"),
])
def test_meaningless_settings_are_refused_before_anything_is_written(tmp_path, overrides,
                                                                      match):
    with pytest.raises(ScenarioError, match=match):
        fedsim.run("scenarios/quickstart.toml", TINY + overrides, out=tmp_path / "r")
    assert not (tmp_path / "r").exists()


def test_an_arrayrecord_keeps_its_order_and_dtypes_after_the_step():
    model = trained_model(1).float()
    arrays = dict(model.state_dict())
    x = skewed_clients()[1].float()
    counts = upload_exact_moments(copy.deepcopy(model), x, arrays)
    record = state_to_record(dict(model.state_dict()))
    out, _ = BNStatistics("pooled", model, (1, 8, 8)).step(1, [reply(arrays, counts, 0)],
                                                           record, None)
    assert isinstance(out, ArrayRecord) and list(out) == list(record)
    before, after = record_to_state(record), record_to_state(out)
    assert all(before[k].dtype == after[k].dtype for k in before)
