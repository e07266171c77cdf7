"""Memory and time per round as client state accumulates: ``scenarios/thousand_clients.toml``.

    python benchmarks/state_scaling.py                       # 100 rounds, 2 MB state budget
    python benchmarks/state_scaling.py --rounds 20 --set engine.state_memory_mb=64

Runs the scenario in a subprocess and reports its peak RSS (``getrusage`` of the child),
training seconds and process CPU seconds per round (mean of the first and the last tenth
of the rounds: flat if a round does not get slower as more clients hold state; CPU seconds
are far less disturbed by other processes on a shared machine than wall seconds), how many
distinct clients hold state by the end, and the client-state store's own accounting
(memory, disk, spills, loads).
A small ``engine.state_memory_mb`` makes the store spill to disk early, so the run also
measures reading state back from disk.
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
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import json, logging, sys, time
import fedsim
logging.basicConfig(level=logging.WARNING, format="%(message)s")
logging.getLogger("fedsim").setLevel(logging.INFO)
cpu = []
fedsim.run(sys.argv[1], sys.argv[3:], out=sys.argv[2], overwrite=True,
           progress=lambda rec: cpu.append((rec["round"], time.process_time())))
print("CPU " + json.dumps(cpu))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scenario", default="scenarios/thousand_clients.toml")
    p.add_argument("--rounds", type=int, default=100)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args()
    overrides = [f"server.rounds={args.rounds}", f"output.eval_every={args.rounds}",
                 "engine.state_memory_mb=2", *args.overrides]
    with tempfile.TemporaryDirectory(prefix="fedsim-scaling-") as tmp:
        out = Path(tmp) / "run"
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        proc = subprocess.run([sys.executable, "-c", CHILD, args.scenario, str(out), *overrides],
                              cwd=ROOT, env=env, capture_output=True, text=True)
        peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        if proc.returncode != 0:
            sys.exit(f"run failed:\n{proc.stderr[-3000:]}")
        rounds = [json.loads(x) for x in (out / "rounds.jsonl").read_text().splitlines()]
    marks = json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("CPU "))[4:])
    cpu = {r: t - t0 for (_, t0), (r, t) in zip(marks, marks[1:])}  # CPU s of each round
    trained = [r for r in rounds if r["round"] >= 1]
    tenth = max(1, len(trained) // 10)
    first = statistics.mean(r["train_seconds"] for r in trained[:tenth])
    last = statistics.mean(r["train_seconds"] for r in trained[-tenth:])
    distinct = len({c for r in trained for c in r["clients"]})
    store = [line for line in proc.stderr.splitlines() if "client-state store" in line]
    print(f"scenario {args.scenario} {' '.join(overrides)}")
    print(f"peak RSS {peak_mb:.0f} MB; load average now {os.getloadavg()[0]:.1f}")
    print(f"{len(trained)} rounds, {sum(r['updates'] for r in trained)} updates, "
          f"{distinct} distinct clients hold state at the end")
    median = statistics.median(r["train_seconds"] for r in trained)
    print(f"train seconds per round: first {tenth} rounds {first:.2f}, last {tenth} rounds "
          f"{last:.2f} (ratio {last / first:.2f}); median {median:.2f}")
    c = [cpu[r["round"]] for r in trained[:-1]]  # the last round also evaluates
    t = max(1, len(c) // 10)
    print(f"process CPU seconds per round (less sensitive to other load): first {t} rounds "
          f"{statistics.mean(c[:t]):.2f}, last {t} rounds {statistics.mean(c[-t:]):.2f} "
          f"(ratio {statistics.mean(c[-t:]) / statistics.mean(c[:t]):.2f})")
    print("wall per round:", " ".join(f"{r['train_seconds']:.2f}" for r in trained))
    print("CPU per round: ", " ".join(f"{x:.2f}" for x in c))
    print(store[-1] if store else "(no store line: engine.kind is not inprocess?)")


if __name__ == "__main__":
    main()
