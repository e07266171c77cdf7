"""What ``server.bn_statistics`` costs per round: ``average`` vs ``pooled`` vs ``recalibrate``
on a small BN scenario, one client at a time and in vectorized cohorts.

Runs the modes in alternation (``--repeats`` passes of average → pooled → recalibrate per
backend, so machine load drifts over all of them alike) and reports, per mode and backend,
the median over runs of the mean per-round training-phase seconds (``train_seconds``:
sampling, client training, aggregation and the BN step; not server evaluation) and of the
step's own seconds (``bn_seconds``), and the ratio to ``average``. From the repository
root::

    python benchmarks/bn_statistics_cost.py                  # quickstart + model.norm=bn
    python benchmarks/bn_statistics_cost.py --repeats 5 --set server.rounds=5
"""

from __future__ import annotations

import argparse
import json
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", default="scenarios/quickstart.toml")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--set", action="append", default=[], dest="overrides",
                        help="extra scenario overrides (key=value)")
    args = parser.parse_args()
    base = ["model.norm=bn", "output.eval_every=1000", "output.checkpoint_every=0",
            *args.overrides]
    times: dict[tuple[str, str], list[tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):
            for backend, extra in BACKENDS.items():
                for mode in MODES:
                    out = Path(tmp) / f"{backend}-{mode}-{rep}"
                    fedsim.run(args.scenario, base + extra + [f"server.bn_statistics={mode}"],
                               out=out, overwrite=True)
                    times.setdefault((backend, mode), []).append(per_round(out))
    print(f"scenario {args.scenario}, overrides {base}, {args.repeats} alternating repeats")
    print("| backend | mode | train s/round (median) | BN step s/round | ratio to average |")
    print("|---|---|---|---|---|")
    for backend in BACKENDS:
        ref = statistics.median(t for t, _ in times[(backend, "average")])
        for mode in MODES:
            train = statistics.median(t for t, _ in times[(backend, mode)])
            step = statistics.median(s for _, s in times[(backend, mode)])
            print(f"| {backend} | {mode} | {train:.3f} | {step:.3f} | {train / ref:.2f} |")


if __name__ == "__main__":
    main()
