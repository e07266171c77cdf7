"""The round loop: Flower's five strategy hooks driven round by round, robust to failing clients.

It mirrors ``flwr.serverapp.strategy.Strategy.start`` but

- seeds the global RNGs Flower's strategies use (Python's ``random`` for client sampling,
  numpy's for DP noise, torch's) from (seed, purpose, round) around each hook, so runs are
  reproducible and resume exactly without saving RNG state;
- simulates ``[failures]`` (dropouts, crashes, stragglers past a deadline) and screens replies
  before aggregation: errors, late and non-finite (NaN/Inf) updates are rejected and recorded;
  accepted replies are aggregated in client-id order, so the result does not depend on the
  order in which an engine delivers them;
- retries a round (a new derived sample) or stops when fewer than ``failures.min_replies``
  valid replies arrive (except under a DP wrapper that releases every round: Poisson
  sampling), and stops a diverging run (non-finite global model or loss);
- replaces the global BN running statistics after aggregation as ``server.bn_statistics``
  asks (:mod:`fedsim.server.bn_statistics`), whatever the strategy;
- evaluates on the server as often as ``output.eval_every`` asks and checkpoints every round.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedsim.arrays import all_finite, peek_array
from fedsim.client.compress import record_bytes
from fedsim.client.failures import CRASH_KEY, client_fate, simulated_seconds
from fedsim.config import Scenario, ServerConfig
from fedsim.errors import EarlyStopped, PrivacyBudgetSpent, RunStopped
from fedsim.records import get_record, records_of
from fedsim.rng import derive_seed
from fedsim.server.bn_statistics import BNStatistics
from fedsim.server.client_dp import round_client_dp
from fedsim.server.early_stop import EarlyStopper

log = logging.getLogger("fedsim")

#: seconds a round waits for client replies (Flower's own default)
REPLY_TIMEOUT = 3600.0


@contextlib.contextmanager
def sampling_seed(seed: int, purpose: str, rnd: int, *more: str | int) -> Iterator[None]:
    """Seed Python's ``random``, numpy's global RNG and torch's CPU RNG from (seed, purpose,
    round, ...) for one strategy hook, then restore them (nothing global leaks out)."""
    value = derive_seed(seed, purpose, rnd, *more)
    saved = random.getstate(), np.random.get_state(), torch.default_generator.get_state()
    random.seed(value)
    np.random.seed(value % 2**32)
    torch.default_generator.manual_seed(value & (2**63 - 1))
    try:
        yield
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        torch.default_generator.set_state(saved[2])


def _client_record(msg: Message) -> ConfigRecord | None:
    if msg.has_error() or not msg.has_content():
        return None
    return get_record(msg.content, "client", ConfigRecord)


def _client_id(msg: Message) -> int | None:
    rec = _client_record(msg)
    return int(rec["client-id"]) if rec is not None else None


def _arrays_finite(replies: list[Message]) -> bool:
    """Whether every array of every reply with content is finite: one check per dtype over
    the round's arrays together (:func:`all_finite`), so a round of finite replies costs a
    few numpy calls and only a round with a NaN/Inf is searched reply by reply."""
    return all_finite(arr for reply in replies if reply.has_content()
                      for _, rec in records_of(reply.content, ArrayRecord)
                      for arr in rec.values())


def _nonfinite(content: RecordDict, arrays_finite: bool = False) -> str | None:
    """Name the first NaN/Inf array or metric in a reply, or None if all are finite
    (``arrays_finite``: its arrays are known to be finite, only its metrics are checked).

    Each ArrayRecord is screened whole (:func:`all_finite`, one check per dtype); only one
    that fails is searched array by array for the name."""
    for _, rec in records_of(content, ArrayRecord):
        if arrays_finite or all_finite(rec.values()):
            continue
        for key, array in rec.items():
            x = peek_array(array)
            if x.dtype.kind in "fc" and not np.isfinite(x).all():
                return f"array {key!r} has NaN/Inf values"
    for _, rec in records_of(content, MetricRecord):
        for key, value in rec.items():
            values = value if isinstance(value, list) else [value]
            if any(isinstance(v, float) and not math.isfinite(v) for v in values):
                return f"metric {key!r} is {value}"
    return None


def _array_bytes(content: RecordDict) -> int:
    """Raw payload (``itemsize * numel``) of every ArrayRecord in a message."""
    return sum(record_bytes(rec) for _, rec in records_of(content, ArrayRecord))


def _download_bytes(messages: list[Message]) -> list[int]:
    """:func:`_array_bytes` of each message; an ArrayRecord several messages share (a
    strategy sends one global record to every client) is sized once."""
    sizes: dict[int, int] = {}  # id(record) -> bytes; every record stays alive meanwhile
    out = []
    for msg in messages:
        total = 0
        for _, rec in records_of(msg.content, ArrayRecord):
            size = sizes.get(id(rec))
            if size is None:
                size = sizes[id(rec)] = record_bytes(rec)
            total += size
        out.append(total)
    return out


def _upload_bytes(reply: Message, rec: ConfigRecord | None) -> int:
    """Bytes a reply's arrays took on the wire: the size the client reports in its
    ``client`` record ``rec`` (compressed arrays at their encoded size,
    ``fedsim.client.compress``), else their raw payload."""
    if rec is not None and "upload-bytes" in rec:
        return int(rec["upload-bytes"])
    return _array_bytes(reply.content)


def _bytes_stats(sizes: list[int]) -> dict:
    if not sizes:
        return {"mean": 0.0, "max": 0, "total": 0}
    return {"mean": sum(sizes) / len(sizes), "max": max(sizes), "total": sum(sizes)}


def _with_config(msg: Message, extra: dict) -> Message:
    """Give one message its own train config with ``extra`` added (strategies share one)."""
    content = RecordDict(dict(msg.content.items()))
    config = ConfigRecord(dict(get_record(msg.content, "config", ConfigRecord) or {}))
    config.update(extra)
    content["config"] = config
    msg.content = content
    return msg


def _lr_hint(lr: float) -> str:
    return (f"likely cause: the learning rate is too high — client.lr = {lr:g} (try "
            f"{lr / 10:g}) or a server learning rate in [server.params]")


@dataclass
class TrainPhase:
    """What one round's training phase produced."""

    accepted: list[Message] = field(default_factory=list)  # valid replies, by client id
    failures: list[dict] = field(default_factory=list)  # {"client", "reason", ...}
    attempts: int = 1
    sim_seconds: float = 0.0  # simulated duration: slowest accepted update (or the deadline
    # when a reply is missing), summed over attempts
    stateful: bool = False  # some client reported a non-empty Context.state
    downloaded: list[int] = field(default_factory=list)  # bytes of each train message sent
    uploaded: list[int] = field(default_factory=list)  # bytes of each reply with arrays


