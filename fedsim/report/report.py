"""A sweep's ``report.md``: tables (mean ± std over seeds), plots, and the declared claims.

Rows are built from each cell's ``summary.json`` and ``rounds.jsonl`` (:func:`cell_row`).
Norms are compared at matched rounds (the final model) and at matched test accuracy: within a
setting (all axes but norm and seed), the level is the lowest of the cells' best audited
accuracies, and each cell is read at the first audited round that reaches it
(:func:`add_matched_accuracy`; needs ``privacy.mia.every``).

Comparison plots show each mean over seeds as a point with its 95% t-interval; learning
curves, the mean over seeds per evaluated round with its 95% t-band, and the Budget section
checks whether the best arm plateaued (:mod:`fedsim.report.budget`). The Claims section tests
the sweep's ``[[claims]]`` (paired t intervals, Holm over the claims; see
:mod:`fedsim.report.claims`) and draws them in ``claims.png``.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedsim.files import save_figure, write_json, write_text
from fedsim.report.budget import arms_of, curve_band_plot, plateau, plateau_lines
from fedsim.report.claims import (
    CLAIMS_INTRO,
    claim_details,
    claim_line,
    evaluate_claims,
    forest_plot,
)
from fedsim.report.run_folder import Damaged, RunFiles, read_run
from fedsim.report.stats import t_interval
from fedsim.report.tuning import tuning_lines
from fedsim.text import code, markdown, mathtext

NORM = "model.norm"
SEED = "seed"
BATCH = "client.batch_size"
ATTACK_ORDER = ("loss", "lira_online", "lira_offline")


# --------------------------------------------------------------------------- rows


def _mean_alpha(alphas: dict | None) -> float | None:
    return float(np.mean(list(alphas.values()))) if alphas else None


def _own(final: dict) -> dict:
    return (final.get("own_model_accuracy") or final.get("personalized_accuracy")
            or final.get("client_accuracy") or {})


def cell_row(files: RunFiles, params: dict[str, Any]) -> dict:
    """One flat row of a finished cell (read and checked by :func:`fedsim.report.run_folder.
    read_run`): its axis values, the resolved keys the tables need, its metrics (None where
    the run did not measure them), and its whole ``summary`` and ``rounds`` (for the
    claims)."""
    summary, rounds, scn = files.summary, files.rounds, files.scenario
    final = summary.get("final") or {}
    gen = summary.get("generalization") or {}
    priv = summary.get("privacy") or {}
    row: dict[str, Any] = {
        "cell": files.folder.name,
        "params": dict(params),
        "summary": summary,
        "rounds": rounds,
        NORM: scn.model.norm,
        SEED: scn.seed,
        BATCH: scn.client.batch_size,
        "server.rounds": scn.server.rounds,
        "partition.kind": scn.partition.kind,
        "partition.alpha": scn.partition.alpha,
        "alpha_init": 1 / (1 + math.exp(-scn.model.hybrid_init)),
        "acc": final.get("global_test_accuracy"),
        "client_mean": (final.get("client_accuracy") or {}).get("mean"),
        "client_p10": (final.get("client_accuracy") or {}).get("p10"),
        # each client's accuracy with the model it uses: its personalized one under FedBN-like
        # strategies, else the global one (summary.json final.own_model_accuracy)
        "own_mean": _own(final).get("mean"),
        "own_p10": _own(final).get("p10"),
        "personalized": final.get("personalized_accuracy") is not None,
        "oos_gap": gen.get("out_of_sample_gap"),
        "participation_gap": gen.get("participation_gap"),
        "seconds": (summary.get("timing") or {}).get("seconds"),
        "curve": [(r["round"], r["global_test_accuracy"]) for r in rounds
                  if r.get("global_test_accuracy") is not None],
        "alpha_curve": [(r["round"], _mean_alpha(r["hybrid_alpha"])) for r in rounds
                        if r.get("hybrid_alpha")],
        "alpha_final": _mean_alpha(summary.get("hybrid_alpha")),
    }
    for name, m in (priv.get("mia") or {}).items():
        m = m or {}
        row[f"mia.{name}.auc"] = m.get("auc")
        row[f"mia.{name}.tpr_at_fpr_1e-2"] = m.get("tpr_at_fpr_1e-2")
        row[f"mia.{name}.tpr_at_fpr_1e-3"] = m.get("tpr_at_fpr_1e-3")
    row["mia_by_round"] = priv.get("mia_by_round") or []
    cm = priv.get("client_mia") or {}
    row["client_mia.mean"] = (cm.get("auc") or {}).get("mean")
    row["client_mia.p90"] = (cm.get("auc") or {}).get("p90")
    inv = priv.get("inversion") or {}
    row["inversion.psnr_db"] = inv.get("psnr_db")
    row["inversion.ssim"] = inv.get("ssim")
    row["inversion.label_accuracy"] = inv.get("label_accuracy")
    row["inversion.setting"] = (f"target {inv.get('target', 'step')}, "
                                f"{inv.get('batch_size')} images, "
                                f"{inv.get('local_steps', 1)} local steps, "
                                f"best of {inv.get('restarts', 1)} restarts") if inv else None
    leak = priv.get("leakage")
    row["leak.running_stats"] = leak.get("running_stats_uploaded") if leak else None
    rec = (leak or {}).get("data_mean_recovery") or {}
    row["leak.abs_error"] = rec.get("abs_error")
    row["leak.baseline"] = rec.get("baseline_abs_error")
    spent = (summary.get("dp") or {}).get("privacy_spent") or {}
    row["dp.epsilon"] = spent.get("epsilon")  # None without DP, or without noise
    row["alpha_drift"] = (row["alpha_final"] - row["alpha_init"]
                          if row["alpha_final"] is not None else None)
    return row


def setting_key(row: dict, drop: Iterable[str]) -> tuple:
    """The row's axis values except ``drop``, as a hashable, ordered key."""
    drop = set(drop)
    return tuple((k, json.dumps(v)) for k, v in row["params"].items() if k not in drop)


