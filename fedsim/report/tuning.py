"""Each arm's tuned values: scores of the grid on the validation split, the choice, the table.

A sweep with ``[sweep.tune]`` runs every arm at every grid value on each tuning seed
(:func:`fedsim.cells.tune_cells`); this module reads those cells' ``summary.json`` and picks,
per arm, the value with the best mean of the tuning metric over the tuning seeds (a
validation metric: selection never reads test data). Rules:

- a value counts only when it finished on every tuning seed: one that stopped early on any
  seed (diverged, too few replies; a DP budget's planned stop is not a failure) or lacks the
  metric cannot be chosen — a learning rate that diverges on one seed in two is no choice;
- ties (equal means) go to the value listed first in the grid (the grid's product order:
  the first key varies slowest), so the grid's order says which to prefer;
- a choice at the edge of a numeric grid is flagged: the best may lie beyond it.

Fair comparisons tune each arm on held-out data, with tuning seeds apart from the reported
ones (Zhong et al. 2023, FixBN; Casella et al., IEEE Access 2024).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fedsim.config import TuneConfig
from fedsim.report.run_folder import Damaged, read_run
from fedsim.text import code, markdown


def _metric(summary: dict, metric: str) -> float | None:
    tree: Any = summary
    for part in metric.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    if isinstance(tree, bool) or not isinstance(tree, (int, float)) or not math.isfinite(tree):
        return None
    return float(tree)


def stopped_early(summary: dict) -> str | None:
    """Why a run stopped before its last round (diverged, too few replies), or None; a
    planned stop — a DP budget's (``dp.stopped``) or one marked ``stopped.planned`` — is a
    complete run."""
    stopped = summary.get("stopped")
    if not stopped or stopped.get("planned") or (summary.get("dp") or {}).get("stopped"):
        return None
    rnd, reason = stopped.get("round"), str(stopped.get("reason"))
    return f"stopped at round {rnd}: {reason.removeprefix(f'round {rnd}: ')}"


def _label(arm: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in arm.items()) or "all cells"


def tuning_result(root: Path, tune: TuneConfig, cells: list[dict],
                  followers: Sequence[tuple[dict, dict]] = (),
                  warn: Callable[[str], None] | None = None) -> dict:
    """The ``tuning`` entry of ``report.json``: per arm, each grid value's scores (per seed
    and their mean, or why it cannot be chosen) and the chosen values.

    ``cells``: the tuning cells' records (:meth:`fedsim.cells.TuneCell.record`), whose
    folders lie under ``root``. Unfinished cells leave their value unscored; so do damaged
    ones (:func:`fedsim.report.run_folder.read_run`), each also told to ``warn``.
    ``followers``: (arm, the arm it follows) for arms that take another arm's choice
    (``sweep.tune.follow``, :func:`fedsim.cells.followers`); each gets that arm's choice and
    ``follows`` (its label), with no candidates of its own.
    """
    arms: list[dict] = []
    for cell in cells:
        entry = next((a for a in arms if a["arm"] == cell["arm"]), None)
        if entry is None:
            entry = {"arm": cell["arm"], "label": _label(cell["arm"]), "candidates": []}
            arms.append(entry)
        cand = next((c for c in entry["candidates"] if c["values"] == cell["values"]), None)
        if cand is None:
            cand = {"values": cell["values"], "applied": cell["applied"], "per_seed": {},
                    "mean": None, "problems": []}
            entry["candidates"].append(cand)
        files = read_run(Path(root) / cell["name"])
        summary = files.summary if files is not None and not isinstance(files, Damaged) \
            else None
        value = None
        if isinstance(files, Damaged):
            cand["problems"].append(f"seed {cell['seed']} damaged ({files})")
            if warn is not None:
                warn(f"tuning cell {cell['name']} is damaged and left unscored ({files})")
        elif summary is None:
            cand["problems"].append(f"seed {cell['seed']} unfinished")
        elif (why := stopped_early(summary)) is not None:
            cand["problems"].append(f"seed {cell['seed']} {why}")
        elif (value := _metric(summary, tune.metric)) is None:
            cand["problems"].append(f"seed {cell['seed']} has no {tune.metric}")
        cand["per_seed"][str(cell["seed"])] = value
    for entry in arms:
        for cand in entry["candidates"]:
            scores = list(cand["per_seed"].values())
            if not cand["problems"] and scores:
                cand["mean"] = sum(scores) / len(scores)
        entry.update(_choose(tune, entry["candidates"]), follows=None)
    for arm, lead in followers:
        led = next(a for a in arms if a["arm"] == lead)
        arms.append({"arm": arm, "label": _label(arm), "candidates": [],
                     "chosen": led["chosen"], "at_edge": [], "follows": led["label"],
                     "why_none": led["why_none"] and f"it follows {led['label']}: "
                                                    f"{led['why_none']}"})
    return {"metric": tune.metric, "best": tune.best, "seeds": list(tune.seeds),
            "grid": tune.grid, "scale": tune.scale, "arms": arms}


def _choose(tune: TuneConfig, candidates: list[dict]) -> dict:
    """The winning candidate (first of the best means) and whether it sits at a grid edge."""
    ok = [c for c in candidates if c["mean"] is not None]
    if not ok:
        return {"chosen": None, "at_edge": [],
                "why_none": "no value finished on every tuning seed with the metric"}
    sign = 1 if tune.best == "max" else -1
    best = max(ok, key=lambda c: sign * c["mean"])  # max keeps the first of equal keys
    edges = []
    for key, values in tune.grid.items():
        numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if len(numbers) >= 2 and len(numbers) == len(values):
            v = best["values"][key]
            if v in (min(numbers), max(numbers)):
                edges.append(f"{key} = {v} is the grid's "
                             f"{'largest' if v == max(numbers) else 'smallest'} value")
    return {"chosen": {"values": best["values"], "applied": best["applied"],
                       "mean": best["mean"]},
            "at_edge": edges, "why_none": None}


def _num(x: float | None) -> str:
    return "–" if x is None else f"{x:.4f}"


def _values(c: dict) -> list[str]:
    """The candidate's grid values as Markdown table cells (a value is data, escaped)."""
    out = []
    for key, value in c["values"].items():
        applied = c["applied"].get(key, value)
        out.append(markdown(value) if applied == value
                   else f"{markdown(value)} (→ {applied:.4g})")
    return out


