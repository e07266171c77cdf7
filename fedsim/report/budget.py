"""Budgets you can see: learning curves across seeds, a plateau check, rounds to a target.

A comparison at a fixed number of rounds can say "learns faster" when it means to say "ends
better". A sweep report therefore draws each arm's learning curve (mean over seeds with its
95% t-interval at every evaluated round) and checks whether the best arm has plateaued;
``rounds_to_accuracy`` (:func:`rounds_to_target`) makes "learns faster" a claim of its own.

Plateau check: the best arm is the one with the highest mean (over seeds) final global test
accuracy. Its curve is the mean over seeds of the global test accuracy at each evaluated
round; the check reads that curve over the **last quarter of rounds** — the evaluated rounds
r ≥ 0.75·R, R the arm's ``server.rounds`` — and calls it converged when max − min over those
rounds is below ``PLATEAU_POINTS`` (0.5 accuracy points). Max − min over several evaluations
is the strict reading (any swing counts); with fewer than two evaluations in the window the
check cannot be made and the report says so (evaluate more often: ``output.eval_every``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedsim.files import save_figure
from fedsim.report.stats import t_interval
from fedsim.text import markdown, mathtext

#: the plateau check's threshold: change of the best arm's accuracy over the last quarter
PLATEAU_POINTS = 0.005
#: the plateau window: evaluated rounds at or after this fraction of the arm's rounds
LAST_QUARTER = 0.75

Curve = Sequence[tuple[int, float]]


def mean_curve(curves: Sequence[Curve], level: float = 0.95
               ) -> list[tuple[int, float, float | None, float | None, int]]:
    """(round, mean, ci_low, ci_high, n) at every round any curve records: the mean over the
    curves that have it and its t-interval (None for fewer than two)."""
    by_round: dict[int, list[float]] = {}
    for curve in curves:
        for rnd, value in curve:
            if value is not None and math.isfinite(value):
                by_round.setdefault(int(rnd), []).append(float(value))
    out = []
    for rnd in sorted(by_round):
        values = by_round[rnd]
        ci = t_interval(values, level)
        out.append((rnd, float(np.mean(values)), *(ci or (None, None)), len(values)))
    return out


def rounds_to_target(records: Sequence[dict], path: Sequence[str], target: float,
                     total: int | None = None) -> tuple[int | None, str | None]:
    """(first evaluated round whose metric at ``path`` is ≥ ``target``, None) — or, when no
    round reaches it, (None, why): the run is **censored**, its rounds-to-target unknown
    (only known to exceed its budget), and never stands in as a number."""
    best = None
    for rec in records:
        value: Any = rec
        for part in path:
            value = value.get(part) if isinstance(value, dict) else None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if value >= target:
            return int(rec["round"]), None
        best = value if best is None else max(best, value)
    rounds = f" in {total} rounds" if total is not None else ""
    seen = f" (best {best:.4f})" if best is not None else " (no evaluated round records it)"
    return None, f"never reached {target:g}{rounds}{seen}"


def plateau(arms: Sequence[dict]) -> dict:
    """The plateau check (see the module doc) over ``arms``: each ``label``, ``rounds`` (its
    ``server.rounds``), ``curves`` (one ``[(round, accuracy)]`` per seed) and ``finals`` (each
    seed's final global test accuracy). Returns the ``plateau`` entry of ``report.json``."""
    rows = []
    for arm in arms:
        curve = mean_curve(arm["curves"])
        start = LAST_QUARTER * arm["rounds"]
        window = [(r, m) for r, m, *_ in curve if r >= start]
        change = (max(m for _, m in window) - min(m for _, m in window)
                  if len(window) >= 2 else None)
        finals = [f for f in arm["finals"] if f is not None]
        rows.append({"arm": arm["label"], "rounds": arm["rounds"],
                     "final_accuracy": float(np.mean(finals)) if finals else None,
                     "window": [r for r, _ in window], "change": change,
                     "plateaued": None if change is None else change < PLATEAU_POINTS})
    ranked = [r for r in rows if r["final_accuracy"] is not None]
    best = max(ranked, key=lambda r: r["final_accuracy"]) if ranked else None
    return {"metric": "global_test_accuracy", "threshold": PLATEAU_POINTS,
            "window": f"evaluated rounds >= {LAST_QUARTER} x server.rounds",
            "best_arm": best["arm"] if best else None,
            "converged": best["plateaued"] if best else None, "arms": rows}


def _pts(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.2f} points"


def plateau_lines(result: dict) -> list[str]:
    """The plateau section of report.md: the verdict on the best arm, then every arm (arm
    labels, built from axis values, escaped for Markdown: :mod:`fedsim.text`)."""
    if not result["arms"]:
        return []
    best = next((r for r in result["arms"] if r["arm"] == result["best_arm"]), None)
    lines = ["", "## Budget", "",
             "**Plateau check**: the best arm (highest mean final global test accuracy) "
             f"must change by less than {100 * PLATEAU_POINTS:g} points — max − min of its "
             "mean-over-seeds accuracy — over the last quarter of its rounds (evaluated "
             f"rounds ≥ {LAST_QUARTER:g} × server.rounds).", ""]
    arm = markdown(best["arm"]) if best is not None else ""
    if best is None:
        lines.append("No finished cell records a final global test accuracy: nothing to check.")
    elif best["change"] is None:
        lines.append(f"**Not checked**: the best arm ({arm}) has fewer than two "
                     f"evaluated rounds in its last quarter (rounds ≥ "
                     f"{LAST_QUARTER * best['rounds']:g}); evaluate more often "
                     "(output.eval_every) to check it. Treat the verdicts as comparisons at "
                     "this budget.")
    elif best["plateaued"]:
        lines.append(f"**Converged** by this check: the best arm ({arm}) changed by "
                     f"{_pts(best['change'])} over rounds {best['window'][0]}–"
                     f"{best['window'][-1]}.")
    else:
        lines.append(f"**The study did not converge**: the best arm ({arm}) still "
                     f"changed by {_pts(best['change'])} over rounds {best['window'][0]}–"
                     f"{best['window'][-1]}. Its verdicts compare arms at this budget, not at "
                     "their end points: raise server.rounds, or claim what is learned faster "
                     "(metric = \"rounds_to_accuracy\").")
    lines += ["", "| arm | rounds | final test acc (mean) | change over the last quarter | "
              "plateaued |", "|---|---|---|---|---|"]
    for r in result["arms"]:
        flag = "–" if r["plateaued"] is None else ("yes" if r["plateaued"] else "no")
        acc = "–" if r["final_accuracy"] is None else f"{r['final_accuracy']:.4f}"
        lines.append(f"| {markdown(r['arm'])} | {r['rounds']} | {acc} | {_pts(r['change'])} "
                     f"| {flag} |")
    return lines


def arms_of(rows: Sequence[dict], seed: str = "seed") -> list[dict]:
    """Rows grouped into arms (every axis but the seed), in row order, for :func:`plateau`:
    ``label``, ``rounds``, ``curves`` and ``finals``."""
    arms: dict[str, dict] = {}
    for row in rows:
        params = {k: v for k, v in row["params"].items() if k != seed}
        key = json.dumps(params, sort_keys=True, default=str)
        label = ", ".join(f"{k}={v}" for k, v in params.items()) or "all cells"
        arm = arms.setdefault(key, {"label": label, "rounds": row["server.rounds"],
                                    "curves": [], "finals": []})
        arm["curves"].append(row["curve"])
        arm["finals"].append(row["acc"])
    return list(arms.values())


def curve_band_plot(rows: Sequence[dict], path: Path, panel_of: Callable[[dict], str],
                    line_of: Callable[[dict], str], order: Sequence[str], pyplot,
                    key: str = "curve", ylabel: str = "global test accuracy") -> Path | None:
    """Each arm's learning curve across seeds: one panel per ``panel_of`` (a setting), one
    line per ``line_of`` (in ``order``), the mean over seeds at every evaluated round with
    its 95% t-interval shaded. Returns ``path``, or None without any curve."""
    rows = [r for r in rows if r.get(key)]
    if not rows:
        return None
    panels: dict[str, dict[str, list]] = {}
    for r in rows:
        panels.setdefault(panel_of(r), {}).setdefault(line_of(r), []).append(r[key])
    plt = pyplot()
    ncols = min(4, len(panels))
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.5 * ncols, 3.6 * nrows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (panel, lines) in zip(axes.flat, panels.items()):
        for name in [n for n in order if n in lines] + sorted(set(lines) - set(order)):
            pts = mean_curve(lines[name])
            xs = [p[0] for p in pts]
            line, = ax.plot(xs, [p[1] for p in pts], marker=".", label=mathtext(name))
            band = [(x, lo, hi) for x, _, lo, hi, _ in pts if lo is not None]
            if band:
                ax.fill_between([b[0] for b in band], [b[1] for b in band],
                                [b[2] for b in band], color=line.get_color(), alpha=0.2)
        ax.set_title(mathtext(panel), fontsize=8)
        ax.set_xlabel("round")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)
    fig.suptitle("mean over seeds; shaded: 95% t-interval of the mean", fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return path
