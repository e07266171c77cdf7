"""The cohort backend answers server.bn_statistics and model.bn_eval as one client at a time
does: exact moments in train replies ("pooled"), recalibration queries, and evaluation with
batch statistics."""

import copy
import dataclasses

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

from fedsim import compat
from fedsim.arrays import model_to_record, peek_array, record_to_state
from fedsim.client.app import handle_bn_moments, handle_evaluate, handle_train
from fedsim.client.messages import BN_COUNTS, BN_LAYER_KEY, BN_MOMENTS, BN_MOMENTS_KEY
from fedsim.client.runtime import shared_runtime
from fedsim.config import load_scenario
from fedsim.engine.cohort_moments import CohortMoments
from fedsim.engine.inprocess import set_task_identity
from fedsim.engine.vectorized import CohortTrainer
from fedsim.engine.vectorized_eval import CohortEvaluator
from fedsim.models.bn_statistics import bn_layers

NODES = (1, 2, 4, 5)  # clients of different sizes (Dirichlet label skew)


def bn_quickstart(norm: str = "bn", bn_eval: str = "running"):
    set_task_identity(1)
    scenario = load_scenario("scenarios/quickstart.toml", [
        "partition.num_clients=6", "partition.holdout_clients=0.0", "model.width=8",
        "server.clients_per_round=3",
        f"model.norm={norm}", f"model.bn_eval={bn_eval}", "client.epochs=1"])
    return scenario, model_to_record(shared_runtime(scenario).model)


def contexts():
    return [Context(run_id=1, node_id=n, node_config={"partition-id": n - 1},
                    state=RecordDict(), run_config={}) for n in NODES]


def message(arrays, config, node, kind):
    m = Message(RecordDict({"arrays": arrays, "config": config}), node, kind)
    compat.set_message_id(m, f"{kind}{node}")
    return m


@pytest.mark.parametrize("norm", ["bn", "hybrid"])
def test_cohort_trainer_uploads_the_exact_moments_handle_train_uploads(norm):
    """With the "pooled" flag both backends replace the uploaded running statistics by the
    exact moments under the client's trained weights and report the same counts; without
    it the upload holds BN's running averages, which differ."""
    scenario, arrays = bn_quickstart(norm)
    rt = shared_runtime(scenario)
    config = ConfigRecord({"server-round": 1, BN_MOMENTS_KEY: 1})
    seq = [handle_train(message(arrays, config, n, MessageType.TRAIN), c, rt)
           for n, c in zip(NODES, contexts())]
    vec = CohortTrainer(rt)([message(arrays, config, n, MessageType.TRAIN) for n in NODES],
                            contexts())
    plain = handle_train(message(arrays, ConfigRecord({"server-round": 1}), NODES[0],
                                 MessageType.TRAIN), contexts()[0], rt)
    layers = [n for n, _ in bn_layers(rt.model, (1, 8, 8))]
    assert layers == ["features.1", "features.5"]
    for a, b in zip(seq, vec):
        assert not a.has_error() and not b.has_error()
        ca = dict(a.content.config_records[BN_COUNTS])
        assert ca == dict(b.content.config_records[BN_COUNTS]) and list(ca) == layers
        n = a.content.metric_records["metrics"]["num-examples"]
        assert ca["features.1"] == n * 64 and ca["features.5"] == n * 64  # 8×8 maps
        sa, sb = (record_to_state(r.content.array_records["arrays"]) for r in (a, b))
        for k in sa:
            torch.testing.assert_close(sa[k], sb[k], rtol=1e-4, atol=1e-5)
    s_plain = record_to_state(plain.content.array_records["arrays"])
    s_exact = record_to_state(seq[0].content.array_records["arrays"])
    assert BN_COUNTS not in plain.content
    assert not torch.allclose(s_plain["features.5.running_var"], s_exact["features.5.running_var"])
    torch.testing.assert_close(s_plain["features.0.weight"], s_exact["features.0.weight"])


