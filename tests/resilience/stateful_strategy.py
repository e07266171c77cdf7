"""Test-only strategies (loaded by path: ``server.strategy = "tests/resilience/...:Class"``).

- ``StatefulFedAvg`` asks for the ``test-counter`` client hook, which keeps per-client state in
  Flower ``Context.state`` (a ConfigRecord, an ArrayRecord and a MetricRecord) and lets it shape
  the update, so a resume that lost client state would give a different model.
- ``PoisonFedAvg`` asks client 0 (when sampled) to send NaN arrays.
"""

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord
from flwr.serverapp.strategy import FedAvg

from fedsim.client.hooks import CLIENT_HOOKS, ClientHook


class CounterHook(ClientHook):
    """Counts this client's rounds in its state and nudges its update by that count."""

    activated_by = "test-counter"

    def on_receive(self, model, arrays):
        state = self.ctx.state
        self.count = int(state["counter"]["n"]) if "counter" in state else 0
        first = next(iter(arrays))
        state["counter"] = ConfigRecord({"n": self.count + 1, "tag": b"\x00\xff"})
        state["memory"] = ArrayRecord({first: Array(np.full(3, self.count, dtype=np.float32))})
        state["stats"] = MetricRecord({"seen": [float(self.count), 0.5]})

    def on_reply(self, model, arrays):
        first = next(iter(arrays))
        arrays = dict(arrays)
        arrays[first] = arrays[first] + 1e-3 * self.count
        return arrays


class PoisonHook(ClientHook):
    """Clients named in ``test-poison`` upload NaN weights."""

    activated_by = "test-poison"

    def on_reply(self, model, arrays):
        poisoned = {int(c) for c in str(self.ctx.config["test-poison"]).split(",")}
        if self.ctx.client_id not in poisoned:
            return arrays
        return {k: (torch.full_like(v, float("nan")) if v.is_floating_point() else v)
                for k, v in arrays.items()}


for _name, _hook in (("test-counter", CounterHook), ("test-poison", PoisonHook)):
    if _name not in CLIENT_HOOKS:
        CLIENT_HOOKS.register(_name)(_hook)


class StatefulFedAvg(FedAvg):
    def configure_train(self, server_round, arrays, config, grid):
        config["test-counter"] = 1
        return super().configure_train(server_round, arrays, config, grid)


class PoisonFedAvg(FedAvg):
    def configure_train(self, server_round, arrays, config, grid):
        config["test-poison"] = "0"
        return super().configure_train(server_round, arrays, config, grid)


class BrokenFedAvg(FedAvg):
    """A user's strategy with a bug in aggregation."""

    def aggregate_train(self, server_round, replies):
        raise ZeroDivisionError("bug in my strategy")
