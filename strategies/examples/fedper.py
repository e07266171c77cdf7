"""A custom strategy, written the way a user would: FedPer (Arivazhagan et al., 2019).

Personalization layers: each client keeps its classifier head — the last ``head_layers``
``nn.Linear`` layers of the model, found by module type — on the client, and the server
averages only the body. Under label skew each client's head can fit its own label mix.

Use it from a scenario (``scenarios/custom_strategy.toml``)::

    [server]
    strategy = "strategies/examples/fedper.py:FedPer"   # or "strategies.examples.fedper:FedPer"
    [server.params]
    head_layers = 1

What it shows:

- a Flower ``FedAvg`` subclass overriding three of the five strategy hooks
  (``configure_train``, ``aggregate_train``, ``configure_evaluate``) and calling ``super()``;
- a constructor argument (``head_layers``) that ``[server.params]`` sets;
- a client hook registered by name in this module and requested through the train config
  (``client-hooks``), with a setting sent alongside (``local-head-layers``);
- client state kept across rounds in ``ctx.state`` (Flower's ``Context.state``);
- a hook that acts on arrays only (``on_receive`` lays the saved head over the received
  arrays, ``on_reply`` edits the upload), so it runs one client at a time and in
  vectorized cohorts (``engine.vectorize``) alike;
- ``personal_hooks``: fedsim then evaluates each client's own model (global body + its head)
  and records ``final.personalized_accuracy`` in ``summary.json``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from torch import nn

from fedsim.arrays import state_to_record
from fedsim.client.hooks import CLIENT_HOOKS, ClientHook, request_hooks
from fedsim.client.step import ClientArrays

HOOK = "example-local-head"  # user hooks share one registry: prefix the name to avoid clashes
STATE_KEY = "example-local-head.arrays"


@CLIENT_HOOKS.register(HOOK)
class LocalHeadHook(ClientHook):
    """Client side: restore this client's own head, train, save it, do not upload it."""

    def head_keys(self, model: nn.Module) -> list[str]:
        layers = int(self.ctx.config.get("local-head-layers", 1))
        linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        return [f"{n}.{k}" for n, m in linears[-layers:] for k in m.state_dict()]

    def on_receive(self, model: nn.Module, arrays: ClientArrays) -> None:
        saved = self.ctx.state.array_records.get(STATE_KEY)
        if saved is not None:  # this client trained before: put its own head back
            arrays.load(saved)
        # else: a client that never trained (e.g. a holdout client) uses the global head

    def on_reply(self, model: nn.Module, arrays: dict[str, torch.Tensor]
                 ) -> dict[str, torch.Tensor]:
        keys = set(self.head_keys(model))
        self.ctx.state[STATE_KEY] = state_to_record(arrays, keys)  # kept for the next round
        return {k: v for k, v in arrays.items() if k not in keys}  # never uploaded


class FedPer(FedAvg):
    """FedAvg over the body; every client keeps its own classifier head."""

    personal_hooks = (HOOK,)  # how fedsim rebuilds a client's own model for evaluation

    def __init__(self, head_layers: int = 1, **kwargs) -> None:
        if head_layers < 1:
            raise ValueError(f"head_layers must be >= 1, got {head_layers}")
        super().__init__(**kwargs)  # fraction_train etc. come from [server]
        self.head_layers = head_layers

    def _ask_for_hook(self, config: ConfigRecord) -> None:
        config["local-head-layers"] = self.head_layers
        request_hooks(config, HOOK)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.current_arrays = arrays  # the global arrays this round starts from
        self._ask_for_hook(config)
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        arrays, metrics = super().aggregate_train(server_round, replies)  # averages the body
        if arrays is not None:  # the global model keeps every key: heads keep their value
            arrays = ArrayRecord({k: arrays[k] if k in arrays else self.current_arrays[k]
                                  for k in self.current_arrays})
        return arrays, metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        self._ask_for_hook(config)  # federated evaluation then uses each client's own head
        return super().configure_evaluate(server_round, arrays, config, grid)
