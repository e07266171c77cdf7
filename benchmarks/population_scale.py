"""How a run's cost grows with the population: ``scenarios/thousand_clients.toml`` at 10k,
100k, 1M and 10M clients (100 sampled per round at every size), each size in its own
``fedsim run`` subprocess, one table at the end.

Per size it prints:

- set-up s: the subprocess's wall time outside the run's own clock (summary.json
  ``timing.seconds``): interpreter start, imports, building the population, preflight and
  writing the results; the part the issue wants independent of the population;
- round s: the median of the rounds' ``seconds`` (rounds.jsonl, rounds >= 1);
- wall s and peak RSS (MB) of the subprocess (``resource.getrusage(RUSAGE_CHILDREN)``,
  which is the largest child so far: sizes run smallest first, so each row's peak is its own
  unless a smaller size peaked higher, which the table then flags with ``>=``).

Run from the repository root::

    PYTHONPATH=$PWD python benchmarks/population_scale.py --sizes 10000,100000,1000000
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCENARIO = ROOT / "scenarios" / "thousand_clients.toml"
SIZES = (10_000, 100_000, 1_000_000, 10_000_000)


def run_size(clients: int, rounds: int, out: Path) -> dict:
    """One ``fedsim run`` at ``clients`` clients in a fresh subprocess: its timings and RSS."""
    cmd = [sys.executable, "-m", "fedsim.cli", "run", str(SCENARIO), "--quiet",
           "--out", str(out), "--set", f"partition.num_clients={clients}",
           "--set", f"server.rounds={rounds}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB on Linux
    if proc.returncode != 0:
        raise SystemExit(f"error: {clients:,} clients failed (exit {proc.returncode}):\n"
                         f"{proc.stderr[-2000:]}")
    summary = json.loads((out / "summary.json").read_text())
    records = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    round_s = [r["seconds"] for r in records if r.get("round", 0) >= 1 and "seconds" in r]
    run_s = summary["timing"]["seconds"]
    return {"clients": clients, "setup_s": wall - run_s, "round_s": statistics.median(round_s),
            "wall_s": wall, "peak_mb": peak_kb / 1024, "peak_is_own": peak_kb > before}


def table(rows: list[dict]) -> str:
    """A markdown table of the rows, plus the ratios the issue's targets are stated in."""
    lines = ["| clients | set-up s | round s (median) | wall s | peak RSS (MB) |",
             "| --- | --- | --- | --- | --- |"]
    for r in rows:
        peak = f"{r['peak_mb']:,.0f}" if r["peak_is_own"] else f">= {r['peak_mb']:,.0f}"
        lines.append(f"| {r['clients']:,} | {r['setup_s']:.1f} | {r['round_s']:.2f} | "
                     f"{r['wall_s']:.1f} | {peak} |")
    first = rows[0]
    if len(rows) > 1:
        lines.append("")
    for r in rows[1:]:
        lines.append(f"{r['clients']:,} vs {first['clients']:,}: wall x"
                     f"{r['wall_s'] / first['wall_s']:.2f}, round x"
                     f"{r['round_s'] / first['round_s']:.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default=",".join(str(s) for s in SIZES),
                        help="comma-separated client counts, run smallest first "
                             "(default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per size (default 5)")
    args = parser.parse_args(argv)
    try:
        sizes = sorted(int(s.replace("_", "")) for s in args.sizes.split(",") if s.strip())
    except ValueError:
        parser.error(f"--sizes {args.sizes!r} must be comma-separated integers, e.g. 10000,100000")
    rows = []
    with tempfile.TemporaryDirectory(prefix="population_scale_") as tmp:
        for clients in sizes:
            rows.append(run_size(clients, args.rounds, Path(tmp) / str(clients)))
            r = rows[-1]
            print(f"{clients:,} clients: set-up {r['setup_s']:.1f} s, round {r['round_s']:.2f} s, "
                  f"wall {r['wall_s']:.1f} s, peak {r['peak_mb']:,.0f} MB", file=sys.stderr,
                  flush=True)
    print(table(rows))


if __name__ == "__main__":
    main()