def setting_label(key: tuple) -> str:
    return ", ".join(f"{k}={json.loads(v)}" for k, v in key) or "all cells"


def add_matched_accuracy(rows: list[dict]) -> dict[tuple, float]:
    """Annotate each row with ``matched``: its MIA metrics at the first audited round whose
    global test accuracy reaches its setting's common level; returns the levels."""
    levels: dict[tuple, float] = {}
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        if row["mia_by_round"]:
            groups[setting_key(row, (NORM, SEED))].append(row)
    for key, members in groups.items():
        level = min(max(r["global_test_accuracy"] for r in row["mia_by_round"])
                    for row in members)
        levels[key] = level
        for row in members:
            hit = next(r for r in row["mia_by_round"] if r["global_test_accuracy"] >= level)
            row["matched_round"] = hit["round"]
            row["matched_acc"] = hit["global_test_accuracy"]
            for name in ATTACK_ORDER:
                if isinstance(hit.get(name), dict):
                    row[f"matched.{name}.auc"] = hit[name].get("auc")
                    row[f"matched.{name}.tpr_at_fpr_1e-3"] = hit[name].get("tpr_at_fpr_1e-3")
    return levels


# --------------------------------------------------------------------------- statistics


def stats(values: Sequence[float | None]) -> tuple[float, float, int]:
    """(mean, sample std, n) of the finite values; std is nan for n < 2."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=float)
    if v.size == 0:
        return float("nan"), float("nan"), 0
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else float("nan"), int(v.size)


def fmt(values: Sequence[float | None], digits: int = 3) -> str:
    mean, std, n = stats(values)
    if n == 0:
        return "–"
    if n == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _groups(rows: list[dict], drop: Sequence[str]) -> dict[tuple, list[dict]]:
    out: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        out[setting_key(r, drop)].append(r)
    return out


def mia_metric(rows: list[dict]) -> str | None:
    """The attack the MIA claim reads: the loss attack (it thresholds the confidence gap
    itself), else the first LiRA variant measured."""
    for name in ATTACK_ORDER:
        if any(r.get(f"mia.{name}.auc") is not None for r in rows):
            return name
    return None


# --------------------------------------------------------------------------- tables


def _norm_order(rows: list[dict], base) -> list[str]:
    grid = list((base.sweep.grid if base is not None else {}).get(NORM, []))
    present = {r[NORM] for r in rows}
    return [n for n in grid if n in present] + sorted(present - set(grid))


def _table(header: list[str], body: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return lines


def _present(rows: list[dict], key: str) -> bool:
    return any(r.get(key) is not None for r in rows)


def _yes_no(values: list) -> str:
    v = {x for x in values if x is not None}
    return "–" if not v else ("yes" if v == {True} else "no" if v == {False} else "mixed")


def tables(rows: list[dict], base, levels: dict[tuple, float]) -> list[str]:
    lines: list[str] = []
    norms = _norm_order(rows, base)
    attacks = [a for a in ATTACK_ORDER if _present(rows, f"mia.{a}.auc")]
    for key, group in _groups(rows, (NORM, SEED)).items():
        lines += ["", f"### {markdown(setting_label(key))}", ""]
        by_norm = {n: [r for r in group if r[NORM] == n] for n in norms}
        by_norm = {n: rs for n, rs in by_norm.items() if rs}
        seeds = sorted({r[SEED] for r in group})
        lines.append(f"Mean ± std over seeds {seeds}.")
        lines.append("")
        cols = [("global test acc", "acc"), ("client acc mean", "client_mean"),
                ("client acc p10", "client_p10"), ("out-of-sample gap", "oos_gap"),
                ("participation gap", "participation_gap")]
        if any(r["personalized"] for r in group):
            cols[3:3] = [("own-model acc mean", "own_mean"), ("own-model acc p10", "own_p10")]
        if _present(group, "alpha_final"):
            cols.append(("hybrid α (final, mean)", "alpha_final"))
        if _present(group, "dp.epsilon"):
            cols.append(("DP ε (summary.json dp.privacy_spent)", "dp.epsilon"))
        lines.append("**Generalization** (final round)")
        lines.append("")
        lines += _table(["norm", *[c[0] for c in cols]],
                        [[markdown(n), *[fmt([r.get(k) for r in rs]) for _, k in cols]]
                         for n, rs in by_norm.items()])
        if attacks:
            lines += ["", "**Membership inference on the global model** (final round; TPR at "
                      "FPR 0.1% / 1%)", ""]
            head = ["norm"]
            for a in attacks:
                head += [f"{a} AUC", f"{a} TPR@0.1%", f"{a} TPR@1%"]
            body = []
            for n, rs in by_norm.items():
                cells = [markdown(n)]
                for a in attacks:
                    cells += [fmt([r.get(f"mia.{a}.auc") for r in rs]),
                              fmt([r.get(f"mia.{a}.tpr_at_fpr_1e-3") for r in rs]),
                              fmt([r.get(f"mia.{a}.tpr_at_fpr_1e-2") for r in rs])]
                body.append(cells)
            lines += _table(head, body)
        if key in levels:
            lines += ["", f"**At matched test accuracy** (first audited round with global test "
                      f"accuracy ≥ {levels[key]:.3f}, the lowest best accuracy of this "
                      "setting's cells)", ""]
            head = ["norm", "round", "test acc"] + [f"{a} AUC" for a in attacks] + \
                   [f"{a} TPR@0.1%" for a in attacks]
            body = [[markdown(n), fmt([r.get("matched_round") for r in rs], 1),
                     fmt([r.get("matched_acc") for r in rs]),
                     *[fmt([r.get(f"matched.{a}.auc") for r in rs]) for a in attacks],
                     *[fmt([r.get(f"matched.{a}.tpr_at_fpr_1e-3") for r in rs])
                       for a in attacks]]
                    for n, rs in by_norm.items()]
            lines += _table(head, body)
        extra = [("client-update MIA AUC mean", "client_mia.mean"),
                 ("client-update MIA AUC p90", "client_mia.p90"),
                 ("inversion PSNR dB", "inversion.psnr_db"), ("inversion SSIM", "inversion.ssim"),
                 ("inversion label acc", "inversion.label_accuracy"),
                 ("data-mean error from BN buffers", "leak.abs_error"),
                 ("error of the public-mean guess", "leak.baseline")]
        extra = [c for c in extra if _present(group, c[1])]
        if extra or _present(group, "leak.running_stats"):
            lines += ["", "**Client updates, inversion and what leaves the client**", ""]
            settings = sorted({r["inversion.setting"] for r in group
                               if r.get("inversion.setting")})
            if settings:
                lines += [f"Inversion: {markdown('; '.join(settings))}.", ""]
            head = ["norm", "uploads BN running stats", *[c[0] for c in extra]]
            body = [[markdown(n), _yes_no([r.get("leak.running_stats") for r in rs]),
                     *[fmt([r.get(k) for r in rs]) for _, k in extra]]
                    for n, rs in by_norm.items()]
            lines += _table(head, body)
    return lines


# --------------------------------------------------------------------------- plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _is_auc(title: str, key: str) -> bool:
    """An attack's AUC panel (the final-round ``mia.*.auc`` or a per-upload AUC)."""
    return key.endswith(".auc") or "AUC" in title


