"""The round loop: Flower's five strategy hooks driven round by round.

It mirrors ``flwr.serverapp.strategy.Strategy.start`` but records every round, derives the
client-sampling seed from (seed, round) so runs are reproducible, and evaluates the global
model on the server as often as ``output.eval_every`` asks.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Callable, Iterator

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedsim.config import Scenario
from fedsim.rng import derive_seed

#: seconds a round waits for client replies (Flower's own default)
REPLY_TIMEOUT = 3600.0


@contextlib.contextmanager
def sampling_seed(seed: int, purpose: str, rnd: int) -> Iterator[None]:
    """Flower samples clients with Python's ``random``: seed it from (seed, round), then restore."""
    saved = random.getstate()
    random.seed(derive_seed(seed, purpose, rnd))
    try:
        yield
    finally:
        random.setstate(saved)


def _client_id(msg: Message) -> int | None:
    if msg.has_error():
        return None
    rec = msg.content.config_records.get("client")
    return int(rec["client-id"]) if rec is not None else None


def run_rounds(
    strategy: Strategy,
    grid: Grid,
    arrays: ArrayRecord,
    scenario: Scenario,
    evaluate: Callable[[ArrayRecord], dict],
    on_round: Callable[[dict], None],
    start_round: int = 1,
    on_replies: Callable[[int, list[Message], ArrayRecord], None] | None = None,
) -> ArrayRecord:
    """Run rounds ``start_round..server.rounds``; returns the final global arrays.

    ``on_replies(round, replies, arrays)``, if given, sees each round's client replies and the
    new global arrays right after aggregation (what a curious server sees; privacy audits).
    """
    total = scenario.server.rounds
    for rnd in range(start_round, total + 1):
        t0 = time.perf_counter()
        with sampling_seed(scenario.seed, "sample-train", rnd):
            messages = list(strategy.configure_train(rnd, arrays, ConfigRecord(), grid))
        replies = list(grid.send_and_receive(messages, timeout=REPLY_TIMEOUT))
        agg, metrics = strategy.aggregate_train(rnd, replies)
        if agg is not None:
            arrays = agg
        train_seconds = time.perf_counter() - t0
        if on_replies is not None:
            on_replies(rnd, replies, arrays)
        record: dict = {
            "round": rnd,
            "clients": sorted(c for c in map(_client_id, replies) if c is not None),
            "failures": [
                {"node": m.metadata.src_node_id, "reason": m.error.reason}
                for m in replies
                if m.has_error()
            ],
            "updates": sum(not m.has_error() for m in replies),
            "train_loss": float(metrics["train_loss"]) if metrics and "train_loss" in metrics
            else None,
            "train_accuracy": float(metrics["train_accuracy"])
            if metrics and "train_accuracy" in metrics else None,
            "train_seconds": train_seconds,
        }
        with sampling_seed(scenario.seed, "sample-evaluate", rnd):
            ev_messages = list(strategy.configure_evaluate(rnd, arrays, ConfigRecord(), grid))
        if ev_messages:
            ev = strategy.aggregate_evaluate(
                rnd, list(grid.send_and_receive(ev_messages, timeout=REPLY_TIMEOUT))
            )
            record["federated_evaluation"] = dict(ev) if ev is not None else None
        if rnd % scenario.output.eval_every == 0 or rnd == total:
            record.update(evaluate(arrays))
        record["seconds"] = time.perf_counter() - t0
        on_round(record)
    return arrays
