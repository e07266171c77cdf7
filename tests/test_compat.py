"""Each private torch or Flower name fedsim uses (fedsim/compat.py), checked against the
installed releases: a failure names the use and the release it was written for."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import flwr
import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from torch import nn
from torch.func import grad, vmap

from fedsim import compat

ROOT = Path(__file__).resolve().parents[1]


def torch_use(what: str) -> str:
    return (f"fedsim.compat's use of torch internals ({what}) no longer holds: written for "
            f"torch {compat.TORCH_WRITTEN_FOR}, installed {torch.__version__}; "
            "update fedsim/compat.py")


def flower_use(what: str) -> str:
    return (f"fedsim.compat's use of Flower internals ({what}) no longer holds: written for "
            f"flwr {' / '.join(compat.FLWR_WRITTEN_FOR)}, installed {flwr.__version__}; "
            "update fedsim/compat.py")


# =========================================================================== torch


def test_batchnorm_base_class():
    base = compat.BatchNormBase
    assert all(issubclass(c, base) for c in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)), \
        torch_use("torch.nn.modules.batchnorm._BatchNorm is BatchNorm's base")
    calls = []

    class Checked(base):
        def _check_input_dim(self, x):
            calls.append(x.dim())

    layer = Checked(3)
    for shape in ((4, 3), (4, 3, 5), (4, 3, 2, 2)):
        out = layer(torch.randn(shape))
        assert out.shape == shape, torch_use("_BatchNorm.forward on any (N, C, ...) input")
    assert calls == [2, 3, 4], torch_use("_BatchNorm.forward calls _check_input_dim")


def test_fused_lstm_on_explicit_weights():
    torch.manual_seed(0)
    ref = nn.LSTM(3, 5, batch_first=True).double()
    x = torch.randn(2, 7, 3, dtype=torch.float64)
    out = compat.lstm_layer(x, ref.weight_ih_l0, ref.weight_hh_l0, ref.bias_ih_l0,
                            ref.bias_hh_l0)
    assert torch.equal(out, ref(x)[0]), torch_use("torch._VF.lstm(input, hx, params, ...)")


def test_functorch_interpreter_stack():
    seen = []

    def probe(x):
        vm = compat.folding_vmap()
        seen.append(None if vm is None else vm.level())
        if vm is not None:
            with vm.lower():  # the context a folding layer runs native kernels in
                pass
        return x.sum()

    probe(torch.ones(2))
    vmap(probe)(torch.ones(3, 2))
    vmap(grad(probe))(torch.ones(3, 2))
    grad(lambda x: vmap(probe)(x).sum())(torch.ones(3, 2))
    assert [s is not None for s in seen] == [False, True, False, True], torch_use(
        "torch._functorch.pyfunctorch.retrieve_all_functorch_interpreters, TransformType")
    assert all(isinstance(s, int) for s in seen if s is not None), torch_use("interpreter.level")
    inside = []
    vmap(lambda x: inside.append(compat.under_vmap()) or x)(torch.ones(2, 1))
    assert inside == [True] and not compat.under_vmap(), torch_use("under_vmap")


def test_batched_tensor_unwrap_and_rewrap():
    stacked = torch.arange(6.0).reshape(3, 2)
    out = []

    def f(x):
        vm = compat.folding_vmap()
        level = vm.level()
        assert compat.is_batched(x, level), torch_use("is_batchedtensor / maybe_get_level")
        assert not compat.is_batched(torch.ones(2), level), torch_use("is_batchedtensor")
        physical, bdim = compat.unwrap_batched(x, level)
        out.append((physical.clone(), bdim))
        with vm.lower():
            doubled = physical * 2
        return compat.add_batch_dim(doubled, bdim, level)

    result = vmap(f)(stacked)
    assert torch.equal(out[0][0], stacked) and out[0][1] == 0, torch_use("_unwrap_batched")
    assert torch.equal(result, 2 * stacked), torch_use("_add_batch_dim")


# =========================================================================== Flower


def test_message_id_slot():
    with compat.task_identity_restored():
        compat.set_task_identity(1)
        msg = Message(RecordDict(), 1, MessageType.TRAIN)
    compat.set_message_id(msg, "abc")
    assert msg.metadata.message_id == "abc", flower_use("Metadata.__dict__['_message_id']")


def test_task_identity_slots():
    with compat.task_identity_restored():
        before = compat.task_identity()
        compat.set_task_identity(7)
        assert compat.task_identity() == (1, 7, compat.SUPERLINK_NODE_ID), flower_use(
            "TaskIdentity._task_id / _run_id / _node_id")
        msg = Message(RecordDict(), 3, MessageType.TRAIN)
        assert msg.metadata.run_id == 7 and msg.metadata.src_node_id == compat.SUPERLINK_NODE_ID, \
            flower_use("Message reads the sender from TaskIdentity")
    assert compat.task_identity() == before, flower_use("TaskIdentity restored")
    assert isinstance(compat.SUPERLINK_NODE_ID, int), flower_use(
        "flwr.common.constant.SUPERLINK_NODE_ID")


def test_empty_run():
    assert compat.empty_run(5).run_id == 5, flower_use("flwr.supercore.run.Run.create_empty")


def test_recorddict_serde_round_trip():
    content = RecordDict({"a": ArrayRecord({"w": Array(np.arange(3.0))}),
                          "c": ConfigRecord({"k": "v"})})
    proto = compat.recorddict_to_proto(content)
    assert isinstance(proto, compat.ProtoRecordDict), flower_use("flwr.proto.recorddict_pb2")
    back = compat.recorddict_from_proto(compat.ProtoRecordDict.FromString(
        proto.SerializeToString()))
    assert back["c"]["k"] == "v", flower_use("flwr.common.serde")
    assert np.array_equal(back["a"]["w"].numpy(), np.arange(3.0)), flower_use("flwr.common.serde")


def test_differential_privacy_helpers():
    std = compat.compute_stdv(2.0, 3.0, 4)
    assert std == pytest.approx(2.0 * 3.0 / 4), flower_use(
        "flwr.supercore.differential_privacy.compute_stdv(noise, clip, m)")
    arrays = [np.zeros(1000)]
    compat.add_gaussian_noise_inplace(arrays, 1.0)
    assert 0.8 < arrays[0].std() < 1.2, flower_use("add_gaussian_noise_inplace(arrays, std)")


def test_new_array_equals_flowers_constructor():
    a = np.arange(4, dtype=np.float32)
    ours = compat.new_array(str(a.dtype), a.shape, Array(a).data, "numpy.ndarray")
    assert vars(ours) == vars(Array(a)), flower_use("Array's fields and dirty flag")


def test_fill_record_equals_setting_items():
    arrays = {"w": Array(np.ones(2)), "b": Array(np.zeros(1))}
    slow = ArrayRecord()
    for k, v in arrays.items():
        slow[k] = v
    assert vars(compat.fill_record(ArrayRecord(), arrays)) == vars(slow), flower_use(
        "ArrayRecord.__dict__['_data'] / ['_is_dirty']")


def test_typed_dict_internals():
    rec = ArrayRecord()
    assert compat.TypedDict in type(rec).__mro__, flower_use("TypedDict base of records")
    assert {"_check_key_fn", "_check_value_fn", "_data"} <= set(vars(rec)), flower_use(
        "TypedDict's _check_key_fn / _check_value_fn / _data")


def test_fast_records_are_flowers_results_and_only_on_checked_releases(monkeypatch):
    """Inside ``fast_records``, Array.numpy and item assignment give exactly Flower's
    results; on an unchecked Flower release nothing is replaced."""
    from fedsim.arrays import fast_flower_records

    layouts = [np.arange(6, dtype=np.float32).reshape(2, 3), np.array(3, dtype=np.int64),
               np.asfortranarray(np.arange(6.0).reshape(2, 3)), np.arange(3, dtype=">i4")]
    arrays = [Array(a) for a in layouts]
    reference = [a.numpy() for a in arrays]
    with fast_flower_records():
        assert Array.numpy is not compat.flower_numpy, flower_use("Array.numpy replaced")
        fast = [a.numpy() for a in arrays]
        rec = ArrayRecord()
        rec["w"] = arrays[0]
        with pytest.raises(TypeError):
            rec["x"] = np.ones(2)
    for f, r in zip(fast, reference):
        assert f.dtype == r.dtype and f.shape == r.shape and f.tobytes() == r.tobytes()
    assert list(rec.keys()) == ["w"] and rec.is_dirty
    original = Array.numpy
    monkeypatch.setattr(flwr, "__version__", "99.0.0")
    with fast_flower_records():
        assert Array.numpy is original  # an unchecked release keeps Flower's own
    assert Array.numpy is original


def test_installed_grid_has_a_known_pull_messages_signature():
    import inspect

    params = list(inspect.signature(Grid.pull_messages).parameters)
    assert params in (["self", "message_ids"], ["self", "reply_to_message_ids", "message_ids"]), \
        flower_use(f"Grid.pull_messages{tuple(params)}")


class _OldGrid:
    """Flower 1.41/1.42's signature."""

    def pull_messages(self, message_ids):
        return [f"reply to {m}" for m in message_ids]


