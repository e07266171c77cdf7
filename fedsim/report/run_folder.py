"""A finished run's results folder, read defensively: a typed value, or why it is damaged.

Every reader of results folders (``fedsim report``, a finishing sweep, the comparison of
runs, ``fedsim table``) reads them through :func:`read_run`, so one damaged cell — a
``summary.json`` that is not JSON, is a list, or holds a string where a number belongs; a
``rounds.jsonl`` cut short or garbled; a ``scenario.toml`` that no longer parses — is left
out and reported (which file, why) instead of stopping the report with a traceback, exactly
as an unfinished cell is left out.

What is checked is what the readers use: the shape of the sections they open (dicts where
they look keys up, lists where they iterate) and that every number a claim or a table can
read (:data:`fedsim.report.claims.SUMMARY_METRICS`, the per-round records) is a number or
null. A field a reader never opens is not judged.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedsim.config import Scenario, load_written_scenario
from fedsim.errors import ScenarioError
from fedsim.report.claims import SUMMARY_METRICS

SUMMARY = "summary.json"
ROUNDS = "rounds.jsonl"
SCENARIO = "scenario.toml"

#: the numbers of an attack a claim or a table reads, per round (``privacy.mia_by_round``)
_MIA_NUMBERS = tuple(p.rsplit(".", 1)[1] for p in SUMMARY_METRICS
                     if p.startswith("privacy.mia.*."))

#: sections the readers open as tables (``(summary.get(...) or {}).get(...)``)
_TABLES = ("final", "generalization", "timing", "privacy", "privacy.mia", "privacy.client_mia",
           "privacy.inversion", "privacy.leakage", "privacy.leakage.data_mean_recovery", "dp",
           "dp.privacy_spent", "hybrid_alpha")


@dataclass(frozen=True)
class RunFiles:
    """A finished run folder's contents, each checked: the scenario it ran, its summary
    (``summary.json``) and its per-round records (``rounds.jsonl``)."""

    folder: Path
    scenario: Scenario
    summary: dict[str, Any]
    rounds: list[dict[str, Any]]


@dataclass(frozen=True)
class Damaged:
    """A finished run folder that cannot be read: ``file`` (e.g. ``summary.json``) and why."""

    folder: Path
    file: str
    why: str

    def __str__(self) -> str:
        return f"{self.file}: {self.why}"

    def to_json(self) -> dict[str, str]:
        return {"folder": str(self.folder), "file": self.file, "why": self.why}


class _Bad(Exception):
    """A content check failed; the message says where and why."""


def read_run(folder: str | Path) -> RunFiles | Damaged | None:
    """``folder``'s :class:`RunFiles`; a :class:`Damaged` record naming the first file that
    cannot be read; None when the run has not finished (no ``summary.json``)."""
    folder = Path(folder)
    if not (folder / SUMMARY).is_file():
        return None
    try:
        summary = _json_object(_text(folder / SUMMARY))
        check_summary(summary)
    except _Bad as exc:
        return Damaged(folder, SUMMARY, str(exc))
    try:
        scenario = load_written_scenario(folder / SCENARIO)
    except (ScenarioError, OSError, UnicodeDecodeError) as exc:
        return Damaged(folder, SCENARIO, _first_line(exc))
    if not (folder / ROUNDS).is_file():
        return Damaged(folder, ROUNDS, "missing, though summary.json says the run finished")
    try:
        rounds = read_rounds(folder / ROUNDS)
        _check_complete(rounds, summary)
    except _Bad as exc:
        return Damaged(folder, ROUNDS, str(exc))
    return RunFiles(folder, scenario, summary, rounds)


def _check_complete(rounds: list[dict], summary: dict) -> None:
    """The records reach the final round ``summary.json`` names (a file cut at a line
    boundary parses, but ends early)."""
    final = _at(summary, ["final", "round"])
    seen = [r["round"] for r in rounds if "round" in r]
    if _is_int(final) and (not seen or max(seen) < final):
        last = f"ends at round {max(seen)}" if seen else "holds no round"
        raise _Bad(f"{last}, before round {final}, the final round summary.json records: "
                   "the file was cut short")


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0]


def _text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise _Bad("not UTF-8 text") from None
    except OSError as exc:
        raise _Bad(f"cannot be read ({exc.strerror or exc})") from None


def _json_object(text: str, what: str = "") -> dict:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise _Bad(f"{what}not JSON ({exc})") from None
    if not isinstance(value, dict):
        raise _Bad(f"{what}is a JSON {_kind(value)}, not an object")
    return value


def read_rounds(path: Path) -> list[dict[str, Any]]:
    """The records of a ``rounds.jsonl`` (none when the file is absent), each checked; raises
    an error naming the line that is cut short, garbled or holds a non-number."""
    if not path.is_file():
        return []
    text = _text(path)
    lines = text.splitlines()
    records = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        cut = n == len(lines) and not text.endswith("\n")
        try:
            record = _json_object(line, f"line {n} ")
        except _Bad as exc:
            raise _Bad(f"{exc}{'; the file is cut short' if cut else ''}") from None
        _check_record(record, f"line {n}")
        records.append(record)
    return records


def _check_record(record: dict, where: str) -> None:
    if "round" in record and not _is_int(record["round"]):
        raise _Bad(f"{where}: round = {_show(record['round'])} is not an integer")
    _number_or_null(record, "global_test_accuracy", where)
    alphas = record.get("hybrid_alpha")
    if alphas is not None:
        if not isinstance(alphas, dict):
            raise _Bad(f"{where}: hybrid_alpha is a {_kind(alphas)}, not an object")
        for key in alphas:
            _number_or_null(alphas, key, f"{where}: hybrid_alpha")


def check_summary(summary: dict[str, Any]) -> None:
    """Raise when a section a reader opens is not an object, a per-round list is not a list
    of objects, or a number a table or claim reads is not a number (or null)."""
    for section in _TABLES:
        _table_at(summary, section.split("."))
    for pattern in SUMMARY_METRICS:
        for path, value in _matches(summary, pattern.split(".")):
            if value is not None and not _is_number(value):
                raise _Bad(f"{'.'.join(path)} = {_show(value)} is not a number")
    by_round = _at(summary, ["privacy", "mia_by_round"])
    if by_round is not None:
        if not isinstance(by_round, list):
            raise _Bad(f"privacy.mia_by_round is a {_kind(by_round)}, not a list")
        for i, rec in enumerate(by_round):
            where = f"privacy.mia_by_round[{i}]"
            if not isinstance(rec, dict):
                raise _Bad(f"{where} is a {_kind(rec)}, not an object")
            if not _is_int(rec.get("round")) or not _is_number(rec.get("global_test_accuracy")):
                raise _Bad(f"{where} lacks a round number or a global_test_accuracy")
            for attack, metrics in rec.items():
                if isinstance(metrics, dict):
                    for key in _MIA_NUMBERS:
                        _number_or_null(metrics, key, f"{where}.{attack}")


def _at(tree: Any, path: list[str]) -> Any:
    for part in path:
        if not isinstance(tree, dict):
            return None
        tree = tree.get(part)
    return tree


def _table_at(summary: dict, path: list[str]) -> None:
    value = _at(summary, path)
    if value is not None and not isinstance(value, dict):
        raise _Bad(f"{'.'.join(path)} is a {_kind(value)}, not an object")


def _matches(tree: Any, pattern: list[str], path: tuple[str, ...] = ()):
    """(path, value) of every entry of ``tree`` at ``pattern`` (``*``: any one key; under it
    only objects are followed, as a section's other fields are not what it names)."""
    if not pattern:
        yield path, tree
        return
    if not isinstance(tree, dict):
        return
    head, rest = pattern[0], pattern[1:]
    keys = list(tree) if head == "*" else [head] if head in tree else []
    for key in keys:
        if head == "*" and rest and not isinstance(tree[key], dict):
            continue  # e.g. privacy.membership_epsilon.what beside its attacks
        if rest and tree[key] is not None and not isinstance(tree[key], dict):
            raise _Bad(f"{'.'.join((*path, key))} is a {_kind(tree[key])}, not an object")
        yield from _matches(tree[key], rest, (*path, key))


def _number_or_null(table: dict, key: str, where: str) -> None:
    value = table.get(key)
    if value is not None and not _is_number(value):
        raise _Bad(f"{where}: {key} = {_show(value)} is not a number")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _kind(value: Any) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean", int: "number",
            float: "number", type(None): "null"}.get(type(value), type(value).__name__)


def _show(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."