def interval_plot(rows: list[dict], panels: list[tuple[str, str]], path: Path,
                  base) -> Path | None:
    """Points = mean over seeds, bars = 95% t-interval of that mean, one point per norm and
    setting. No bars of a length to misread: the axis may zoom in on the points, and AUC
    panels draw the 0.5 chance line (dashed)."""
    panels = [(title, key) for title, key in panels if _present(rows, key)]
    if not panels:
        return None
    plt = _pyplot()
    norms = _norm_order(rows, base)
    groups = _groups(rows, (NORM, SEED))
    ncols = min(3, len(panels))
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.4 * nrows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    step = 0.6 / max(1, len(groups))
    for ax, (title, key) in zip(axes.flat, panels):
        for j, (setting, group) in enumerate(groups.items()):
            xs, means, lows, highs = [], [], [], []
            for i, n in enumerate(norms):
                values = [r.get(key) for r in group if r[NORM] == n]
                values = [v for v in values if v is not None and np.isfinite(v)]
                if not values:
                    continue
                mean = float(np.mean(values))
                ci = t_interval(values)
                xs.append(i + (j - (len(groups) - 1) / 2) * step)
                means.append(mean)
                # seeds equal up to rounding: the interval is one of them, which may sit a
                # rounding error off their mean (matplotlib refuses a negative bar)
                lows.append(max(0.0, mean - ci[0]) if ci else 0.0)
                highs.append(max(0.0, ci[1] - mean) if ci else 0.0)
            ax.errorbar(xs, means, yerr=[lows, highs], fmt="o", ms=4, capsize=3,
                        label=mathtext(setting_label(setting)))
        ax.set_xticks(np.arange(len(norms)), [mathtext(n) for n in norms])
        ax.set_xlim(-0.6, len(norms) - 0.4)
        ax.set_title(title, fontsize=9)
        ax.set_ylabel("mean over seeds, 95% t-interval", fontsize=7)
        if _is_auc(title, key):
            ax.axhline(0.5, color="gray", lw=1, ls="--", label="chance (0.5)")
        elif key.endswith("gap"):
            ax.axhline(0, color="gray", lw=0.8)  # no gap
        ax.grid(axis="y", lw=0.3)
    if len(groups) > 1 or any(_is_auc(t, k) for t, k in panels):
        axes.flat[0].legend(fontsize=6, loc="best")
    fig.tight_layout()
    try:
        save_figure(fig, path, dpi=110)
    finally:
        plt.close(fig)
    return path


