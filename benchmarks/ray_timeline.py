"""Where a Ray cohort pull's wall time goes, step by step, in milliseconds (median over
rounds): the driver building and submitting the cohorts, Ray handing each to its actor,
the actor reading the task, training the cohort and writing the result, Ray handing the
result back, and the driver reading it.

    python benchmarks/ray_timeline.py                              # thousand_clients, CNN
    python benchmarks/ray_timeline.py --set model.arch=mlp
    python benchmarks/ray_timeline.py --scenario scenarios/quickstart.toml --rounds 40

The run is an ordinary run in this process (``engine.kind = "ray"``, ``engine.vectorize =
true``, ``engine.ray_workers = 2``, no evaluation until the end). Nothing in fedsim is
instrumented: the actors are a subclass of :class:`~fedsim.engine.ray_cohorts.CohortWorker`
defined here (Ray ships it to the actors by value) that stamps the wall clock around its
steps, and the driver's ``to_wire``/``from_wire`` and pool are wrapped here. The actors and
the driver share one machine, hence one clock. ``round`` is the whole server round, so
``round - pull`` is the driver's serial work between pulls (screening, aggregation, records,
checkpoint, the next round's messages), and ``pull`` minus the slowest actor's training is
what Ray and the two processes add to a pull.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("build and submit", "to the actor", "actor reads task", "actor trains",
         "actor writes result", "back to the driver", "driver reads result",
         "slowest actor trains", "pull", "round")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scenario", default="scenarios/thousand_clients.toml")
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--skip", type=int, default=5, help="rounds left out at the start")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args()
    here = Path(__file__).resolve().parent  # never this folder's strategies.py
    sys.path[:] = [q for q in sys.path if Path(q or ".").resolve() != here] + [str(ROOT)]

    import fedsim
    import fedsim.engine.ray_cohorts as rc
    import fedsim.server.loop as loop

    to_wire, from_wire = rc.to_wire, rc.from_wire

    class TimedWorker(rc.CohortWorker):
        def run_wire(self, task: bytes) -> bytes:
            t0 = time.time()
            task = from_wire(task)
            t1 = time.time()
            result = self.run(task)
            t2 = time.time()
            data = to_wire(result)  # wrapped once more below: a copy of bytes, ~0.1 ms
            return to_wire(("timed", task.nodes[0], (t0, t1, t2, time.time()), data))

    marks: list[dict] = []  # per pull: the driver's stamps and each actor's

    def timed_to_wire(obj):
        if isinstance(obj, rc.CohortTask):  # a cohort is known by its first node
            marks[-1].setdefault("submit", {})[obj.nodes[0]] = time.time()
        return to_wire(obj)

    def timed_from_wire(data):
        got = time.time()
        obj = from_wire(data)
        if isinstance(obj, tuple) and len(obj) == 4 and obj[0] == "timed":
            _, node, stamps, inner = obj
            result = from_wire(inner)
            marks[-1].setdefault("done", {})[node] = (*stamps, got, time.time())
            return result
        return obj

    pool_run = rc.CohortPool.run

    def pull(self, tasks, offset=0):
        marks.append({"start": time.time()})
        try:
            return pool_run(self, tasks, offset)
        finally:
            marks[-1]["end"] = time.time()

    rounds: list[float] = []
    one_round = loop._one_round

    def timed_round(*a, **k):
        t = time.perf_counter()
        try:
            return one_round(*a, **k)
        finally:
            rounds.append(time.perf_counter() - t)

    rc.CohortWorker, rc.to_wire, rc.from_wire = TimedWorker, timed_to_wire, timed_from_wire
    rc.CohortPool.run, loop._one_round = pull, timed_round
    with tempfile.TemporaryDirectory(prefix="fedsim-raytl-") as out:
        fedsim.run(args.scenario, [*args.overrides, f"server.rounds={args.rounds}",
                                   "output.eval_every=1000000", "engine.kind=ray",
                                   "engine.vectorize=true", "engine.ray_workers=2"],
                   out=out, overwrite=True)

    steps: dict[str, list[float]] = {k: [] for k in STEPS}
    for m in marks[args.skip:]:
        submits, done = m["submit"], m["done"]
        steps["build and submit"].append(max(submits.values()) - m["start"])
        for node, (t0, t1, t2, t3, got, t_end) in done.items():
            steps["to the actor"].append(t0 - submits[node])
            steps["actor reads task"].append(t1 - t0)
            steps["actor trains"].append(t2 - t1)
            steps["actor writes result"].append(t3 - t2)
            steps["back to the driver"].append(got - t3)
            steps["driver reads result"].append(t_end - got)
        steps["slowest actor trains"].append(max(t2 - t1 for _, t1, t2, *_ in done.values()))
        steps["pull"].append(m["end"] - m["start"])
    steps["round"] = rounds[args.skip:]
    print(f"{args.scenario} {' '.join(args.overrides)}: ms, medians over pulls "
          f"{args.skip + 1}..{len(marks)} (per cohort for the steps between submit and read; "
          f"round: over rounds {args.skip + 1}..{len(rounds)})")
    for k in STEPS:
        if steps[k]:
            print(f"  {k:<22} {1e3 * statistics.median(steps[k]):8.2f}")


if __name__ == "__main__":
    main()
