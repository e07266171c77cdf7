"""A sweep's ``report.md``: tables (mean ± std over seeds), comparison plots and Claims.

Rows are built from each cell's ``summary.json`` and ``rounds.jsonl`` (:func:`cell_row`).
Norms are compared at matched rounds (the final model) and at matched test accuracy: within a
setting (all axes but norm and seed), the level is the lowest of the cells' best audited
accuracies, and each cell is read at the first audited round that reaches it
(:func:`add_matched_accuracy`; needs ``privacy.audit_every``).

The Claims section (:func:`evaluate_claims`) tests the four claims of RESEARCH.md on those
rows. A difference counts only when it exceeds its spread over seeds: paired by seed, the
mean difference must be larger in size than the sample standard deviation of the
differences (and there must be at least two seeds). Otherwise the claim is inconclusive;
a claim the grid cannot address (no batch-size axis, no BN cells, ...) says so.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

NORM = "model.norm"
SEED = "seed"
BATCH = "client.batch_size"
ATTACK_ORDER = ("loss", "lira_online", "lira_offline")
NON_IID_ALPHA = 1.0  # dirichlet partitions with alpha <= this count as non-IID


# --------------------------------------------------------------------------- rows


def _read_rounds(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _mean_alpha(alphas: dict | None) -> float | None:
    return float(np.mean(list(alphas.values()))) if alphas else None


def cell_row(folder: Path, params: dict[str, Any]) -> dict:
    """One flat row of a finished cell: its axis values, the resolved keys the claims need,
    and its metrics (None where the run did not measure them)."""
    from fedsim.config import load_scenario

    summary = json.loads((folder / "summary.json").read_text())
    rounds = _read_rounds(folder / "rounds.jsonl")
    scn = load_scenario(folder / "scenario.toml")
    final = summary.get("final") or {}
    gen = summary.get("generalization") or {}
    priv = summary.get("privacy") or {}
    row: dict[str, Any] = {
        "cell": folder.name,
        "params": dict(params),
        NORM: scn.model.norm,
        SEED: scn.seed,
        BATCH: scn.client.batch_size,
        "partition.kind": scn.partition.kind,
        "partition.alpha": scn.partition.alpha,
        "alpha_init": 1 / (1 + math.exp(-scn.model.hybrid_init)),
        "acc": final.get("global_test_accuracy"),
        "client_mean": (final.get("client_accuracy") or {}).get("mean"),
        "client_p10": (final.get("client_accuracy") or {}).get("p10"),
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
        row[f"mia.{name}.auc"] = m["auc"]
        row[f"mia.{name}.tpr_at_fpr_1e-2"] = m["tpr_at_fpr_1e-2"]
        row[f"mia.{name}.tpr_at_fpr_1e-3"] = m["tpr_at_fpr_1e-3"]
    row["mia_by_round"] = priv.get("mia_by_round") or []
    cm = priv.get("client_mia") or {}
    row["client_mia.mean"] = (cm.get("auc") or {}).get("mean")
    row["client_mia.p90"] = (cm.get("auc") or {}).get("p90")
    inv = priv.get("inversion") or {}
    row["inversion.psnr_db"] = inv.get("psnr_db")
    row["inversion.ssim"] = inv.get("ssim")
    row["inversion.label_accuracy"] = inv.get("label_accuracy")
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
                if name in hit:
                    row[f"matched.{name}.auc"] = hit[name]["auc"]
                    row[f"matched.{name}.tpr_at_fpr_1e-3"] = hit[name]["tpr_at_fpr_1e-3"]
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


def direction(diffs: Sequence[float]) -> int:
    """+1 / −1 when the mean difference exceeds its spread over seeds, else 0."""
    mean, std, n = stats(diffs)
    if n < 2 or not np.isfinite(std) or abs(mean) <= std:
        return 0
    return 1 if mean > 0 else -1


def paired_by(rows: list[dict], metric: str, a: Callable[[dict], bool],
              b: Callable[[dict], bool], match: Sequence[str] = (SEED,)) -> dict[tuple, float]:
    """metric(a) − metric(b) for rows of ``a`` and ``b`` that agree on ``match`` (seeds)."""
    def index(pred):
        return {tuple(r[k] for k in match): r[metric] for r in rows
                if pred(r) and r.get(metric) is not None}
    left, right = index(a), index(b)
    return {k: left[k] - right[k] for k in sorted(left) if k in right}


def paired(rows: list[dict], metric: str, a: Callable[[dict], bool],
           b: Callable[[dict], bool], match: Sequence[str] = (SEED,)) -> list[float]:
    """The values of :func:`paired_by`, in seed order."""
    return list(paired_by(rows, metric, a, b, match).values())


def select(norm: str | None = None, batch: int | None = None) -> Callable[[dict], bool]:
    """A row predicate: this norm and/or this batch size."""
    return lambda r: (norm is None or r[NORM] == norm) and (batch is None or r[BATCH] == batch)


def norm_is(name: str) -> Callable[[dict], bool]:
    return select(norm=name)


def _diff_text(label: str, diffs: list[float], digits: int = 3) -> str:
    mean, std, n = stats(diffs)
    if n == 0:
        return f"{label}: no paired cells"
    spread = f" ± {std:.{digits}f}" if n > 1 else " (one seed: no spread)"
    return f"{label}: {mean:+.{digits}f}{spread} (n={n})"


# --------------------------------------------------------------------------- claims


@dataclass
class Claim:
    number: int
    text: str
    verdict: str = "inconclusive"  # supported | contradicted | inconclusive | not addressed
    evidence: list[str] = field(default_factory=list)


CLAIM_TEXT = {
    1: "BN degrades at small batch sizes; GN/LN/IN do not.",
    2: "Under non-IID partitions, IN/GN fit federations better than BN.",
    3: "A learnable BN↔LN mix (α) drifts toward BN with large batches and toward LN with "
       "tiny ones.",
    4: "BN's train/test discrepancy widens the confidence gap that membership inference "
       "exploits; LN, or larger batches, reduce it.",
}


def _combine(verdicts: list[str]) -> str:
    """One verdict over settings: unanimous, or inconclusive when they differ."""
    if not verdicts:
        return "not addressed"
    if all(v == verdicts[0] for v in verdicts):
        return verdicts[0]
    return "inconclusive"


def _from_directions(dirs: list[int]) -> str:
    """Every item must point the claimed way (+1) to support; any −1 contradicts."""
    if any(d < 0 for d in dirs):
        return "contradicted"
    if dirs and all(d > 0 for d in dirs):
        return "supported"
    return "inconclusive"


def _groups(rows: list[dict], drop: Sequence[str]) -> dict[tuple, list[dict]]:
    out: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        out[setting_key(r, drop)].append(r)
    return out


def claim_small_batches(rows: list[dict]) -> Claim:
    """BN's accuracy drop from the largest to the smallest batch, relative to each other
    norm's drop (paired by seed): at fixed epochs a smaller batch also means more SGD steps,
    which moves every norm, so the raw drops alone would confound the two."""
    claim = Claim(1, CLAIM_TEXT[1])
    verdicts = []
    for key, group in _groups(rows, (NORM, SEED, BATCH)).items():
        sizes = sorted({r[BATCH] for r in group})
        norms = {r[NORM] for r in group}
        others = [n for n in ("gn", "ln", "in") if n in norms]
        if len(sizes) < 2 or "bn" not in norms or not others:
            continue
        small, large = sizes[0], sizes[-1]
        claim.evidence.append(f"{setting_label(key)}: test accuracy at batch {large} minus at "
                              f"batch {small} (+ = worse with small batches; at fixed epochs "
                              "the small batch also takes more steps):")
        drops = {n: paired_by(group, "acc", select(n, large), select(n, small))
                 for n in ("bn", *others)}
        for norm, d in drops.items():
            claim.evidence.append("  - " + _diff_text(norm.upper(), list(d.values())))
        dirs = []
        for norm in others:
            rel = [drops["bn"][k] - drops[norm][k] for k in drops["bn"] if k in drops[norm]]
            claim.evidence.append("  - " + _diff_text(f"BN's drop minus {norm.upper()}'s", rel))
            dirs.append(direction(rel))
        verdict = _from_directions(dirs)
        claim.evidence.append(f"  → {verdict} (BN must lose more than each of "
                              f"{'/'.join(n.upper() for n in others)})")
        verdicts.append(verdict)
    if not verdicts:
        claim.verdict = "not addressed"
        claim.evidence.append("The grid cannot address it: it needs at least two "
                              "client.batch_size values and BN plus one of GN/LN/IN.")
    else:
        claim.verdict = _combine(verdicts)
    return claim


def is_non_iid(row: dict) -> bool:
    kind = row["partition.kind"]
    if kind == "dirichlet":
        return row["partition.alpha"] <= NON_IID_ALPHA
    return kind in ("shards", "feature")


def claim_non_iid(rows: list[dict]) -> Claim:
    claim = Claim(2, CLAIM_TEXT[2])
    verdicts = []
    for key, group in _groups(rows, (NORM, SEED)).items():
        norms = {r[NORM] for r in group}
        if "bn" not in norms or not norms & {"in", "gn"}:
            continue
        non_iid = is_non_iid(group[0])
        where = setting_label(key)
        label = "non-IID" if non_iid else "IID (context only, not part of the verdict)"
        dirs = []
        claim.evidence.append(f"{where} [{label}]: global test accuracy minus BN's:")
        for norm in ("in", "gn"):
            if norm in norms:
                d = paired(group, "acc", norm_is(norm), norm_is("bn"))
                claim.evidence.append("  - " + _diff_text(norm.upper(), d))
                dirs.append(direction(d))
        if non_iid:
            verdict = _from_directions(dirs)
            claim.evidence.append(f"  → {verdict}")
            verdicts.append(verdict)
    if not verdicts:
        claim.verdict = "not addressed"
        claim.evidence.append("The grid cannot address it: it needs a non-IID partition "
                              f"(dirichlet with alpha <= {NON_IID_ALPHA}, shards or feature) "
                              "with BN and IN or GN cells.")
    else:
        claim.verdict = _combine(verdicts)
    return claim


def claim_hybrid_alpha(rows: list[dict]) -> Claim:
    claim = Claim(3, CLAIM_TEXT[3])
    hybrid = [r for r in rows if r[NORM] == "hybrid" and r.get("alpha_drift") is not None]
    verdicts = []
    for key, group in _groups(hybrid, (NORM, SEED, BATCH)).items():
        sizes = sorted({r[BATCH] for r in group})
        if len(sizes) < 2:
            continue
        small, large = sizes[0], sizes[-1]
        drift = {b: [r["alpha_drift"] for r in group if r[BATCH] == b] for b in (small, large)}
        where = setting_label(key)
        claim.evidence.append(f"{where}: change of α (mean over layers, final − initial; "
                              "+ = toward BN; at fixed epochs the small batch takes more steps):")
        claim.evidence.append("  - " + _diff_text(f"batch {large}", drift[large]))
        claim.evidence.append("  - " + _diff_text(f"batch {small}", drift[small]))
        gap = paired(group, "alpha_drift", select(batch=large), select(batch=small))
        claim.evidence.append("  - " + _diff_text(f"batch {large} minus batch {small}", gap))
        verdict = _from_directions([direction(drift[large]), -direction(drift[small])])
        claim.evidence.append(f"  → {verdict}")
        verdicts.append(verdict)
    if not verdicts:
        claim.verdict = "not addressed"
        claim.evidence.append("The grid cannot address it: it needs model.norm = \"hybrid\" "
                              "cells at two or more client.batch_size values.")
    else:
        claim.verdict = _combine(verdicts)
    return claim


def mia_metric(rows: list[dict]) -> str | None:
    """The attack the MIA claim reads: the loss attack (it thresholds the confidence gap
    itself), else the first LiRA variant measured."""
    for name in ATTACK_ORDER:
        if any(r.get(f"mia.{name}.auc") is not None for r in rows):
            return name
    return None


def claim_mia(rows: list[dict]) -> Claim:
    claim = Claim(4, CLAIM_TEXT[4])
    attack = mia_metric(rows)
    if attack is None:
        claim.verdict = "not addressed"
        claim.evidence.append("The grid cannot address it: no membership-inference audit "
                              "(set privacy.mia).")
        return claim
    claim.evidence.append(f"Attack: {attack} (AUC; + = BN leaks more).")
    verdicts = []
    for key, group in _groups(rows, (NORM, SEED)).items():
        norms = {r[NORM] for r in group}
        if not {"bn", "ln"} <= norms:
            continue
        dirs = []
        claim.evidence.append(f"{setting_label(key)}: BN minus LN")
        for label, metric in (("final round", f"mia.{attack}.auc"),
                              ("matched accuracy", f"matched.{attack}.auc")):
            d = paired(group, metric, norm_is("bn"), norm_is("ln"))
            if d:
                claim.evidence.append("  - " + _diff_text(label, d))
                dirs.append(direction(d))
        verdict = _from_directions(dirs)
        claim.evidence.append(f"  → {verdict}")
        verdicts.append(verdict)
    batch_verdicts = []
    for key, group in _groups([r for r in rows if r[NORM] == "bn"], (NORM, SEED, BATCH)).items():
        sizes = sorted({r[BATCH] for r in group})
        if len(sizes) < 2:
            continue
        small, large = sizes[0], sizes[-1]
        claim.evidence.append(f"{setting_label(key)}: BN at batch {small} minus at batch "
                              f"{large}")
        dirs = []
        for label, metric in (("final round", f"mia.{attack}.auc"),
                              ("matched accuracy", f"matched.{attack}.auc")):
            d = paired(group, metric, select(batch=small), select(batch=large))
            if d:
                claim.evidence.append("  - " + _diff_text(label, d))
                dirs.append(direction(d))
        verdict = _from_directions(dirs)
        claim.evidence.append(f"  → {verdict}")
        batch_verdicts.append(verdict)
    if not batch_verdicts:
        claim.evidence.append("The batch-size half cannot be addressed: no BN cells at two "
                              "or more client.batch_size values.")
    if not verdicts and not batch_verdicts:
        claim.verdict = "not addressed"
        claim.evidence.append("The grid cannot address it: it needs BN and LN cells, or BN "
                              "cells at two batch sizes.")
    else:
        claim.verdict = _combine(verdicts + batch_verdicts)
    return claim


def evaluate_claims(rows: list[dict]) -> list[Claim]:
    """The four claims of RESEARCH.md, each with a verdict computed from ``rows``."""
    return [claim_small_batches(rows), claim_non_iid(rows), claim_hybrid_alpha(rows),
            claim_mia(rows)]


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
        lines += ["", f"### {setting_label(key)}", ""]
        by_norm = {n: [r for r in group if r[NORM] == n] for n in norms}
        by_norm = {n: rs for n, rs in by_norm.items() if rs}
        seeds = sorted({r[SEED] for r in group})
        lines.append(f"Mean ± std over seeds {seeds}.")
        lines.append("")
        cols = [("global test acc", "acc"), ("client acc mean", "client_mean"),
                ("client acc p10", "client_p10"), ("out-of-sample gap", "oos_gap"),
                ("participation gap", "participation_gap")]
        if _present(group, "alpha_final"):
            cols.append(("hybrid α (final, mean)", "alpha_final"))
        if _present(group, "dp.epsilon"):
            cols.append(("DP ε (summary.json dp.privacy_spent)", "dp.epsilon"))
        lines.append("**Generalization** (final round)")
        lines.append("")
        lines += _table(["norm", *[c[0] for c in cols]],
                        [[n, *[fmt([r.get(k) for r in rs]) for _, k in cols]]
                         for n, rs in by_norm.items()])
        if attacks:
            lines += ["", "**Membership inference on the global model** (final round; TPR at "
                      "FPR 0.1% / 1%)", ""]
            head = ["norm"]
            for a in attacks:
                head += [f"{a} AUC", f"{a} TPR@0.1%", f"{a} TPR@1%"]
            body = []
            for n, rs in by_norm.items():
                cells = [n]
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
            body = [[n, fmt([r.get("matched_round") for r in rs], 1),
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
            head = ["norm", "uploads BN running stats", *[c[0] for c in extra]]
            body = [[n, _yes_no([r.get("leak.running_stats") for r in rs]),
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


def bar_plot(rows: list[dict], panels: list[tuple[str, str]], path: Path, base) -> Path | None:
    """Grouped bars (mean ± std over seeds): one group per norm, one bar per setting."""
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
    width = 0.8 / max(1, len(groups))
    for ax, (title, key) in zip(axes.flat, panels):
        for j, (setting, group) in enumerate(groups.items()):
            means, stds = [], []
            for n in norms:
                m, s, _ = stats([r.get(key) for r in group if r[NORM] == n])
                means.append(m)
                stds.append(0.0 if not np.isfinite(s) else s)
            xs = np.arange(len(norms)) + (j - (len(groups) - 1) / 2) * width
            ax.bar(xs, means, width, yerr=stds, capsize=2, label=setting_label(setting))
        ax.set_xticks(np.arange(len(norms)), norms)
        ax.set_title(title, fontsize=9)
        if key.endswith(".auc"):  # chance is 0.5: zoom in on the part that differs
            ax.set_ylim(bottom=min(0.45, ax.get_ylim()[1] - 0.1))
        ax.axhline(0, color="gray", lw=0.5)
    if len(groups) > 1:
        axes[0][0].legend(fontsize=6, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
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
            ax.plot(xs, mean, marker=".", label=n)
        ax.set_title(setting_label(setting), fontsize=8)
        ax.set_xlabel("round")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
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
            ax.plot(acc, auc, marker="o", ms=3, label=n)
        ax.set_title(setting_label(setting), fontsize=8)
        ax.set_xlabel("global test accuracy")
        ax.set_ylabel(f"{attack} AUC")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- report


def build_rows(root: Path, cells) -> list[dict]:
    """Rows of the finished cells: each in ``root / cell.name``, or its own ``cell.path``."""
    rows = []
    for cell in cells:
        folder = getattr(cell, "path", None) or Path(root) / cell.name
        if (folder / "summary.json").is_file():
            rows.append({**cell_row(folder, cell.params), "cell": cell.name})
    return rows


def write_report(root: Path, base, cells, run_info: dict | None = None,
                 axes: dict | None = None, title: str = "Sweep report") -> Path:
    """Write ``report.md``, ``report.json`` and the comparison PNGs into ``root``.

    ``run_info`` (from the sweep invocation that ran cells) adds its wall time and load;
    ``axes`` (default: the base scenario's sweep grid) are what the cells vary.
    """
    root = Path(root)
    rows = build_rows(root, cells)
    levels = add_matched_accuracy(rows)
    claims = evaluate_claims(rows)
    attack = mia_metric(rows)
    plots = {
        "accuracy.png": bar_plot(rows, [("global test accuracy", "acc"),
                                        ("client accuracy (mean)", "client_mean"),
                                        ("client accuracy (p10)", "client_p10")],
                                 root / "accuracy.png", base),
        "gaps.png": bar_plot(rows, [("out-of-sample gap", "oos_gap"),
                                    ("participation gap", "participation_gap")],
                             root / "gaps.png", base),
        "mia.png": bar_plot(rows, [(f"{a} {t}", f"{p}.{a}.{m}")
                                   for a in ATTACK_ORDER
                                   for p, m, t in (("mia", "auc", "AUC"),
                                                   ("mia", "tpr_at_fpr_1e-3", "TPR@0.1%FPR"),
                                                   ("matched", "auc", "AUC, matched acc"))],
                            root / "mia.png", base),
        "privacy_other.png": bar_plot(rows, [("inversion PSNR (dB)", "inversion.psnr_db"),
                                             ("client-update MIA AUC", "client_mia.mean"),
                                             ("data-mean error (BN buffers)", "leak.abs_error")],
                                      root / "privacy_other.png", base),
        "learning_curves.png": curve_plot(rows, "curve", root / "learning_curves.png",
                                          "global test accuracy", base),
        "hybrid_alpha.png": curve_plot(rows, "alpha_curve", root / "hybrid_alpha.png",
                                       "α (mean over layers; 1 = BN, 0 = LN)", base,
                                       only=lambda r: r[NORM] == "hybrid"),
        "mia_vs_accuracy.png": mia_vs_accuracy_plot(rows, attack, root / "mia_vs_accuracy.png",
                                                    base) if attack else None,
    }
    name = base.name if base is not None else root.name
    if axes is None:
        axes = base.sweep.grid if base is not None else {}
    lines = [f"# {title}: {name}", ""]
    lines.append(f"{len(rows)} of {len(cells)} cells finished. "
                 + ("Axes: " + ", ".join(f"`{k}` = {v}" for k, v in axes.items()) + "."
                    if axes else "No axes: the cells share every setting."))
    secs = [r["seconds"] for r in rows if r.get("seconds") is not None]
    if secs:
        lines.append(f"Cell run time: {sum(secs):.0f} s in total ({min(secs):.0f}–"
                     f"{max(secs):.0f} s per cell).")
    if run_info:
        start, end = run_info["load_average"]["start"], run_info["load_average"]["end"]
        lines.append(f"Last invocation that ran cells: {len(run_info['ran'])} cells in "
                     f"{run_info['wall_seconds']:.0f} s wall time with {run_info['workers']} "
                     f"worker(s) on {run_info['cpus']} CPUs (1-minute load average "
                     f"{start[0]:.1f} at the start, {end[0]:.1f} at the end).")
    lines += ["", "Every number is mean ± sample std over the seeds of a row. Membership "
              "inference: members are participating clients' training samples, non-members "
              "their local test splits (equal in number per client). Matched accuracy: "
              "within a setting, each cell is read at the first audited round whose global "
              "test accuracy reaches the lowest best accuracy of the setting's cells."]
    lines += ["", "## Tables"]
    lines += tables(rows, base, levels)
    lines += ["", "## Plots", ""]
    for file, made in plots.items():
        if made is not None:
            lines.append(f"![{file}]({file})")
    lines += ["", "## Claims", "",
              "Verdicts are computed from the rows above: a difference counts only when its "
              "mean over seeds exceeds the sample std of the paired (same-seed) differences; "
              "one seed, or a smaller difference, is inconclusive. Settings that disagree "
              "make the claim inconclusive.", ""]
    for c in claims:
        lines.append(f"{c.number}. **{c.text}** — **{c.verdict}**")
        for e in c.evidence:
            if e.startswith("  "):  # detail of the setting above
                body = e.strip()
                lines.append("     " + (body if body.startswith("- ") else f"- {body}"))
            else:
                lines.append(f"   - {e}")
        lines.append("")
    path = root / "report.md"
    path.write_text("\n".join(lines) + "\n")
    slim = [{k: v for k, v in r.items() if k not in ("curve", "alpha_curve", "mia_by_round")}
            for r in rows]
    (root / "report.json").write_text(json.dumps(
        {"rows": slim, "claims": [c.__dict__ for c in claims],
         "matched_accuracy_levels": {setting_label(k): v for k, v in levels.items()}},
        indent=2, default=str) + "\n")
    return path