def curve_plot(rows: list[dict], key: str, path: Path, ylabel: str, base,
               only: Callable[[dict], bool] = lambda r: True) -> Path | None:
    """Mean over seeds of a per-round curve, one line per (setting, norm)."""
    rows = [r for r in rows if only(r) and r.get(key)]
    if not rows:
        return None
    plt = _pyplot()
    groups = _groups(rows, (NORM, SEED))
    fig, axes = plt.subplots(1, len(groups), figsize=(4.5 * len(groups), 3.6), squeeze=False)
    for ax, (setting, group) in zip(axes[0], groups.items()):
        for n in _norm_order(group, base):
            curves = [dict(r[key]) for r in group if r[NORM] == n]
            xs = sorted(set().union(*curves))
            mean = [np.mean([c[x] for c in curves if x in c]) for x in xs]
            ax.plot(xs, mean, marker=".", label=mathtext(n))
        ax.set_title(mathtext(setting_label(setting)), fontsize=8)
        ax.set_xlabel("round")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)
    fig.tight_layout()
    try:
        save_figure(fig, path, dpi=110)
    finally:
        plt.close(fig)
    return path


def mia_vs_accuracy_plot(rows: list[dict], attack: str, path: Path, base) -> Path | None:
    """MIA AUC against global test accuracy at every audited round (mean over seeds)."""
    rows = [r for r in rows if len(r["mia_by_round"]) > 1]
    if not rows:
        return None
    plt = _pyplot()
    groups = _groups(rows, (NORM, SEED))
    fig, axes = plt.subplots(1, len(groups), figsize=(4.5 * len(groups), 3.6), squeeze=False)
    for ax, (setting, group) in zip(axes[0], groups.items()):
        for n in _norm_order(group, base):
            runs = [r["mia_by_round"] for r in group if r[NORM] == n]
            k = min(len(x) for x in runs)
            acc = [np.mean([x[i]["global_test_accuracy"] for x in runs]) for i in range(k)]
            auc = [np.mean([x[i][attack]["auc"] for x in runs]) for i in range(k)]
            ax.plot(acc, auc, marker="o", ms=3, label=mathtext(n))
        ax.set_title(mathtext(setting_label(setting)), fontsize=8)
        ax.set_xlabel("global test accuracy")
        ax.set_ylabel(f"{attack} AUC")
        ax.legend(fontsize=7)
    fig.tight_layout()
    try:
        save_figure(fig, path, dpi=110)
    finally:
        plt.close(fig)
    return path