class RoundRunner:
    """Runs the training phase of a round: sampling, failures, screening, retries."""

    def __init__(self, strategy: Strategy, grid: Grid, scenario: Scenario,
                 bn_statistics: BNStatistics | None = None) -> None:
        self.strategy = strategy
        self.grid = grid
        self.scenario = scenario
        self.bn_statistics = bn_statistics
        self.cfg = scenario.failures
        lookup = getattr(grid, "client_id", None)
        self.client_of_node = lookup if callable(lookup) else (lambda node: None)

    def _attempt(self, rnd: int, arrays: ArrayRecord, attempt: int, phase: TrainPhase) -> float:
        """One try at the round; appends failures to ``phase``, returns its simulated seconds."""
        seed = self.scenario.seed
        retry = ("retry", attempt) if attempt else ()
        config = ConfigRecord(self.bn_statistics.train_config() if self.bn_statistics else {})
        with sampling_seed(seed, "sample-train", rnd, *retry):
            messages = list(strategy_hook(self.strategy, "configure_train", rnd,
                                          self.scenario.server, rnd, arrays, config,
                                          self.grid))
        note = {"attempt": attempt} if attempt else {}
        send = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            cid = self.client_of_node(node)
            fate = client_fate(self.cfg, seed, rnd, cid if cid is not None else node, attempt)
            if fate.dropout:
                phase.failures.append({"client": cid, "reason": "dropout", **note})
                continue
            send.append(_with_config(msg, {CRASH_KEY: fate.crash_at}) if fate.crash_at else msg)
        phase.downloaded += _download_bytes(send)
        replies = list(self.grid.send_and_receive(send, timeout=REPLY_TIMEOUT)) if send else []
        accepted = []
        longest = 0.0
        missing = len(send) < len(messages)  # a dropped client never answers
        arrays_finite = _arrays_finite([r for r in replies if not r.has_error()])
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                reason = "crash" if "SimulatedCrash" in reply.error.reason else "error"
                phase.failures.append({"client": self.client_of_node(node), "reason": reason,
                                       "detail": reply.error.reason, **note})
                continue
            found = _client_record(reply)
            cid = int(found["client-id"]) if found is not None else self.client_of_node(node)
            rec = found or ConfigRecord()
            phase.uploaded.append(_upload_bytes(reply, found))  # rejected or not, it was sent
            phase.stateful = phase.stateful or int(rec.get("state-records", 0)) > 0
            bad = _nonfinite(reply.content, arrays_finite)
            if bad is not None:
                phase.failures.append({"client": cid, "reason": "non-finite", "detail": bad,
                                       **note})
                continue
            sim = simulated_seconds(self.cfg, seed, cid if cid is not None else node,
                                    int(rec.get("steps", 0)))
            if self.cfg.deadline and sim > self.cfg.deadline:
                phase.failures.append({"client": cid, "reason": "deadline",
                                       "detail": f"{sim:g} simulated s > deadline "
                                                 f"{self.cfg.deadline:g}", **note})
                missing = True
                continue
            longest = max(longest, sim)
            accepted.append((cid if cid is not None else -1, node, reply))
        phase.accepted = [m for _, _, m in sorted(accepted, key=lambda t: (t[0], t[1]))]
        # with a deadline, a round missing a reply waits for it until the deadline
        return self.cfg.deadline if missing and self.cfg.deadline else longest

    def train_phase(self, rnd: int, arrays: ArrayRecord) -> TrainPhase:
        """Sample, send, screen; retry with a new sample while too few valid replies arrive.

        Raises RunStopped when the round cannot get ``failures.min_replies`` valid replies.
        """
        cfg = self.cfg
        attempts = 1 + (cfg.retries if cfg.on_too_few == "retry" else 0)
        # a DP wrapper with Poisson sampling releases every round, whatever replies arrive
        # (a retry would condition the sample on its size, which its accountant does not)
        needed = 0 if getattr(self.strategy, "releases_every_round", False) else cfg.min_replies
        phase = TrainPhase()
        for attempt in range(attempts):
            phase.attempts = attempt + 1
            phase.sim_seconds += self._attempt(rnd, arrays, attempt, phase)
            if len(phase.accepted) >= needed:
                return phase
        raise self._too_few(rnd, phase)

    def _too_few(self, rnd: int, phase: TrainPhase) -> RunStopped:
        counts = Counter(f["reason"] for f in phase.failures)
        summary = ", ".join(f"{n} {reason}" for reason, n in sorted(counts.items())) or "none"
        detail = next((f["detail"] for f in phase.failures if f["reason"] == "error"), None)
        msg = (f"round {rnd}: only {len(phase.accepted)} valid client replies, fewer than "
               f"failures.min_replies = {self.cfg.min_replies}, after {phase.attempts} "
               f"attempt(s) (failures: {summary})")
        if counts and set(counts) == {"non-finite"}:
            msg += "; every update was NaN/Inf, the local training diverged — "
            msg += _lr_hint(self.scenario.client.lr)
        else:
            if detail:
                msg += f"; first error: {detail}"
            msg += ("; lower failures.dropout / failures.crash, raise failures.deadline or "
                    "failures.retries (with on_too_few = 'retry'), or lower failures.min_replies")
        exc = RunStopped(msg, round=rnd)
        exc.failures = phase.failures
        return exc


