"""Client messages in one place: a train/evaluate message decoded into a typed request, and
the train reply, the evaluate reply and the error reply built from results.

Every way of running clients — the ClientApp one message at a time (:mod:`fedsim.client.app`,
on every engine), the vectorized cohorts (:mod:`fedsim.engine.vectorized`,
:mod:`fedsim.engine.vectorized_eval`) and the in-process grid's own failures
(:mod:`fedsim.engine.inprocess`) — reads and answers messages through these functions, so a
reply has the same records whichever backend computed it.
"""

from __future__ import annotations

import functools
import logging
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)

from fedsim.arrays import state_to_record
from fedsim.client.compress import upload_bytes
from fedsim.client.failures import SimulatedCrash
from fedsim.client.hooks import ClientHook, HookContext, hooks_for
from fedsim.client.runtime import ClientSettings
from fedsim.models.sgd_step import TrainResult
from fedsim.records import get_record, require_record
from fedsim.server.strategies import strategy_class

log = logging.getLogger("fedsim")

#: Error code of a ClientApp that raised (Flower's own ``ErrorCode.UNKNOWN`` is 0)
CLIENT_EXCEPTION = 1

# BatchNorm statistics (``server.bn_statistics``, :mod:`fedsim.server.bn_statistics`): what
# clients are asked for and answer with, on every engine
#: train-config key: replace the uploaded running statistics by exact moments ("pooled")
BN_MOMENTS_KEY = "bn-moments"
#: reply record (ConfigRecord) of a train reply with exact moments: BN layer (module name)
#: -> values per channel the moments were taken over
BN_COUNTS = "bn-counts"
#: message type of a recalibration query ("recalibrate"): the moments of one BN layer's
#: input, under the global arrays sent, over the client's training data
BN_MOMENTS = "query.bn_moments"
#: query-config key: the BN layer (module name) whose input moments are asked for
BN_LAYER_KEY = "bn-layer"
#: reply record (ArrayRecord) of a query: float64 ``mean`` and biased ``var`` per channel
MOMENTS_RECORD = "moments"


@functools.lru_cache(maxsize=16)
def import_strategy(name: str) -> None:
    """Import the scenario's strategy here too, so client hooks its module registers exist."""
    strategy_class(name)


@dataclass
class ClientRequest:
    """One decoded train or evaluate message: who, what it starts from, and its hooks."""

    msg: Message
    client_id: int
    config: ConfigRecord
    arrays: ArrayRecord  # the received global arrays
    server_round: int
    hooks: list[ClientHook]


def decode(msg: Message, context: Context, settings: ClientSettings, client_id: int,
           local_train: Callable[[], tuple[torch.Tensor, torch.Tensor]] | None = None
           ) -> ClientRequest:
    """Read a train or evaluate message (``msg.metadata.message_type``) of client
    ``client_id`` and instantiate the hooks its config asks for.

    Train messages get the run's ``[client]`` settings and seed (they switch on the
    compressor); evaluate messages get ``local_train`` (cold starts of local layers).
    """
    config = get_record(msg.content, "config", ConfigRecord) or ConfigRecord()
    arrays = require_record(msg.content, "arrays", ArrayRecord)
    import_strategy(settings.strategy)
    if msg.metadata.message_type == MessageType.TRAIN:
        ctx = HookContext(client_id, config, context.state, message=msg.content,
                          client=settings.client, seed=settings.seed)
    else:
        ctx = HookContext(client_id, config, context.state, message=msg.content,
                          mode="evaluate", local_train=local_train)
    return ClientRequest(msg, client_id, config, arrays, int(config.get("server-round", 0)),
                         hooks_for(ctx))


def train_reply(req: ClientRequest, arrays: Mapping[str, torch.Tensor | np.ndarray],
                result: TrainResult, extra_metrics: Mapping[str, float] | None = None,
                bn_counts: Mapping[str, int] | None = None) -> Message:
    """The reply to a train message: the uploaded arrays, the training metrics and the
    ``client`` record (client id, local steps, bytes on the wire); with ``bn_counts`` (the
    uploaded BN statistics are exact moments) also the :data:`BN_COUNTS` record."""
    metrics = MetricRecord({"num-examples": result.num_examples, "train_loss": result.loss,
                            "train_accuracy": result.accuracy, **(extra_metrics or {})})
    content = RecordDict({
        "arrays": state_to_record(dict(arrays)),
        "metrics": metrics,
        "client": ConfigRecord({"client-id": req.client_id, "steps": result.steps,
                                "upload-bytes": upload_bytes(dict(arrays), req.hooks)}),
    })
    if bn_counts is not None:
        content[BN_COUNTS] = ConfigRecord({k: int(v) for k, v in bn_counts.items()})
    return Message(content, reply_to=req.msg)


def wants_bn_moments(req: ClientRequest) -> bool:
    """Whether the train config asks for exact BN moments in the upload ("pooled")."""
    return bool(req.config.get(BN_MOMENTS_KEY, 0))


def bn_layer_asked(msg: Message) -> str:
    """The BN layer (module name) a recalibration query asks about."""
    config = require_record(msg.content, "config", ConfigRecord)
    if BN_LAYER_KEY not in config:
        raise KeyError(f"a {BN_MOMENTS} query needs {BN_LAYER_KEY!r} in its config")
    return str(config[BN_LAYER_KEY])


def moments_reply(msg: Message, client_id: int, count: torch.Tensor, mean: torch.Tensor,
                  var: torch.Tensor) -> Message:
    """The reply to a recalibration query: per-channel float64 ``mean`` and biased ``var``
    of the asked layer's input, and ``count`` (values per channel) in the ``client``
    record."""
    moments = state_to_record({"mean": mean.double().cpu(), "var": var.double().cpu()})
    content = RecordDict({MOMENTS_RECORD: moments,
                          "client": ConfigRecord({"client-id": client_id,
                                                  "count": int(count.item())})})
    return Message(content, reply_to=msg)


def evaluate_reply(req: ClientRequest, loss: float, accuracy: float, n: int) -> Message:
    """The reply to an evaluate message: loss, accuracy and number of test samples."""
    metrics = MetricRecord({"num-examples": n, "eval_loss": loss, "eval_accuracy": accuracy})
    content = RecordDict({"metrics": metrics,
                          "client": ConfigRecord({"client-id": req.client_id})})
    return Message(content, reply_to=req.msg)


def error_reply(msg: Message, exc: BaseException, client_id: int | None = None) -> Message:
    """The error Message a client answers with when it raised (instead of propagating).

    Flower's Ray engine wraps a raising ClientApp in Ray task errors with long tracebacks and
    an unreadable reason; answering with an error Message keeps the run going on every engine
    and the reason short: ``"<who> raised <Type>: <message>"``. A simulated crash is
    expected, so only other exceptions log their traceback.
    """
    who = f"client {client_id}" if client_id is not None else f"node {msg.metadata.dst_node_id}"
    reason = f"{who} raised {type(exc).__name__}: {exc}"
    if not isinstance(exc, SimulatedCrash):
        log.warning("%s\n%s", reason, traceback.format_exc(limit=4))
    return Message(Error(code=CLIENT_EXCEPTION, reason=reason), reply_to=msg)