# --------------------------------------------------------------------------- report


def build_rows(root: Path, cells) -> tuple[list[dict], dict[str, Damaged]]:
    """Rows of the finished cells (each in ``root / cell.name``, or its own ``cell.path``),
    and the finished cells that cannot be read, by name (:func:`fedsim.report.run_folder.
    read_run`): those are left out like unfinished ones."""
    rows, damaged = [], {}
    for cell in cells:
        folder = getattr(cell, "path", None) or Path(root) / cell.name
        files = read_run(folder)
        if isinstance(files, Damaged):
            damaged[cell.name] = files
        elif files is not None:
            rows.append({**cell_row(files, cell.params), "cell": cell.name})
    return rows, damaged


def _invocation_line(run_info: dict) -> str | None:
    """The line about the sweep invocation that last ran cells (None if ``sweep.json``'s
    record of it lacks a field)."""
    try:
        start, end = run_info["load_average"]["start"], run_info["load_average"]["end"]
        return (f"Last invocation that ran cells: {len(run_info['ran'])} cells in "
                f"{run_info['wall_seconds']:.0f} s wall time with {int(run_info['workers'])} "
                f"worker(s) on {int(run_info['cpus'])} CPUs (1-minute load average "
                f"{start[0]:.1f} at the start, {end[0]:.1f} at the end).")
    except (KeyError, IndexError, TypeError, ValueError):
        return None


def _damaged_lines(damaged: dict[str, Damaged]) -> list[str]:
    if not damaged:
        return []
    lines = ["", "## Damaged cells", "",
             f"{len(damaged)} finished cell(s) could not be read and are left out of the "
             "tables, plots and claims, as unfinished cells are. Delete a cell's folder and "
             "run the sweep again to redo it.", ""]
    lines += [f"- {markdown(name)}: {code(d.file)} {markdown(d.why)}"
              for name, d in damaged.items()]
    return lines


