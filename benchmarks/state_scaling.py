"""Memory and time per round as client state accumulates: ``scenarios/thousand_clients.toml``.

    python benchmarks/state_scaling.py                       # 100 rounds, 2 MB state budget
    python benchmarks/state_scaling.py --rounds 20 --set engine.state_memory_mb=64
    python benchmarks/state_scaling.py --store-only          # the store alone, 10,000 clients

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


def store_only(clients: int = 10_000, per_round: int = 100, budget_mb: float = 2.0) -> None:
    """The store alone: seconds for a round's get+put of ``per_round`` random clients as the
    number of clients holding state grows (FedBN-sized states, ~1.8 kB each)."""
    import time

    import numpy as np
    from flwr.app import ArrayRecord, RecordDict

    from fedsim.arrays import to_array
    from fedsim.engine.store import ClientStateStore

    rng = np.random.default_rng(0)

    def state() -> RecordDict:
        return RecordDict({"fedbn.local": ArrayRecord(
            {f"bn{i}.{k}": to_array(rng.standard_normal(8 * (i + 1)).astype(np.float32))
             for i in range(2) for k in ("weight", "bias", "running_mean", "running_var")})})

    with tempfile.TemporaryDirectory() as tmp, \
            ClientStateStore(int(budget_mb * 2**20), tmp) as store:
        print(f"store alone ({budget_mb} MB budget): seconds per round of {per_round} get+put")
        for rnd in range(1, clients // per_round * 3 + 1):
            chosen = rng.choice(clients, per_round, replace=False)
            t0 = time.perf_counter()
            for cid in chosen:
                st = store.get(int(cid))
                store.put(int(cid), st if len(st) else state())
            dt = time.perf_counter() - t0
            if rnd in (1, 10, 50, 100, 200, 300):
                print(f"  round {rnd:>3}: {len(store):>5} clients hold state, "
                      f"{store.memory_bytes / 2**20:.1f} MB in memory, "
                      f"{store.disk_bytes / 2**20:.1f} MB on disk: {dt * 1e3:.1f} ms")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scenario", default="scenarios/thousand_clients.toml")
    p.add_argument("--rounds", type=int, default=100)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--store-only", action="store_true", help="time the store alone")
    args = p.parse_args()
    if args.store_only:
        return store_only()
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
    first = statistics.mean(r["train_seconds"] for r in trained[1 : tenth + 1])  # not round 1
    last = statistics.mean(r["train_seconds"] for r in trained[-tenth:])
    distinct = len({c for r in trained for c in r["clients"]})
    store = [line for line in proc.stderr.splitlines() if "client-state store" in line]
    print(f"scenario {args.scenario} {' '.join(overrides)}")
    print(f"peak RSS {peak_mb:.0f} MB; load average now {os.getloadavg()[0]:.1f}")
    print(f"{len(trained)} rounds, {sum(r['updates'] for r in trained)} updates, "
          f"{distinct} distinct clients hold state at the end")
    median = statistics.median(r["train_seconds"] for r in trained)
    print(f"train seconds per round: rounds 2..{tenth + 1} {first:.2f}, last {tenth} rounds "
          f"{last:.2f} (ratio {last / first:.2f}); median {median:.2f}")
    c = [cpu[r["round"]] for r in trained[:-1]]  # the last round also evaluates
    t = max(1, len(c) // 10)
    early = statistics.mean(c[1 : t + 1])  # round 1 warms up (first data, first kernels)
    print(f"process CPU seconds per round (less sensitive to other load): rounds 2..{t + 1} "
          f"{early:.2f}, last {t} rounds {statistics.mean(c[-t:]):.2f} "
          f"(ratio {statistics.mean(c[-t:]) / early:.2f})")
    print("wall per round:", " ".join(f"{r['train_seconds']:.2f}" for r in trained))
    print("CPU per round: ", " ".join(f"{x:.2f}" for x in c))
    print(store[-1] if store else "(no store line: engine.kind is not inprocess?)")


if __name__ == "__main__":
    main()