def test_cohort_moments_answer_recalibration_queries_as_handle_bn_moments():
    scenario, arrays = bn_quickstart()
    rt = shared_runtime(scenario)
    for layer in ("features.1", "features.5"):
        config = ConfigRecord({BN_LAYER_KEY: layer, "server-round": 1})
        seq = [handle_bn_moments(message(arrays, config, n, BN_MOMENTS), c, rt)
               for n, c in zip(NODES, contexts())]
        vec = CohortMoments(rt)([message(arrays, config, n, BN_MOMENTS) for n in NODES],
                                contexts())
        for node, a, b in zip(NODES, seq, vec):
            assert not a.has_error() and not b.has_error()
            assert dict(a.content.config_records["client"]) == \
                dict(b.content.config_records["client"])
            assert a.content.config_records["client"]["count"] == \
                len(rt.client_train(rt.data.participating[node - 1])[0]) * 64
            for key in ("mean", "var"):
                va = peek_array(a.content.array_records["moments"][key])
                vb = peek_array(b.content.array_records["moments"][key])
                assert va.dtype == vb.dtype == np.float64
                np.testing.assert_allclose(va, vb, rtol=1e-5, atol=1e-6)
    bad = message(arrays, ConfigRecord({BN_LAYER_KEY: "features.9"}), 1, BN_MOMENTS)
    replies = CohortMoments(rt)([bad, message(arrays, config, 2, BN_MOMENTS)], contexts()[:2])
    assert replies[0].has_error() and not replies[1].has_error()


def test_cohort_evaluator_with_batch_statistics_equals_handle_evaluate():
    """model.bn_eval = "batch" in federated evaluation: both backends normalise each client's
    test split with its own statistics (clients of equal split size run together), leave
    the model's buffers alone, and differ from running-statistics evaluation."""
    scenario, arrays = bn_quickstart(bn_eval="batch")
    rt = shared_runtime(scenario)
    with torch.no_grad():  # statistics far from the data's
        model = copy.deepcopy(rt.model)
        for m in model.modules():
            if hasattr(m, "running_var"):
                m.running_var.fill_(9.0)
    arrays = model_to_record(model)
    config = ConfigRecord({"server-round": 1})
    seq = [handle_evaluate(message(arrays, config, n, MessageType.EVALUATE), c, rt)
           for n, c in zip(NODES, contexts())]
    vec = CohortEvaluator(rt)([message(arrays, config, n, MessageType.EVALUATE) for n in NODES],
                              contexts())
    running = dataclasses.replace(rt.settings, bn_eval="running")
    rt_running = dataclasses.replace(rt, settings=running)
    other = [handle_evaluate(message(arrays, config, n, MessageType.EVALUATE), c, rt_running)
             for n, c in zip(NODES, contexts())]
    for a, b, r in zip(seq, vec, other):
        ma, mb = a.content.metric_records["metrics"], b.content.metric_records["metrics"]
        assert ma["num-examples"] == mb["num-examples"]
        assert ma["eval_accuracy"] == mb["eval_accuracy"]
        assert ma["eval_loss"] == pytest.approx(mb["eval_loss"], rel=1e-5)
        assert ma["eval_loss"] != pytest.approx(r.content.metric_records["metrics"]["eval_loss"],
                                                rel=1e-3)
    handle_evaluate(message(arrays, config, 1, MessageType.EVALUATE), contexts()[0], rt)
    assert (rt.model.features[1].running_var == 9.0).all()  # loaded, then left alone


@pytest.mark.parametrize("chunk", [3, 1000])
def test_cohort_exact_statistics_equal_each_members_own_exact_pass_float64(chunk, monkeypatch):
    """Members with their own weights and 13, 1, 8 and 21 samples (chunks of 3 samples run
    shrinking prefixes of the size-ordered cohort): each member's statistics and counts are
    exact_statistics on its own model, to float64 rounding."""
    import fedsim.engine.cohort_moments as cohort_moments
    from fedsim.engine.cohort_moments import cohort_exact_statistics
    from fedsim.models import build_model
    from fedsim.models.batched import fold_for_cohort
    from fedsim.models.bn_statistics import exact_statistics

    monkeypatch.setattr(cohort_moments, "EXACT_CHUNK", chunk)
    torch.manual_seed(0)
    model = build_model("resnet", "bn", in_channels=1, image_size=8, num_classes=10,
                        width=4).double()
    g = torch.Generator().manual_seed(1)
    states, data, expected = [], [], []
    for n in (13, 1, 8, 21):
        own = copy.deepcopy(model)
        with torch.no_grad():
            for p in own.parameters():
                p.add_(0.2 * torch.randn(p.shape, generator=g, dtype=torch.float64))
        x = torch.randn(n, 1, 8, 8, generator=g, dtype=torch.float64) + n / 10
        states.append({k: v.clone() for k, v in own.state_dict().items()})
        data.append(x)
        counts = exact_statistics(own, x, bn_layers(own, (1, 8, 8)))
        expected.append((counts, own.state_dict()))
    cohort = fold_for_cohort(model)
    got = cohort_exact_statistics(cohort, states, data, bn_layers(cohort, (1, 8, 8)))
    for state, counts, (ref_counts, ref_state) in zip(states, got, expected):
        assert counts == ref_counts
        for key, value in ref_state.items():
            torch.testing.assert_close(state[key], value, rtol=1e-12, atol=1e-12)