class _NewGrid:
    """Flower 1.43's signature."""

    def pull_messages(self, reply_to_message_ids=None, *, message_ids=None):
        ids = reply_to_message_ids if reply_to_message_ids is not None else message_ids
        return [f"reply to {m}" for m in ids]


@pytest.mark.parametrize("grid", [_OldGrid(), _NewGrid()], ids=["flwr-1.41", "flwr-1.43"])
def test_pull_replies_calls_either_signature(grid):
    assert compat.pull_replies(grid, iter(["a", "b"])) == ["reply to a", "reply to b"]


def test_pulled_ids_reads_either_signature():
    assert compat.pulled_ids(["a"], None) == ["a"]
    assert compat.pulled_ids(None, ("b",)) == ["b"]
    with pytest.raises(TypeError, match="both"):
        compat.pulled_ids(["a"], ["a"])
    with pytest.raises(TypeError, match="needs the ids"):
        compat.pulled_ids(None, None)


# =========================================================================== the boundary

PRIVATE_MODULES = re.compile(r"^(torch\._|torch\.nn\.modules\b|flwr\.common\b|flwr\.supercore\b|"
                             r"flwr\.server\b|flwr\.proto\b)")


def _is_private(node: ast.AST) -> bool:
    if isinstance(node, ast.ImportFrom):
        module = node.module or ""
        return PRIVATE_MODULES.match(module) is not None or (
            module.split(".")[0] in ("torch", "flwr")
            and any(a.name.startswith("_") for a in node.names))
    if isinstance(node, ast.Import):
        return any(PRIVATE_MODULES.match(a.name) for a in node.names)
    if isinstance(node, ast.Attribute):
        return PRIVATE_MODULES.match(ast.unparse(node)) is not None
    return (isinstance(node, ast.Subscript) and isinstance(node.value, ast.Attribute)
            and node.value.attr == "__dict__" and isinstance(node.slice, ast.Constant)
            and str(node.slice.value).startswith("_"))


