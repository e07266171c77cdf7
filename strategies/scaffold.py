"""SCAFFOLD (Karimireddy et al., ICML 2020): control variates correct client drift.

The server keeps a control variate ``c`` and each client ``i`` its own ``c_i`` (in its
persistent state, so it survives rounds in which the client is not sampled). Local steps
follow ``g_i(y) − c_i + c``; after K steps of learning rate η the client sets (option II)
``c_i⁺ = c_i − c + (x − y) / (K·η)`` and uploads the model together with ``Δc_i = c_i⁺ − c_i``.
The server averages the models as FedAvg does (global learning rate 1) and sets
``c ← c + (|S| / N) · mean(Δc_i)`` over the |S| replies and N participating clients.

Transport: ``c`` travels to the clients as a second ArrayRecord (``scaffold-c``) in the train
message; a Flower reply must carry exactly one ArrayRecord, so ``Δc_i`` rides in it under
``hook/scaffold/<parameter>`` and is split off before averaging. ``c`` starts empty (zero)
and takes the parameter names of the first replies. The correction enters each local step
as a gradient transform, ``g + c − c_i`` (the gradient of the linear term ``Σ ⟨w, c − c_i⟩``),
so it composes with any optimizer setting (the paper uses plain SGD) and runs one client at
a time or in vectorized cohorts alike.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from torch import nn

from fedsim.client.hooks import CLIENT_HOOKS, ClientHook, extra_key, request_hooks, split_extra
from fedsim.client.step import Trained
from fedsim.server.dp_analysis import dp_fedavg
from fedsim.server.strategies import STRATEGIES

NAME = "scaffold"
SERVER_RECORD = "scaffold-c"  # the server control variate in the train message
STATE_KEY = "scaffold.c_i"  # the client control variate in the client state


def _tensors(record: ArrayRecord | None, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``record`` as tensors shaped and placed like ``like``; missing names are zeros."""
    out = {}
    for name, ref in like.items():
        if record is not None and name in record:
            t = torch.from_numpy(np.array(record[name].numpy(), copy=True))
            out[name] = t.to(device=ref.device, dtype=ref.dtype).reshape(ref.shape)
        else:
            out[name] = torch.zeros_like(ref)
    return out


@CLIENT_HOOKS.register(NAME)
class ScaffoldHook(ClientHook):
    """Client side of SCAFFOLD: corrected local steps, ``c_i`` kept in the client state.

    The step state is the correction ``c − c_i`` (one tensor per parameter), added to each
    step's gradients (``grad_transform``), so the corrected step runs the same one client at
    a time or in a vectorized cohort."""

    def step_state(self, start: Mapping[str, torch.Tensor]) -> object | None:
        self.start = dict(start)
        self.c = _tensors(self.ctx.message.array_records.get(SERVER_RECORD), self.start)
        self.c_i = _tensors(self.ctx.state.array_records.get(STATE_KEY), self.start)
        self.trained = Trained(0, 0.0)
        return {n: self.c[n] - self.c_i[n] for n in self.start}

    def grad_transform(self, grads: dict[str, torch.Tensor], state) -> dict[str, torch.Tensor]:
        return {n: g + state[n] for n, g in grads.items()}

    def after_train(self, model: nn.Module, trained: Trained) -> None:
        self.trained = trained

    def on_reply(self, model: nn.Module, arrays: dict[str, torch.Tensor]
                 ) -> dict[str, torch.Tensor]:
        arrays = dict(arrays)
        steps, lr = self.trained.steps, self.trained.lr
        new_c_i = {}
        for name, start in self.start.items():
            if steps:
                final = torch.as_tensor(arrays[name]).to(start.device).reshape(start.shape)
                drift = (start - final) / (steps * lr)
                new_c_i[name] = self.c_i[name] - self.c[name] + drift
            else:  # no local step (empty data): nothing learned, c_i unchanged
                new_c_i[name] = self.c_i[name]
            arrays[extra_key(NAME, name)] = new_c_i[name] - self.c_i[name]
        self.ctx.state[STATE_KEY] = ArrayRecord(
            {n: Array(t.cpu().numpy().copy()) for n, t in new_c_i.items()})
        return arrays


@dp_fedavg(why_not="clients upload their control-variate deltas Δc without clipping or noise "
           "(data-dependent arrays outside the Gaussian mechanism, as BN running statistics "
           "are), and the server's c built from them steers every other client's later "
           "updates outside the noised model")
@STRATEGIES.register(NAME)
class Scaffold(FedAvg):
    """FedAvg plus server/client control variates (SCAFFOLD, option II, global lr 1)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.c: dict[str, np.ndarray] = {}
        self.num_nodes = 0

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        request_hooks(config, NAME)
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self.num_nodes = len(list(grid.get_node_ids()))
        c = ArrayRecord({n: Array(v) for n, v in self.c.items()})
        for msg in messages:
            msg.content[SERVER_RECORD] = c
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        deltas = []
        for reply in replies:
            if reply.has_error():
                continue
            model_arrays, extras = split_extra(reply.content["arrays"])
            if NAME not in extras:
                raise ValueError(f"a reply from node {reply.metadata.src_node_id} has no "
                                 "control-variate delta: the client did not run the "
                                 "'scaffold' hook")
            deltas.append({n: a.numpy() for n, a in extras[NAME].items()})
            reply.content["arrays"] = model_arrays
        arrays, metrics = super().aggregate_train(server_round, replies)
        if deltas:
            scale = len(deltas) / max(self.num_nodes, len(deltas))
            for name in deltas[0]:
                mean = np.mean([d[name] for d in deltas], axis=0)
                base = self.c.get(name, np.zeros_like(mean))
                self.c[name] = (base + scale * mean).astype(np.float32)
        return arrays, metrics
