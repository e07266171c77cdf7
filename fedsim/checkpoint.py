"""Checkpoints: everything a run needs to continue exactly where it stopped.

A checkpoint holds the global arrays, the strategy's state, every client's persistent state,
the round, and the position in ``rounds.jsonl``:

- **strategy state** is every data attribute of the strategy object, found generically
  (ArrayRecords, numpy arrays, tensors, numbers, strings, lists, dicts, nested objects such as
  a wrapped strategy): FedAdam/FedYogi/FedAdagrad moments ``m_t``/``v_t``, FedAvgM's momentum,
  DP clipping norms, control variates. Functions and classes are configuration and are rebuilt
  from the scenario; an attribute that is neither is an error, never silently dropped.
- **client state** is each node's Flower ``Context.state`` (in-process engine). On Flower's
  Ray engine the contexts live inside Flower and cannot be saved: a run whose clients kept
  state there refuses to resume (:func:`load_checkpoint`).
- **RNG state** needs no saving: every stream is derived from (seed, purpose, round, client)
  (:mod:`fedsim.rng`) and the round loop seeds the global RNGs Flower's strategies use
  (Python's ``random`` for sampling, numpy's for DP noise) per round.

The file is ``torch.save`` of ``{"format", "version", "tree", "blob", "sha256"}``: ``tree`` is
JSON text describing every value, ``blob`` one uint8 tensor holding every array's bytes and
``sha256`` a digest of both. It loads with ``torch.load(path, weights_only=True)`` (no pickled
objects, no code runs), and truncation or corruption is detected. Writes are atomic (temp
file, fsync, rename), the previous checkpoint is kept as ``checkpoint.prev.pt``, and an
interrupted write leaves the newest complete checkpoint as ``checkpoint.pt``
(:func:`write_checkpoint`).
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedsim.config import Scenario
from fedsim.engine.store import decode_state
from fedsim.errors import CheckpointError
from fedsim.files import keep_copy, save_torch, writing
from fedsim.state_journal import (
    StateJournal,
    journal_generation,
    read_journal,
    remove_other_journals,
)

FORMAT = "fedsim-checkpoint"
VERSION = 1
LATEST = "checkpoint.pt"
PREVIOUS = "checkpoint.prev.pt"
BAD = "checkpoint.bad.pt"
_MAX_DEPTH = 12
JOURNAL_SLACK = 8 * 2**20  # dead journal bytes tolerated beyond the live ones (x2)

_RECORDS = {"ArrayRecord": ArrayRecord, "ConfigRecord": ConfigRecord,
            "MetricRecord": MetricRecord, "RecordDict": RecordDict}


# --------------------------------------------------------------------------- encoding


def _qualname(obj: object) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def _is_configuration(value: object) -> bool:
    """Functions, classes, modules and loggers: rebuilt from the scenario, not saved."""
    return (inspect.isroutine(value) or inspect.isclass(value) or inspect.ismodule(value)
            or isinstance(value, (functools.partial, logging.Logger)))


class _Encoder:
    """Turns values into a JSON tree; array bytes go to one blob, referenced by offset."""

    def __init__(self) -> None:
        self.chunks: list[bytes | memoryview] = []
        self.size = 0

    def ref(self, data: bytes | memoryview) -> list[int]:
        off = self.size
        self.chunks.append(data)
        self.size += len(data)
        return [off, len(data)]

    def blob(self) -> torch.Tensor:
        buf = bytearray(self.size)
        view = memoryview(buf)
        pos = 0
        for chunk in self.chunks:
            view[pos : pos + len(chunk)] = chunk
            pos += len(chunk)
        if not buf:
            return torch.zeros(0, dtype=torch.uint8)
        return torch.frombuffer(buf, dtype=torch.uint8)

    def value(self, v: Any, path: str, depth: int = 0) -> Any:
        if depth > _MAX_DEPTH:
            raise CheckpointError(f"cannot checkpoint {path}: nested deeper than {_MAX_DEPTH}")
        if isinstance(v, np.generic):
            arr = np.asarray(v)
            if arr.dtype.hasobject:
                raise CheckpointError(f"cannot checkpoint {path}: numpy object scalar")
            return {"t": "npscalar", "dtype": arr.dtype.str, "r": self.ref(arr.tobytes())}
        if v is None or isinstance(v, (bool, int, float, str)):
            return v
        if isinstance(v, (bytes, bytearray)):
            return {"t": "bytes", "r": self.ref(bytes(v))}
        if isinstance(v, np.ndarray):
            if v.dtype.hasobject:
                raise CheckpointError(f"cannot checkpoint {path}: numpy array of Python objects")
            arr = np.ascontiguousarray(v).reshape(v.shape)  # ascontiguousarray makes 0-d 1-d
            return {"t": "ndarray", "dtype": arr.dtype.str, "shape": list(v.shape),
                    "r": self.ref(memoryview(arr.reshape(-1).view(np.uint8)))}
        if isinstance(v, torch.Tensor):
            t = v.detach().cpu().contiguous()
            raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
            return {"t": "tensor", "dtype": str(t.dtype).removeprefix("torch."),
                    "shape": list(t.shape), "r": self.ref(raw)}
        if isinstance(v, Array):
            return {"t": "Array", "dtype": v.dtype, "shape": list(v.shape), "stype": v.stype,
                    "r": self.ref(v.data)}
        for name, cls in _RECORDS.items():
            if isinstance(v, cls):
                return {"t": name, "items": [[k, self.value(x, f"{path}[{k!r}]", depth + 1)]
                                             for k, x in v.items()]}
        if isinstance(v, list):
            return [self.value(x, f"{path}[{i}]", depth + 1) for i, x in enumerate(v)]
        if isinstance(v, tuple):
            return {"t": "tuple",
                    "items": [self.value(x, f"{path}[{i}]", depth + 1) for i, x in enumerate(v)]}
        if isinstance(v, (set, frozenset)):  # e.g. the DP wrapper's set of noised array names
            items = sorted(v, key=repr)  # a fixed order, so equal sets write equal bytes
            return {"t": type(v).__name__,
                    "items": [self.value(x, f"{path} item", depth + 1) for x in items]}
        if isinstance(v, dict):
            return {"t": "dict", "items": [[self.value(k, f"{path} key", depth + 1),
                                            self.value(x, f"{path}[{k!r}]", depth + 1)]
                                           for k, x in v.items()]}
        raise CheckpointError(
            f"cannot checkpoint {path}: a {_qualname(v)} is not data (arrays, numbers, strings, "
            "lists, dicts, Flower records); keep such state out of containers or set "
            "output.checkpoint_every = 0"
        )

    def object(self, obj: object, path: str, depth: int = 0, seen: set[int] | None = None
               ) -> dict:
        """Every data attribute of ``obj`` (recursing into attribute objects, e.g. a wrapped
        strategy); functions and classes are skipped as configuration."""
        seen = set() if seen is None else seen
        if id(obj) in seen or depth > _MAX_DEPTH:
            raise CheckpointError(f"cannot checkpoint {path}: it refers back to itself")
        seen.add(id(obj))
        attrs = []
        for name, value in vars(obj).items():
            sub = f"{path}.{name}"
            if _is_configuration(value):
                continue
            if isinstance(value, torch.nn.Module):  # e.g. a server-side model: its state_dict
                attrs.append([name, {"t": "module", "class": _qualname(value), "state":
                                     self.value(dict(value.state_dict()), sub, depth + 1)}])
                continue
            try:
                attrs.append([name, self.value(value, sub, depth + 1)])
            except CheckpointError:
                if not hasattr(value, "__dict__"):
                    raise
                attrs.append([name, self.object(value, sub, depth + 1, seen)])
        return {"t": "object", "class": _qualname(obj), "attrs": attrs}


class _Decoder:
    def __init__(self, blob: memoryview) -> None:
        self.blob = blob

    def raw(self, ref: list[int]) -> memoryview:
        off, n = ref
        return self.blob[off : off + n]

    def value(self, node: Any) -> Any:
        if isinstance(node, list):
            return [self.value(x) for x in node]
        if not isinstance(node, dict):
            return node
        kind = node["t"]
        if kind == "npscalar":
            return np.frombuffer(self.raw(node["r"]), dtype=np.dtype(node["dtype"]))[0]
        if kind == "bytes":
            return bytes(self.raw(node["r"]))
        if kind == "ndarray":
            dtype = np.dtype(node["dtype"])
            flat = np.frombuffer(self.raw(node["r"]), dtype=dtype)
            return flat.reshape(tuple(node["shape"])).copy()
        if kind == "tensor":
            dtype = getattr(torch, node["dtype"])
            raw = self.raw(node["r"])
            flat = (torch.frombuffer(bytearray(raw), dtype=torch.uint8) if len(raw)
                    else torch.zeros(0, dtype=torch.uint8))
            return flat.view(dtype).reshape(tuple(node["shape"])).clone()
        if kind == "Array":
            return Array(dtype=node["dtype"], shape=tuple(node["shape"]), stype=node["stype"],
                         data=bytes(self.raw(node["r"])))
        if kind in _RECORDS:
            record = _RECORDS[kind]()  # item by item: cheaper than from a dict for Arrays
            for k, x in node["items"]:
                record[k] = self.value(x)
            return record
        if kind == "tuple":
            return tuple(self.value(x) for x in node["items"])
        if kind in ("set", "frozenset"):
            items = (_hashable(self.value(x)) for x in node["items"])
            return set(items) if kind == "set" else frozenset(items)
        if kind == "dict":
            return {_hashable(self.value(k)): self.value(x) for k, x in node["items"]}
        raise CheckpointError(f"unknown value kind {kind!r} in checkpoint")

    def restore(self, obj: object, node: dict, path: str) -> None:
        """Set the saved attributes on ``obj``, a freshly built object of the same class."""
        if node["class"] != _qualname(obj):
            raise CheckpointError(
                f"the checkpoint holds {path} of class {node['class']}, but this run built "
                f"{_qualname(obj)}; resume with the strategy the run started with"
            )
        for name, value in node["attrs"]:
            if isinstance(value, dict) and value.get("t") == "module":
                target = getattr(obj, name, None)
                if not isinstance(target, torch.nn.Module):
                    raise CheckpointError(
                        f"cannot restore {path}.{name}: this run's strategy has no such module")
                target.load_state_dict(self.value(value["state"]))
            elif isinstance(value, dict) and value.get("t") == "object":
                target = getattr(obj, name, None)
                if target is None:
                    raise CheckpointError(
                        f"cannot restore {path}.{name}: this run's strategy has no such object"
                    )
                self.restore(target, value, f"{path}.{name}")
            else:
                object.__setattr__(obj, name, self.value(value))


def _hashable(key: Any) -> Any:
    return tuple(_hashable(k) for k in key) if isinstance(key, (list, tuple)) else key


def _digest(tree: str, blob: torch.Tensor) -> str:
    h = hashlib.sha256(f"{FORMAT}/{VERSION}\0".encode())
    h.update(tree.encode("utf-8"))
    h.update(b"\0")
    if blob.numel():
        h.update(blob.numpy())
    return h.hexdigest()


def scenario_digest(scenario: Scenario) -> str:
    """Fingerprint of a resolved scenario (checkpoints refuse another scenario's folder)."""
    text = json.dumps(scenario.to_dict(), sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------- the file


@dataclass
class Checkpoint:
    """One saved state of a run, after round ``round`` (0: the initial model)."""

    round: int
    arrays: ArrayRecord
    meta: dict[str, Any]
    strategy: dict | None = None  # the encoded strategy, applied by :meth:`restore_strategy`
    clients: dict[int, RecordDict] | None = None  # node id → Context.state (in-process)
    client_bytes: dict[int, int] = field(default_factory=dict)  # their sizes in the journal
    privacy: dict | None = None  # the privacy audits' captures (AuditSuite.checkpoint_state)
    rounds: list[dict] = field(default_factory=list)  # rounds.jsonl up to this checkpoint
    path: Path | None = None
    _decoder: _Decoder | None = None

    def restore_strategy(self, strategy: object) -> None:
        """Put the saved strategy state into ``strategy`` (built fresh from the scenario)."""
        if self.strategy is not None:
            self._decoder.restore(strategy, self.strategy, "strategy")


def encode_checkpoint(rnd: int, arrays: ArrayRecord, strategy: object,
                      clients: dict[int, RecordDict] | None, meta: dict[str, Any],
                      privacy: dict | None = None) -> dict:
    """The payload ``torch.save`` writes (see the module docstring)."""
    enc = _Encoder()
    tree = {
        "meta": {**meta, "round": rnd},
        "arrays": enc.value(arrays, "global arrays"),
        "strategy": enc.object(strategy, "strategy"),
        "clients": (None if clients is None else
                    [[int(k), enc.value(v, f"client state of node {k}")]
                     for k, v in clients.items()]),
        "privacy": None if privacy is None else enc.value(privacy, "privacy audit"),
    }
    text = json.dumps(tree, allow_nan=True)
    blob = enc.blob()
    return {"format": FORMAT, "version": VERSION, "tree": text, "blob": blob,
            "sha256": _digest(text, blob)}


def write_checkpoint(folder: str | Path, payload: dict) -> Path:
    """Write ``payload`` as ``folder/checkpoint.pt``; the one it replaces becomes ``.prev``.

    The newest complete checkpoint is ``checkpoint.pt`` at every moment, whenever the write
    is interrupted (a signal, a full disk, a crash): the current one is first linked as
    ``checkpoint.prev.pt`` (atomically; it stays ``checkpoint.pt`` too), then the new one is
    written beside it and renamed over ``checkpoint.pt`` (:func:`fedsim.files.save_torch`).
    So an interrupted run's ``interrupted:`` line and ``--resume`` name the same round.
    """
    folder = Path(folder)
    latest = folder / LATEST
    if latest.exists():
        keep_copy(latest, folder / PREVIOUS)
    return save_torch(payload, latest)


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Load and verify one checkpoint file; CheckpointError names the file on any damage."""
    path = Path(path)
    try:
        payload = torch.load(path, weights_only=True, map_location="cpu")
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint") from None
    except Exception as exc:
        raise CheckpointError(
            f"{path}: cannot be read as a fedsim checkpoint ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); it is truncated or corrupted"
        ) from None
    keys = {"format", "version", "tree", "blob", "sha256"}
    if not isinstance(payload, dict) or not keys <= set(payload) \
            or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a fedsim checkpoint (expected a {FORMAT} file)")
    if payload["version"] != VERSION:
        raise CheckpointError(
            f"{path}: checkpoint version {payload['version']} is not {VERSION}; resume it with "
            "the fedsim version that wrote it"
        )
    tree, blob = payload["tree"], payload["blob"]
    if not isinstance(tree, str) or not isinstance(blob, torch.Tensor) \
            or blob.dtype != torch.uint8 or _digest(tree, blob) != payload["sha256"]:
        raise CheckpointError(f"{path}: checksum mismatch; the checkpoint is corrupted")
    try:
        data = json.loads(tree)
        dec = _Decoder(memoryview(blob.numpy()) if blob.numel() else memoryview(b""))
        clients = data["clients"]
        clients = None if clients is None else {int(k): dec.value(v) for k, v in clients}
        sizes: dict[int, int] = {}
        journal = data["meta"].get("client_journal")
        if journal is not None:  # the states live in the journal beside the checkpoint
            raw = read_journal(path.parent / journal["file"], int(journal["bytes"]))
            clients = {k: decode_state(v) for k, v in sorted(raw.items())}
            sizes = {k: len(v) for k, v in raw.items()}
        return Checkpoint(
            round=int(data["meta"]["round"]),
            arrays=dec.value(data["arrays"]),
            meta=data["meta"],
            strategy=data["strategy"],
            clients=clients,
            client_bytes=sizes,
            privacy=None if data.get("privacy") is None else dec.value(data["privacy"]),
            path=path,
            _decoder=dec,
        )
    except CheckpointError:
        raise
    except Exception as exc:  # a digest-valid file from a different layout
        raise CheckpointError(f"{path}: unreadable checkpoint content ({exc})") from None


# --------------------------------------------------------------------------- resume


def _rounds_prefix(folder: Path, ckpt: Checkpoint) -> list[dict]:
    """The ``rounds.jsonl`` records the checkpoint covers (checked line by line)."""
    path = folder / "rounds.jsonl"
    lines, size = int(ckpt.meta["rounds_lines"]), int(ckpt.meta["rounds_bytes"])
    try:
        with open(path, "rb") as fh:
            raw = fh.read(size)
    except FileNotFoundError:
        raise CheckpointError(
            f"{path}: missing; the checkpoint needs its first {lines} lines") from None
    text = raw.decode("utf-8", errors="replace")
    records = []
    for line in text.splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            records = []
            break
    ok = (len(raw) == size and len(records) == lines and text.endswith("\n" if lines else "")
          and [r.get("round") for r in records] == list(range(len(records))))
    if not ok:
        raise CheckpointError(
            f"{path}: does not hold the {lines} rounds (JSON lines, rounds 0..{lines - 1}, "
            f"{size} bytes) that {ckpt.path.name} was written after; it was truncated or edited"
        )
    return records


def load_checkpoint(folder: str | Path, scenario: Scenario,
                    warn=lambda msg: None) -> Checkpoint:
    """The newest valid checkpoint of results folder ``folder`` for ``scenario``.

    A damaged ``checkpoint.pt`` is reported through ``warn``, moved to ``checkpoint.bad.pt``
    and the previous checkpoint used; with no valid checkpoint, CheckpointError names the files.
    """
    folder = Path(folder)
    latest, previous = folder / LATEST, folder / PREVIOUS
    if not latest.exists() and not previous.exists():
        raise CheckpointError(
            f"{folder}: no checkpoint to resume from (the run stopped before its first "
            "checkpoint, or output.checkpoint_every = 0); start it again with --overwrite"
        )
    errors = []
    ckpt = None
    for path in (latest, previous):
        if not path.exists():
            continue
        try:
            ckpt = read_checkpoint(path)
            break
        except CheckpointError as exc:
            errors.append(str(exc))
    if ckpt is None:
        raise CheckpointError("; ".join(errors) + "; no valid checkpoint left to resume from")
    if errors:
        warn(f"{errors[0]}; resuming from the previous checkpoint {ckpt.path} "
             f"(round {ckpt.round})")
        if latest.exists():
            with writing(folder / BAD):
                os.replace(latest, folder / BAD)
    if ckpt.meta.get("scenario_sha256") != scenario_digest(scenario):
        raise CheckpointError(
            f"{ckpt.path}: was written for another scenario than {folder / 'scenario.toml'} "
            "(the file was edited); restore it or start a new run"
        )
    if ckpt.meta.get("stateful_clients") and ckpt.clients is None:
        raise CheckpointError(
            f"{ckpt.path}: the clients of this run keep state (Flower Context.state) inside "
            f"the {ckpt.meta.get('engine')} engine, which fedsim cannot checkpoint; resuming "
            "would lose it. Start the run again, or use engine.kind = 'inprocess' for "
            "resumable runs with stateful clients"
        )
    ckpt.rounds = _rounds_prefix(folder, ckpt)
    return ckpt


class RoundsLog(Protocol):
    """What a checkpoint needs of the run folder (:class:`fedsim.sinks.RunFolder`)."""

    out: Path  # the folder checkpoints are written into
    resumed_from: list[int]  # the rounds earlier parts of the run were resumed from

    def rounds_position(self) -> tuple[int, int]:
        """(lines, bytes) of ``rounds.jsonl`` so far, flushed to disk."""

    def elapsed(self) -> float:
        """Seconds the run has been going, over every resumed part."""

    def on_checkpoint(self, seconds: float, size: int) -> None:
        """A checkpoint of ``size`` bytes took ``seconds`` to write."""


class Checkpointer:
    """Writes a run's checkpoints every ``output.checkpoint_every`` rounds and at the end,
    into the run folder ``sink`` (the ``rounds.jsonl`` position, the elapsed time and the
    rounds this run was resumed from come from it too)."""

    def __init__(self, sink: RoundsLog, scenario: Scenario, strategy: object, grid,
                 resumed: Checkpoint | None = None, audit=None) -> None:
        self.sink = sink
        self.scenario = scenario
        self.strategy = strategy
        self.audit = audit  # an AuditSuite whose captures go into every checkpoint
        base = getattr(grid, "base", grid)
        self.export = getattr(base, "export_states", None)
        self.changes = getattr(base, "export_changes", None)  # journaled client states
        self.export_raw = getattr(base, "export_raw", None)
        self.stateful = bool(resumed.meta.get("stateful_clients")) if resumed else False
        self.digest = scenario_digest(scenario)  # once: the scenario is frozen for the run
        self.seconds: list[float] = []  # time each checkpoint took to write
        self.bytes = 0  # size of the last one
        self.journal: StateJournal | None = None
        self.live: dict[int, int] = {}  # client -> bytes of its latest journal entry
        self._journals = set()  # journal files the latest and previous checkpoints use
        info = resumed.meta.get("client_journal") if resumed else None
        if info is not None and self.changes is not None and self.enabled:
            self.journal = StateJournal(sink.out, journal_generation(info["file"]),
                                        valid_bytes=int(info["bytes"]))
            self.live = dict(resumed.client_bytes)
            self._journals = {info["file"]}

    @property
    def enabled(self) -> bool:
        return self.scenario.output.checkpoint_every > 0

    def due(self, rnd: int) -> bool:
        every = self.scenario.output.checkpoint_every
        return every > 0 and (rnd % every == 0 or rnd == self.scenario.server.rounds)

    def __call__(self, rnd: int, arrays: ArrayRecord, stateful: bool = False) -> None:
        """Called after every round; writes a checkpoint when one is due."""
        self.stateful = self.stateful or stateful
        if not self.enabled or not self.due(rnd):
            return
        t0 = time.perf_counter()
        lines, size = self.sink.rounds_position()
        journal = None
        if self.changes is not None and self.export_raw is not None:
            journal = self._journal_states()  # None while no client holds state
            clients = None
        else:
            clients = self.export() if self.export is not None else None
        meta = {
            "rounds_lines": lines,
            "rounds_bytes": size,
            "elapsed_seconds": self.sink.elapsed(),
            "scenario_sha256": self.digest,
            "engine": self.scenario.engine.kind,
            "stateful_clients": self.stateful or bool(clients) or bool(self.live),
            "resumed_from": list(self.sink.resumed_from),
            "written": time.time(),
        }
        if journal is not None:
            meta["client_journal"] = journal
        privacy = self.audit.checkpoint_state() if self.audit is not None else None
        payload = encode_checkpoint(rnd, arrays, self.strategy, clients, meta, privacy)
        path = write_checkpoint(self.sink.out, payload)
        if journal is not None:  # generations neither this nor the previous checkpoint reads
            current = journal["file"]
            remove_other_journals(self.sink.out, self._journals | {current})
            self._journals = {current}  # this one becomes the previous checkpoint's
        self.seconds.append(time.perf_counter() - t0)
        self.bytes = path.stat().st_size
        self.sink.on_checkpoint(self.seconds[-1], self.bytes)


    def _journal_states(self) -> dict[str, Any] | None:
        """Append the client states changed since the last checkpoint (or, for the first one
        and when dead entries dominate, start a new generation with the live states only);
        returns what the checkpoint records of the journal (None, and no file, while no
        client holds state)."""
        changes = self.changes()
        if self.journal is not None:
            self.journal.append(changes)
            for key, data in changes:
                if data is None:
                    self.live.pop(key, None)
                else:
                    self.live[key] = len(data)
        live = sum(self.live.values())
        if self.journal is None or self.journal.size > 2 * live + JOURNAL_SLACK:
            states = self.export_raw()
            if self.journal is None and not states:
                return None
            generation = 0 if self.journal is None else self.journal.generation + 1
            if self.journal is not None:
                self.journal.close()
            self.journal = StateJournal(self.sink.out, generation)
            self.journal.append(states)
            self.live = {k: len(v) for k, v in states}
        return {"file": self.journal.name, "bytes": self.journal.size,
                "clients": len(self.live)}

    def close(self) -> None:
        if self.journal is not None:
            self.journal.close()


def resume_state(ckpt: Checkpoint, strategy: object, grid, audit=None
                 ) -> tuple[ArrayRecord, int]:
    """Put ``ckpt`` into a fresh run: strategy state, client states and the privacy audit's
    captures restored; returns the global arrays and the first round still to run."""
    ckpt.restore_strategy(strategy)
    if audit is not None:
        if ckpt.privacy is None:
            raise CheckpointError(f"{ckpt.path}: holds no privacy audit captures, but the "
                                  "scenario audits privacy; start the run again")
        audit.restore_state(ckpt.privacy)
    if ckpt.clients:
        base = getattr(grid, "base", grid)
        if not hasattr(base, "import_states"):
            raise CheckpointError(
                f"{ckpt.path}: holds client states, but this engine cannot take them back"
            )
        base.import_states(ckpt.clients)
    return ckpt.arrays, ckpt.round + 1