def _private_uses(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, code) of imports from private modules or of private names, private attribute
    chains (``torch._C``) and writes through ``__dict__["_..."]``."""
    return sorted({(n.lineno, ast.unparse(n)) for n in ast.walk(tree) if _is_private(n)})


def test_no_module_but_compat_touches_private_names():
    offenders = []
    for path in sorted([*ROOT.glob("fedsim/**/*.py"), *ROOT.glob("strategies/**/*.py")]):
        if path == ROOT / "fedsim" / "compat.py":
            continue
        for n, code in _private_uses(ast.parse(path.read_text())):
            offenders.append(f"{path.relative_to(ROOT)}:{n}: {code}")
    assert not offenders, "private torch/Flower names outside fedsim/compat.py:\n" + \
        "\n".join(offenders)


def test_the_boundary_check_sees_each_kind_of_private_use():
    code = ("from torch.nn.modules.batchnorm import _BatchNorm\nimport torch._C\n"
            "from flwr.common.constant import X\nx = torch._C.foo\n"
            "m.metadata.__dict__['_message_id'] = 1\nfrom flwr.app import Array\n")
    assert {n for n, _ in _private_uses(ast.parse(code))} == {1, 2, 3, 4, 5}


# -- fedsim's own grids take both pull_messages signatures --------------------------------


def _query_app():
    from flwr.clientapp import ClientApp

    app = ClientApp()

    @app.query()
    def answer(msg, context):
        cid = context.node_config["partition-id"]
        return Message(RecordDict({"client": ConfigRecord({"client-id": cid})}), reply_to=msg)

    return app


class _OldSignatureBase:
    """A base grid with Flower 1.41/1.42's ``pull_messages(message_ids)`` only."""

    def __init__(self, base) -> None:
        self.base = base

    def __getattr__(self, name):
        return getattr(self.base, name)

    def pull_messages(self, message_ids):
        return self.base.pull_messages(message_ids)


@pytest.mark.parametrize("style", ["positional", "message_ids=", "reply_to_message_ids="])
@pytest.mark.parametrize("wrapped", [False, True], ids=["InProcessGrid", "ClientOrderedGrid"])
def test_fedsim_grids_accept_both_pull_messages_signatures(style, wrapped):
    from fedsim.engine.inprocess import InProcessGrid
    from fedsim.engine.ordered import ClientOrderedGrid

    with compat.task_identity_restored():
        grid = InProcessGrid(_query_app(), 3)
        if wrapped:
            grid = ClientOrderedGrid(grid, 3)
        msgs = [Message(RecordDict({"config": ConfigRecord({"want": "client-id"})}), node,
                        MessageType.QUERY) for node in (1, 2, 3)]
        ids = list(grid.push_messages(msgs))
        if style == "positional":
            replies = grid.pull_messages(ids)
        elif style == "message_ids=":
            replies = grid.pull_messages(message_ids=ids)
        else:
            replies = grid.pull_messages(reply_to_message_ids=ids)
        assert sorted(r.metadata.reply_to_message_id for r in replies) == sorted(ids)
        assert not any(r.has_error() for r in replies)