def strategy_hook(strategy: Strategy, hook: str, rnd: int, server: ServerConfig, *args):
    """Call one strategy hook; an exception in it (a user's strategy, a bad [server.params]
    value) stops the run with a message naming the strategy and the hook."""
    try:
        return getattr(strategy, hook)(*args)
    except RunStopped:
        raise
    except Exception as exc:
        log.debug("strategy hook failed", exc_info=True)
        params = ", ".join(f"{k} = {v!r}" for k, v in server.params.items())
        raise RunStopped(
            f"round {rnd}: {type(strategy).__name__}.{hook} raised {type(exc).__name__}: "
            f"{exc}; check server.strategy = {server.strategy!r} and [server.params]"
            f" ({params or 'none'})", round=rnd) from exc


def run_rounds(
    strategy: Strategy,
    grid: Grid,
    arrays: ArrayRecord,
    scenario: Scenario,
    evaluate: Callable[[ArrayRecord], dict],
    on_round: Callable[[dict], None],
    start_round: int = 1,
    checkpoint: Callable[..., None] | None = None,
    on_replies: Callable[[int, list[Message], ArrayRecord], None] | None = None,
    bn_statistics: BNStatistics | None = None,
    early_stop: EarlyStopper | None = None,
) -> ArrayRecord:
    """Run rounds ``start_round..server.rounds``; returns the final global arrays.

    ``checkpoint(round, arrays, stateful)`` is called after each round's record. A run that
    cannot go on records the round that stopped it (``"stopped"``) and raises
    :class:`RunStopped`; its ``arrays`` attribute holds the last good global arrays. A round
    that would exceed the DP budget is not started: :class:`PrivacyBudgetSpent`.
    ``early_stop`` sees each record before it is written; the round after which it stops the
    run is evaluated (if it was not), records ``stopped`` and ``early_stop``, is
    checkpointed, and :class:`EarlyStopped` is raised with that round's arrays.
    ``on_replies(round, replies, arrays)``, if given, sees each round's accepted client replies
    and the new global arrays right after aggregation (what a curious server sees; privacy
    audits). ``bn_statistics`` replaces the aggregate's BN running statistics right after
    aggregation (before ``on_replies``, which sees the new global model).
    """
    total = scenario.server.rounds
    runner = RoundRunner(strategy, grid, scenario, bn_statistics)
    budget = getattr(strategy, "stop_before_round", None)  # the DP wrapper's max_epsilon
    if early_stop is not None and early_stop.reason is not None:  # resumed past the stop
        raise _early_stopped(early_stop, start_round - 1, arrays)
    for rnd in range(start_round, total + 1):
        if budget is not None:
            try:
                budget(rnd)
            except PrivacyBudgetSpent as exc:  # the round never starts: nothing to record
                exc.arrays = arrays
                raise
        t0 = time.perf_counter()
        record: dict = {"round": rnd, "failures": [], "updates": 0}
        try:
            arrays, stateful = _one_round(runner, rnd, arrays, record, t0, evaluate,
                                          on_replies)
            stop = _observe(early_stop, record, arrays, evaluate)
        except RunStopped as exc:
            record["stopped"] = str(exc)
            record.setdefault("train_seconds", time.perf_counter() - t0)
            record["seconds"] = time.perf_counter() - t0
            on_round(record)
            exc.arrays = arrays  # the previous round's: the last good global model
            raise
        record["seconds"] = time.perf_counter() - t0
        on_round(record)
        if checkpoint is not None:
            checkpoint(rnd, arrays, stateful)
        if stop:
            raise _early_stopped(early_stop, rnd, arrays)
    return arrays


