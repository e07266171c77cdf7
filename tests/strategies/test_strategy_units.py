"""Strategy pieces in isolation: hooks, layer selection, aggregation, control variates."""

import numpy as np
import pytest
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from torch import nn

from fedsim import compat
from fedsim.arrays import model_to_record
from fedsim.client.hooks import (
    CLIENT_HOOKS,
    HookContext,
    ProximalHook,
    extra_key,
    hooks_for,
    norm_keys,
    norm_statistics_keys,
    receive,
    request_hooks,
    split_extra,
)
from fedsim.client.train import train_local
from fedsim.config import ClientConfig
from fedsim.engine.inprocess import set_task_identity
from fedsim.models import build_model
from fedsim.registry import Registry
from fedsim.server.strategies import STRATEGIES, accepted_params, strategy_class
from strategies.common import keep_absent
from strategies.fedbn import FedBN, FedBNHook
from strategies.fixbn import FixBN, FixBNHook
from strategies.scaffold import SERVER_RECORD, STATE_KEY, Scaffold, ScaffoldHook
from strategies.silobn import SiloBNHook


def model(norm="bn", seed=0, arch="cnn"):
    torch.manual_seed(seed)
    return build_model(arch, norm, in_channels=1, image_size=8, num_classes=10, width=8)


def data(n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def reply(arrays: ArrayRecord, n: int, node: int = 1) -> Message:
    """A train reply as a client would send it (Flower needs a task identity to build one)."""
    set_task_identity(1)
    instruction = Message(RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)
    compat.set_message_id(instruction, f"m{node}")
    content = RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": n})})
    return Message(content, reply_to=instruction)


def test_norm_layers_are_selected_by_type_for_every_norm():
    bn = model("bn")
    assert norm_keys(bn) == ["features.1.weight", "features.1.bias", "features.1.running_mean",
                             "features.1.running_var", "features.1.num_batches_tracked",
                             "features.5.weight", "features.5.bias", "features.5.running_mean",
                             "features.5.running_var", "features.5.num_batches_tracked"]
    assert norm_statistics_keys(bn) == [k for k in norm_keys(bn) if "running" in k
                                        or "num_batches" in k]
    for norm in ("gn", "ln", "in"):
        m = model(norm)
        assert norm_keys(m) and all(k.endswith(("weight", "bias")) for k in norm_keys(m))
        assert norm_statistics_keys(m) == []
    hybrid = model("hybrid")
    assert any(k.endswith("theta") for k in norm_keys(hybrid))
    assert model("none") and norm_keys(model("none")) == []
    # a renamed layer is still found: selection never looks at names
    plain = nn.Sequential()
    plain.add_module("not_a_norm_name", nn.BatchNorm2d(3))
    assert norm_keys(plain)[0].startswith("not_a_norm_name.")


def test_request_hooks_and_split_extra():
    config = ConfigRecord({"client-hooks": "proximal"})
    request_hooks(config, "fedbn", "proximal")
    assert config["client-hooks"] == "proximal,fedbn"
    rec = ArrayRecord({"w": Array(np.ones(2)), extra_key("scaffold", "w"): Array(np.zeros(2))})
    model_part, extras = split_extra(rec)
    assert list(model_part.keys()) == ["w"] and list(extras) == ["scaffold"]
    assert list(extras["scaffold"]) == ["w"]


def test_keep_absent_is_bitwise_and_refuses_unknown_keys():
    current = ArrayRecord({"a": Array(np.arange(3.0)), "bn": Array(np.array([0.1, 0.2]))})
    agg = ArrayRecord({"a": Array(np.ones(3))})
    out = keep_absent(agg, current)
    assert list(out.keys()) == ["a", "bn"]
    assert out["bn"].numpy().tobytes() == current["bn"].numpy().tobytes()
    with pytest.raises(ValueError, match="does not have"):
        keep_absent(ArrayRecord({"x": Array(np.ones(1))}), current)


def test_fedbn_aggregation_leaves_norm_layers_bitwise_and_averages_the_rest():
    global_model = model("bn", seed=0)
    current = model_to_record(global_model)
    strategy = FedBN(fraction_train=1.0, min_train_nodes=2, min_available_nodes=2)
    strategy.current_arrays = current
    local = set(norm_keys(global_model))
    uploads = []
    for seed, n in ((1, 10), (2, 30)):
        state = model("bn", seed=seed).state_dict()
        uploads.append(({k: v for k, v in state.items() if k not in local}, n))
    replies = [reply(model_to_record_dict(u), n, node=i + 1) for i, (u, n) in enumerate(uploads)]
    agg, _ = strategy.aggregate_train(1, replies)
    assert list(agg.keys()) == list(current.keys())
    for key in local:
        assert agg[key].numpy().tobytes() == current[key].numpy().tobytes(), key
    w = uploads[0][0]["head.weight"].numpy() * 0.25 + uploads[1][0]["head.weight"].numpy() * 0.75
    np.testing.assert_allclose(agg["head.weight"].numpy(), w, rtol=1e-6)


def model_to_record_dict(state):
    return ArrayRecord({k: Array(v.detach().numpy().copy()) for k, v in state.items()})


def test_local_arrays_hook_saves_strips_and_restores_exactly():
    m = model("bn")
    x, y = data()
    state = RecordDict()
    hook = FedBNHook(HookContext(0, ConfigRecord(), state))
    receive(m, [hook])  # nothing saved: trains from the global layers
    train_local(m, x, y, ClientConfig(lr=0.1), torch.Generator().manual_seed(0), [hook])
    trained = {k: v.clone() for k, v in m.state_dict().items()}
    upload = hook.on_reply(m, m.state_dict())
    assert not set(upload) & set(norm_keys(m)) and set(upload) | set(norm_keys(m)) == set(trained)
    fresh = model("bn", seed=5)  # another client's layers in the shared model object
    receive(fresh, [FedBNHook(HookContext(0, ConfigRecord(), state))])
    for key in norm_keys(m):
        assert torch.equal(fresh.state_dict()[key], trained[key]), key
    silo = SiloBNHook(HookContext(0, ConfigRecord(), RecordDict()))
    kept = set(model("bn").state_dict()) - set(silo.on_reply(m, m.state_dict()))
    assert kept == set(norm_statistics_keys(m))


def test_cold_start_reestimates_bn_statistics_on_local_data():
    m = model("bn")
    x, _ = data(n=40)
    ctx = HookContext(3, ConfigRecord(), RecordDict(), mode="evaluate",
                      local_train=lambda: (x, None))
    receive(m, [FedBNHook(ctx)], ctx.local_train)
    first = m.features[0](x)  # the input of the first BN layer
    var, mean = torch.var_mean(first, dim=(0, 2, 3), correction=1)
    torch.testing.assert_close(m.features[1].running_mean, mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m.features[1].running_var, var, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="local_train"):
        receive(m, [FedBNHook(HookContext(3, ConfigRecord(), RecordDict(), mode="evaluate"))])


def test_fedprox_mu_pulls_the_client_towards_the_global_model():
    x, y = data(n=64)
    drift = {}
    for mu in (0.0, 1.0):
        m = model("gn")
        start = [p.detach().clone() for p in m.parameters()]
        hooks = hooks_for(HookContext(0, ConfigRecord({"proximal-mu": mu}), RecordDict()))
        assert [type(h) for h in hooks] == [ProximalHook]  # activated by Flower's key alone
        receive(m, hooks)
        train_local(m, x, y, ClientConfig(lr=0.1, epochs=3), torch.Generator().manual_seed(0),
                    hooks)
        drift[mu] = torch.sqrt(sum(((p - s) ** 2).sum() for p, s in zip(m.parameters(), start)))
    assert drift[1.0] < 0.9 * drift[0.0], drift


def test_fixbn_hook_trains_with_frozen_statistics_and_does_not_upload_them():
    m = model("bn")
    x, y = data()
    m.features[1].running_mean.fill_(0.3)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    hook = FixBNHook(HookContext(0, ConfigRecord(), RecordDict()))
    train_local(m, x, y, ClientConfig(lr=0.1), torch.Generator().manual_seed(0), [hook])
    after = m.state_dict()
    for key in norm_statistics_keys(m):
        assert torch.equal(after[key], before[key]), key  # statistics frozen
    assert not torch.equal(after["features.1.weight"], before["features.1.weight"])  # γ learns
    assert not set(hook.on_reply(m, after)) & set(norm_statistics_keys(m))


def test_fixbn_lr_scale_scales_the_frozen_phase_step_exactly():
    """A scale of 1/4 at lr 0.4 trains bitwise as lr 0.1 unscaled (powers of two are exact
    in float); the scale reaches clients only in frozen rounds, and only when it is not 1."""
    x, y = data()
    trained = {}
    for lr, scale in [(0.4, 0.25), (0.1, None)]:
        m = model("bn")
        config = ConfigRecord({} if scale is None else {"fixbn-lr-scale": scale})
        hook = FixBNHook(HookContext(0, config, RecordDict()))
        train_local(m, x, y, ClientConfig(lr=lr, local_steps=3), torch.Generator().manual_seed(0),
                    [hook])
        trained[lr] = m.state_dict()
    for key, value in trained[0.1].items():
        assert torch.equal(trained[0.4][key], value), key

    class TwoNodes:
        def get_node_ids(self):
            return [1, 2]

    def sent(strategy, server_round):
        set_task_identity(1)
        grid = TwoNodes()
        message = next(iter(strategy.configure_train(server_round, ArrayRecord(), ConfigRecord(),
                                                     grid)))
        return dict(message.content["config"])

    scaled = FixBN(warmup=1, lr_scale=0.1, fraction_train=1.0, min_train_nodes=1,
                   min_available_nodes=1)
    assert "fixbn-lr-scale" not in sent(scaled, 1)
    assert sent(scaled, 2)["fixbn-lr-scale"] == 0.1
    plain = FixBN(warmup=1, fraction_train=1.0, min_train_nodes=1, min_available_nodes=1)
    assert "fixbn-lr-scale" not in sent(plain, 2)
    with pytest.raises(ValueError, match="lr_scale must be in"):
        FixBN(lr_scale=1.5)


def test_fixbn_server_freezes_statistics_only_after_warmup():
    strategy = FixBN(warmup=2, fraction_train=1.0, min_train_nodes=1, min_available_nodes=1)
    assert [strategy.frozen(r) for r in (1, 2, 3)] == [False, False, True]
    current = ArrayRecord({"w": Array(np.zeros(2, np.float32)),
                           "bn.running_mean": Array(np.full(2, 0.5, np.float32))})
    strategy.current_arrays = current
    agg, _ = strategy.aggregate_train(3, [reply(ArrayRecord({"w": Array(np.ones(2, np.float32))}),
                                                5)])
    assert agg["bn.running_mean"].numpy().tobytes() == current["bn.running_mean"].numpy().tobytes()
    np.testing.assert_array_equal(agg["w"].numpy(), 1.0)


def test_scaffold_client_control_variate_follows_option_ii():
    m = model("gn")
    x, y = data()
    state = RecordDict()
    lr = 0.1
    hook = ScaffoldHook(HookContext(0, ConfigRecord(), state, message=RecordDict()))
    receive(m, [hook])  # no server c yet, no c_i: both zero, so plain SGD
    start = {n: p.detach().clone() for n, p in m.named_parameters()}
    res = train_local(m, x, y, ClientConfig(lr=lr), torch.Generator().manual_seed(0), [hook])
    upload = hook.on_reply(m, m.state_dict())
    for name, p in m.named_parameters():
        expected = (start[name] - p.detach()) / (res.steps * lr)
        torch.testing.assert_close(upload[extra_key("scaffold", name)], expected)
        np.testing.assert_allclose(state[STATE_KEY][name].numpy(), expected.numpy(), rtol=1e-6)
    # next round: the correction c − c_i enters the gradient exactly
    c = {n: np.full(tuple(p.shape), 0.01, np.float32) for n, p in m.named_parameters()}
    message = RecordDict({SERVER_RECORD: ArrayRecord({n: Array(v) for n, v in c.items()})})
    nxt = ScaffoldHook(HookContext(0, ConfigRecord(), state, message=message))
    params = {n: p.detach() for n, p in m.named_parameters()}
    correction = nxt.step_state(params)
    zeros = {n: torch.zeros_like(p) for n, p in params.items()}
    name = next(iter(params))
    expected_grad = torch.from_numpy(c[name] - state[STATE_KEY][name].numpy())
    torch.testing.assert_close(nxt.grad_transform(zeros, correction)[name], expected_grad)


def test_scaffold_server_splits_deltas_and_updates_c():
    strategy = Scaffold(fraction_train=1.0, min_train_nodes=2, min_available_nodes=2)
    strategy.num_nodes = 4
    replies = []
    for i, (w, dc) in enumerate(((1.0, 2.0), (3.0, 6.0))):
        rec = ArrayRecord({"w": Array(np.full(2, w, np.float32)),
                           extra_key("scaffold", "w"): Array(np.full(2, dc, np.float32))})
        replies.append(reply(rec, 10, node=i + 1))
    agg, _ = strategy.aggregate_train(1, replies)
    assert list(agg.keys()) == ["w"]
    np.testing.assert_allclose(agg["w"].numpy(), 2.0)
    np.testing.assert_allclose(strategy.c["w"], (2 / 4) * 4.0)  # c += |S|/N · mean(Δc)
    with pytest.raises(ValueError, match="scaffold"):
        strategy.aggregate_train(2, [reply(ArrayRecord({"w": Array(np.ones(2))}), 1)])


def test_builtin_strategies_are_registered_with_their_hooks():
    for name in ("fedbn", "silobn", "scaffold", "fixbn", "fedprox"):
        assert name in STRATEGIES
        assert strategy_class(name) is STRATEGIES.get(name)
    for hook in ("fedbn", "silobn", "scaffold", "fixbn", "proximal"):
        assert hook in CLIENT_HOOKS
    assert accepted_params(FixBN) >= {"warmup", "fraction_train", "min_train_nodes"}
    assert accepted_params(FedBN) == accepted_params(STRATEGIES.get("fedavg"))


def test_registry_accepts_the_same_definition_twice_but_not_a_different_one():
    reg = Registry("thing")
    reg.register("a")(FedBN)
    reg.register("a")(FedBN)  # a module imported again (by path and by package name)
    with pytest.raises(ValueError, match="registered twice"):
        reg.register("a")(FixBN)