@pytest.mark.parametrize("old_base", [False, True], ids=["base-1.43", "base-1.41"])
def test_client_ordered_grid_pulls_from_either_base_signature(old_base):
    from fedsim.engine.inprocess import InProcessGrid
    from fedsim.engine.ordered import ClientOrderedGrid

    with compat.task_identity_restored():
        base = InProcessGrid(_query_app(), 3)
        grid = ClientOrderedGrid(_OldSignatureBase(base) if old_base else base, 3)
        assert list(grid.get_node_ids()) == [1, 2, 3]  # a query round trip through the base


def test_recorded_simulation_nodes_sees_flowers_registration():
    import inspect

    from flwr.server.superlink.fleet.vce import vce_api
    from flwr.server.superlink.linkstate import LinkStateFactory
    from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.superlink.federation import NoOpFederationManager

    assert "_register_nodes(" in inspect.getsource(vce_api.start_vce), \
        flower_use("start_vce registers its nodes through vce_api._register_nodes")
    original = vce_api._register_nodes
    factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(),
                               ObjectStoreFactory())
    with compat.recorded_simulation_nodes() as nodes:
        assert nodes.wait(0) is None  # nothing registered yet
        made = vce_api._register_nodes(num_nodes=3, state_factory=factory)
        with pytest.raises(RuntimeError, match="already running"), \
                compat.recorded_simulation_nodes():
            pass
    assert vce_api._register_nodes is original
    assert nodes.wait(0) == made and sorted(made.values()) == [0, 1, 2], \
        flower_use("_register_nodes returns {node id: partition id}")


def test_simulation_delivery_by_message_replaces_flowers_node_sweep():
    import inspect
    import threading
    from types import SimpleNamespace

    from flwr.server.superlink.fleet.vce import vce_api
    from flwr.server.superlink.linkstate import InMemoryLinkState

    params = list(inspect.signature(vce_api.add_messages_to_queue).parameters)
    assert params == ["state", "queue", "nodes_mapping", "f_stop"], \
        flower_use("vce_api.add_messages_to_queue(state, queue, nodes_mapping, f_stop)")
    assert "add_messages_to_queue" in inspect.getsource(vce_api.run_api), \
        flower_use("run_api starts vce_api.add_messages_to_queue by its module name")
    from flwr.server.superlink.linkstate import LinkStateFactory
    from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.superlink.federation import NoOpFederationManager

    state = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(),
                             ObjectStoreFactory()).state()
    assert isinstance(state, InMemoryLinkState), flower_use("simulation state is in memory")
    assert isinstance(state.message_ins_store, dict) and hasattr(state.lock, "acquire"), \
        flower_use("InMemoryLinkState.message_ins_store and .lock")

    def stored(node, delivered=""):
        return SimpleNamespace(metadata=SimpleNamespace(dst_node_id=node,
                                                        delivered_at=delivered))

    fake = SimpleNamespace(lock=threading.RLock(), message_ins_store={
        "a": stored(9), "b": stored(4, "2026-12-04"), "c": stored(7), "d": stored(9),
        "e": stored(5)})
    assert compat.undelivered_nodes(fake, {4: 0, 5: 1, 7: 2, 9: 3}) == [9, 7, 5]
    assert compat.undelivered_nodes(fake, {7: 0}) == [7]  # unknown nodes are not visited
    original = vce_api.add_messages_to_queue
    with compat.simulation_delivery_by_message():
        assert vce_api.add_messages_to_queue is not original
    assert vce_api.add_messages_to_queue is original


def test_fedavg_functions_replaced_only_while_fast_records_run(monkeypatch):
    """FedAvg calls ``aggregate_arrayrecords`` and ``validate_message_reply_consistency`` by
    their names in ``flwr.serverapp.strategy.fedavg``: fast_records swaps fedsim's in there
    and back, and leaves Flower's on an unchecked release."""
    from flwr.serverapp.strategy import fedavg

    from fedsim.arrays import aggregate_arrayrecords, fast_flower_records
    from fedsim.records import check_replies

    originals = (fedavg.aggregate_arrayrecords, fedavg.validate_message_reply_consistency)
    assert originals == (compat._flower_aggregate, compat._flower_validate), flower_use(
        "flwr.serverapp.strategy.fedavg.aggregate_arrayrecords / "
        "validate_message_reply_consistency")
    with fast_flower_records(), fast_flower_records():
        assert fedavg.aggregate_arrayrecords is aggregate_arrayrecords
        assert fedavg.validate_message_reply_consistency is check_replies
    assert (fedavg.aggregate_arrayrecords, fedavg.validate_message_reply_consistency) == originals
    monkeypatch.setattr(flwr, "__version__", "99.0.0")
    with fast_flower_records():
        assert fedavg.aggregate_arrayrecords is originals[0]