def _observe(early_stop: EarlyStopper | None, record: dict, arrays: ArrayRecord,
             evaluate: Callable[[ArrayRecord], dict]) -> bool:
    """Feed ``record`` to the stopper; a stopping round is evaluated, so that the run ends
    with the results of its last round (summary, sweeps and claims read them)."""
    if early_stop is None:
        return False
    reason = early_stop.update(record)
    if record.get(early_stop.cfg.metric) is not None:
        record["early_stop"] = early_stop.state()
    if reason is None:
        return False
    if record.get("global_test_accuracy") is None:
        record.update(evaluate(arrays))
    record["stopped"] = reason
    return True


def _early_stopped(early_stop: EarlyStopper, rnd: int, arrays: ArrayRecord) -> EarlyStopped:
    exc = EarlyStopped(early_stop.reason, round=rnd)
    exc.arrays = arrays
    return exc


def _steps_taken(replies: list[Message]) -> dict | None:
    """Local SGD steps of the accepted updates: min, mean, max over clients, and in total."""
    steps = [int(rec.get("steps", 0)) for rec in map(_client_record, replies) if rec is not None]
    if not steps:
        return None
    return {"min": min(steps), "mean": sum(steps) / len(steps), "max": max(steps),
            "total": sum(steps)}


def _one_round(runner: RoundRunner, rnd: int, arrays: ArrayRecord, record: dict, t0: float,
               evaluate: Callable[[ArrayRecord], dict],
               on_replies: Callable[[int, list[Message], ArrayRecord], None] | None = None,
               ) -> tuple[ArrayRecord, bool]:
    """Train, aggregate, evaluate one round into ``record``; returns the new global arrays."""
    strategy, grid, scenario = runner.strategy, runner.grid, runner.scenario
    try:
        phase = runner.train_phase(rnd, arrays)
    except RunStopped as exc:
        record["failures"] = getattr(exc, "failures", [])
        raise
    record.update({
        "clients": sorted(c for c in map(_client_id, phase.accepted) if c is not None),
        "failures": phase.failures,
        "updates": len(phase.accepted),
        "attempts": phase.attempts,
        "sim_seconds": phase.sim_seconds,
        "local_steps": _steps_taken(phase.accepted),
        **round_client_dp(phase.accepted),
        "communication": {"uploaded": _bytes_stats(phase.uploaded),
                          "downloaded": _bytes_stats(phase.downloaded)},
    })
    with sampling_seed(scenario.seed, "aggregate-train", rnd):
        agg, metrics = strategy_hook(strategy, "aggregate_train", rnd, scenario.server, rnd,
                                     phase.accepted)
    for key in ("train_loss", "train_accuracy"):
        record[key] = float(metrics[key]) if metrics and key in metrics else None
    if agg is not None and not all_finite(agg.values()):
        raise RunStopped(f"round {rnd}: the aggregated global model has NaN/Inf values (the "
                         f"run diverged); {_lr_hint(scenario.client.lr)}", round=rnd)
    if agg is not None:
        arrays = agg
        if runner.bn_statistics is not None:
            arrays, bn_record = runner.bn_statistics.step(rnd, phase.accepted, arrays, grid)
            if bn_record is not None:
                record["bn_statistics"] = bn_record
                record["bn_seconds"] = runner.bn_statistics.seconds
    record["train_seconds"] = time.perf_counter() - t0
    if on_replies is not None:
        on_replies(rnd, phase.accepted, arrays)
    with sampling_seed(scenario.seed, "sample-evaluate", rnd):
        ev_messages = list(strategy_hook(strategy, "configure_evaluate", rnd, scenario.server, rnd,
                                         arrays, ConfigRecord(), grid))
    if ev_messages:
        replies = list(grid.send_and_receive(ev_messages, timeout=REPLY_TIMEOUT))
        replies.sort(key=lambda m: (_client_id(m) is None, _client_id(m) or 0))
        with sampling_seed(scenario.seed, "aggregate-evaluate", rnd):
            ev = strategy_hook(strategy, "aggregate_evaluate", rnd, scenario.server, rnd, replies)
        record["federated_evaluation"] = dict(ev) if ev is not None else None
    if rnd % scenario.output.eval_every == 0 or rnd == scenario.server.rounds:
        record.update(evaluate(arrays))
        loss = record.get("global_test_loss")
        if isinstance(loss, float) and not math.isfinite(loss):
            raise RunStopped(f"round {rnd}: the global test loss is {loss} (the run "
                             f"diverged); {_lr_hint(scenario.client.lr)}", round=rnd)
    return arrays, phase.stateful
