"""What ``server.bn_statistics`` costs per round: ``average`` vs ``pooled`` vs ``recalibrate``
on a small BN scenario, one client at a time and in vectorized cohorts.

Runs the modes in alternation (``--repeats`` passes of average → pooled → recalibrate per
backend, so machine load drifts over all of them alike) and reports, per mode and backend,
the median over runs of the mean per-round training-phase seconds (``train_seconds``:
sampling, client training, aggregation and the BN step; not server evaluation), of the
step's own seconds (``bn_seconds``) and of the whole run's CPU seconds in this process
(every in-process engine computes here; robust to other processes competing for the
cores, unlike wall time), with the ratios to ``average``. From the repository root::

    python benchmarks/bn_statistics_cost.py                  # quickstart + model.norm=bn
    python benchmarks/bn_statistics_cost.py --repeats 5 --set server.rounds=5
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fedsim  # noqa: E402

MODES = ("average", "pooled", "recalibrate")
BACKENDS = {"sequential": [], "vectorized": ["engine.vectorize=true"]}


def per_round(path: Path) -> tuple[float, float]:
    """Mean per-round (train_seconds, bn_seconds) of a run's training rounds."""
    rows = [json.loads(line) for line in (path / "rounds.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["round"] >= 1]
    return (statistics.fmean(r["train_seconds"] for r in rows),
            statistics.fmean(r.get("bn_seconds", 0.0) for r in rows))


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", default="scenarios/quickstart.toml")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--set", action="append", default=[], dest="overrides",
                        help="extra scenario overrides (key=value)")
    args = parser.parse_args()
    base = ["model.norm=bn", "output.eval_every=1000", "output.checkpoint_every=0",
            *args.overrides]
    times: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):
            for backend, extra in BACKENDS.items():
                for mode in MODES:
                    out = Path(tmp) / f"{backend}-{mode}-{rep}"
                    cpu = cpu_seconds()
                    fedsim.run(args.scenario, base + extra + [f"server.bn_statistics={mode}"],
                               out=out, overwrite=True)
                    cpu = cpu_seconds() - cpu
                    times.setdefault((backend, mode), []).append((*per_round(out), cpu))
    print(f"scenario {args.scenario}, overrides {base}, {args.repeats} alternating repeats")
    print("| backend | mode | train s/round | BN step s/round | ratio | CPU s/run | ratio |")
    print("|---|---|---|---|---|---|---|")
    for backend in BACKENDS:
        ref = [statistics.median(t[j] for t in times[(backend, "average")]) for j in range(3)]
        for mode in MODES:
            train, step, cpu = (statistics.median(t[j] for t in times[(backend, mode)])
                                for j in range(3))
            print(f"| {backend} | {mode} | {train:.3f} | {step:.3f} | {train / ref[0]:.2f} | "
                  f"{cpu:.2f} | {cpu / ref[2]:.2f} |")


if __name__ == "__main__":
    main()