def write_report(root: Path, base, cells, run_info: dict | None = None,
                 axes: dict | None = None, title: str = "Sweep report",
                 tuning: dict | None = None,
                 warn: Callable[[str], None] | None = None) -> Path:
    """Write ``report.md``, ``report.json`` and the comparison PNGs into ``root``.

    ``run_info`` (from the sweep invocation that ran cells) adds its wall time and load;
    ``axes`` (default: the base scenario's sweep grid) are what the cells vary; ``tuning``
    (:func:`fedsim.report.tuning.tuning_result`) what each arm tried and chose. Finished
    cells that cannot be read are left out, listed in both files, and each told to ``warn``.
    """
    root = Path(root)
    rows, damaged = build_rows(root, cells)
    for name, d in damaged.items():
        if warn is not None:
            warn(f"cell {name} is damaged and left out of the report ({d})")
    levels = add_matched_accuracy(rows)
    claims = evaluate_claims(base.claims if base is not None else (), rows)
    attack = mia_metric(rows)
    plots = {
        "accuracy.png": interval_plot(rows, [("global test accuracy", "acc"),
                                        ("client accuracy (mean)", "client_mean"),
                                        ("client accuracy (p10)", "client_p10"),
                                        ("each client's own model (mean)", "own_mean"),
                                        ("each client's own model (p10)", "own_p10")],
                                 root / "accuracy.png", base),
        "gaps.png": interval_plot(rows, [("out-of-sample gap", "oos_gap"),
                                    ("participation gap", "participation_gap")],
                             root / "gaps.png", base),
        "mia.png": interval_plot(rows, [(f"{a} {t}", f"{p}.{a}.{m}")
                                   for a in ATTACK_ORDER
                                   for p, m, t in (("mia", "auc", "AUC"),
                                                   ("mia", "tpr_at_fpr_1e-3", "TPR@0.1%FPR"),
                                                   ("matched", "auc", "AUC, matched acc"))],
                            root / "mia.png", base),
        "privacy_other.png": interval_plot(rows, [("inversion PSNR (dB)", "inversion.psnr_db"),
                                             ("client-update MIA AUC", "client_mia.mean"),
                                             ("data-mean error (BN buffers)", "leak.abs_error")],
                                      root / "privacy_other.png", base),
        "learning_curves.png": curve_band_plot(
            rows, root / "learning_curves.png", order=_norm_order(rows, base), pyplot=_pyplot,
            panel_of=lambda r: setting_label(setting_key(r, (NORM, SEED))),
            line_of=lambda r: r[NORM]),
        "hybrid_alpha.png": curve_plot(rows, "alpha_curve", root / "hybrid_alpha.png",
                                       "α (mean over layers; 1 = BN, 0 = LN)", base,
                                       only=lambda r: r[NORM] == "hybrid"),
        "mia_vs_accuracy.png": mia_vs_accuracy_plot(rows, attack, root / "mia_vs_accuracy.png",
                                                    base) if attack else None,
        "claims.png": forest_plot(claims, root / "claims.png", _pyplot) if claims else None,
    }
    name = base.name if base is not None else root.name
    if axes is None:
        axes = base.sweep.grid if base is not None else {}
    lines = [f"# {title}: {markdown(name)}", ""]
    broken = f" ({len(damaged)} more finished but damaged, see below)" if damaged else ""
    lines.append(f"{len(rows)} of {len(cells)} cells finished{broken}. "
                 + ("Axes: " + ", ".join(f"{code(k)} = {code(json.dumps(v, default=str))}"
                                       for k, v in axes.items())
                    + "." if axes else "No axes: the cells share every setting."))
    secs = [r["seconds"] for r in rows if r.get("seconds") is not None]
    if secs:
        lines.append(f"Cell run time: {sum(secs):.0f} s in total ({min(secs):.0f}–"
                     f"{max(secs):.0f} s per cell).")
    if run_info and (line := _invocation_line(run_info)):
        lines.append(line)
    lines += _damaged_lines(damaged)
    lines += ["", "Every number is mean ± sample std over the seeds of a row. Membership "
              "inference: members are participating clients' training samples, non-members "
              "their local test splits (equal in number per client). Matched accuracy: "
              "within a setting, each cell is read at the first audited round whose global "
              "test accuracy reaches the lowest best accuracy of the setting's cells."]
    lines += tuning_lines(tuning)
    lines += ["", "## Tables"]
    lines += tables(rows, base, levels)
    lines += ["", "## Plots", ""]
    for file, made in plots.items():
        if made is not None:
            lines.append(f"![{file}]({file})")
    budget = plateau(arms_of(rows))
    lines += plateau_lines(budget)
    lines += ["", "## Claims", ""]
    if not claims:
        lines.append("The sweep declares no claims (add `[[claims]]` blocks to its scenario).")
    else:
        lines += [CLAIMS_INTRO, ""]
        for c in claims:
            lines.append(f"- {claim_line(c)}")
            lines += [f"  - {d}" for d in claim_details(c)]
        lines.append("")
    path = root / "report.md"
    write_text(path, "\n".join(lines) + "\n")
    slim = [{k: v for k, v in r.items()
             if k not in ("curve", "alpha_curve", "mia_by_round", "summary", "rounds")}
            for r in rows]
    write_json(root / "report.json",
               {"rows": slim, "claims": claims,
                "damaged": [{"cell": name, **d.to_json()} for name, d in damaged.items()],
                "matched_accuracy_levels": {setting_label(k): v for k, v in levels.items()},
                "plateau": budget,
                **({"tuning": tuning} if tuning else {})},
               indent=2, default=str)
    return path