def chosen_of(entry: dict) -> dict:
    """An arm's chosen values as a candidate row (``values``, ``applied``)."""
    return {"values": entry["chosen"]["values"], "applied": entry["chosen"]["applied"]}


def tuning_lines(result: dict | None) -> list[str]:
    """The Tuning section of report.md: what each arm tried and chose (arm labels, values and
    keys escaped for Markdown, :mod:`fedsim.text`)."""
    if not result:
        return []
    keys = list(result["grid"])
    seeds = [str(s) for s in result["seeds"]]
    better = "higher" if result["best"] == "max" else "lower"
    lines = ["", "## Tuning", "",
             f"Each arm ran every value of `sweep.tune.grid` on the tuning seeds "
             f"{result['seeds']} and kept the best mean {code(result['metric'])} ({better} is "
             "better) — the validation split, never the test set. A value that stopped early "
             "on any tuning seed cannot be chosen; ties go to the value listed first. The "
             "reported seeds then ran at the chosen values."]
    if any(e.get("follows") for e in result["arms"]):
        lines.append("An arm marked \"follows\" ran no tuning cells: it takes the values "
                     "chosen for the arm named (`sweep.tune.follow`).")
    if result["scale"]:
        lines.append("Scaled keys run at grid value × " + ", ".join(
            f"{code(by)} ({code(key)})" for key, by in result["scale"].items())
            + " of their cell: the value after → is what ran.")
    lines += ["", "| arm | " + " | ".join(code(k) for k in keys) + " | mean | "
              + " | ".join(f"seed {s}" for s in seeds) + " | |",
              "|" + "---|" * (len(keys) + len(seeds) + 3)]
    for entry in result["arms"]:
        chosen = (entry["chosen"] or {}).get("values")
        for i, cand in enumerate(entry["candidates"]):
            mark = ("**chosen**" if cand["values"] == chosen
                    else markdown("; ".join(cand["problems"])))
            bold = (lambda t: f"**{t}**") if cand["values"] == chosen else (lambda t: t)
            lines.append("| " + " | ".join(
                [markdown(entry["label"]) if i == 0 else "", *[bold(v) for v in _values(cand)],
                 bold(_num(cand["mean"])), *[_num(cand["per_seed"].get(s)) for s in seeds],
                 mark]) + " |")
        if entry.get("follows"):
            values = _values(chosen_of(entry)) if entry["chosen"] else ["–"] * len(keys)
            lines.append("| " + " | ".join(
                [markdown(entry["label"]), *values, "–", *["–" for _ in seeds],
                 f"not tuned: follows {markdown(entry['follows'])}"]) + " |")
    notes = [f"- {markdown(e['label'])}: {markdown('; '.join(e['at_edge']))}: the best may lie "
             "beyond the grid" for e in result["arms"] if e["at_edge"]]
    notes += [f"- {markdown(e['label'])}: nothing chosen: {e['why_none']}"
              for e in result["arms"] if e["why_none"]]
    if notes:
        lines += ["", *notes]
    return lines
