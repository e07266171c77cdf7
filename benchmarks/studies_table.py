"""Markdown claims tables of finished study sweeps, for benchmarks/RESULTS.md.

    python benchmarks/studies_table.py results/studies/*/

For each sweep folder: the plateau check and each arm's tuned values (when the sweep tunes),
then the claims of ``report.json`` (verdict, a − b with its 95% and
Holm-level intervals, p, Holm p, seeds tested (and cells paired), seeds needed; why a claim
was not tested) and the wall time of the invocations
that ran its cells (``sweep.json``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _num(x: float | None, digits: int = 3) -> str:
    return "–" if x is None else f"{x:+.{digits}f}"


def _p(x: float | None) -> str:
    return "–" if x is None else ("< 0.001" if x < 0.001 else f"{x:.3f}")


def table(folder: Path) -> list[str]:
    report = json.loads((folder / "report.json").read_text())
    sweep = json.loads((folder / "sweep.json").read_text())
    runs = sweep.get("invocations") or []
    lines = [f"#### `{sweep['scenario']}`", ""]
    if runs:
        total = sum(r["wall_seconds"] for r in runs)
        parts = " + ".join(f"{len(r['ran'])} cells in {r['wall_seconds'] / 60:.1f} min"
                           for r in runs)
        tuning = len((sweep.get("tuning") or {}).get("cells") or [])
        count = f"{len(sweep['cells']) + tuning} cells" + (f" ({tuning} tuning)" if tuning
                                                             else "")
        lines.append(f"{count}, {total / 60:.1f} min wall time in all "
                     f"({parts}; {runs[-1]['workers']} worker processes on "
                     f"{runs[-1]['cpus']} CPUs).")
        lines.append("")
    lines += plateau_line(report.get("plateau")) + tuned_lines(report.get("tuning"))
    lines += ["| claim | verdict | a − b | 95% CI | Holm-level CI | p | Holm p | seeds (pairs) | "
              "seeds needed |", "|---|---|---|---|---|---|---|---|---|"]
    for c in report["claims"]:
        if c.get("error"):
            lines.append(f"| {c['name']} | {c['verdict']} (not evaluated: {c['error']}) "
                         "| | | | | | | |")
            continue
        ci95 = c.get("ci95") or [None, None]
        why = f" (not tested: {c['reason']})" if c.get("reason") else ""
        lines.append(
            f"| {c['name']} | **{c['verdict']}**{why} | {_num(c['diff_mean'])} | "
            f"[{_num(ci95[0])}, {_num(ci95[1])}] | "
            f"[{_num(c['ci_low'])}, {_num(c['ci_high'])}] at "
            f"{100 * c['ci_level']:.1f}% | {_p(c['p_value'])} | {_p(c['p_holm'])} | "
            f"{c.get('n_seeds', '–')} ({c['n_pairs']}) | {c['seeds_needed'] or '–'} |")
    return lines + [""]


def plateau_line(plateau: dict | None) -> list[str]:
    """One line: did the best arm plateau over the last quarter of its rounds?"""
    if not plateau or not plateau.get("arms"):
        return []
    best = next((a for a in plateau["arms"] if a["arm"] == plateau["best_arm"]), None)
    if best is None or best["change"] is None:
        return ["Plateau check: not checked (too few evaluated rounds in the last quarter).",
                ""]
    verdict = "converged" if best["plateaued"] else "did not converge"
    return [f"Plateau check: {verdict} — the best arm ({best['arm']}) changed by "
            f"{100 * best['change']:.2f} points over rounds {best['window'][0]}–"
            f"{best['window'][-1]} (threshold {100 * plateau['threshold']:g}).", ""]


def tuned_lines(tuning: dict | None) -> list[str]:
    """Each arm's chosen values and their mean validation score."""
    if not tuning:
        return []
    lines = [f"Tuned on `{tuning['metric']}` over seeds {tuning['seeds']}:", "",
             "| arm | chosen | mean | note |", "|---|---|---|---|"]
    for arm in tuning["arms"]:
        chosen = arm.get("chosen")
        if chosen is None:
            lines.append(f"| {arm['label']} | – | – | {arm.get('why_none')} |")
            continue
        values = ", ".join(f"{k} = {v}" for k, v in chosen["applied"].items())
        lines.append(f"| {arm['label']} | {values} | {chosen['mean']:.4f} | "
                     f"{'; '.join(arm.get('at_edge') or [])} |")
    return lines + [""]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folders", nargs="+", type=Path, help="finished sweep folders")
    args = ap.parse_args(argv)
    for folder in args.folders:
        if (folder / "report.json").is_file():
            print("\n".join(table(folder)))


if __name__ == "__main__":
    main()
