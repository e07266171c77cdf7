"""What crossing to a Ray actor and back costs for one real cohort, handed to Ray as objects
(Ray's own serializer) or as one plain-pickled ``bytes`` object (fedsim's wire,
``fedsim.engine.ray_cohorts.to_wire``), in milliseconds per round trip of two actors at
once (median), on a local Ray with fedsim's settings.

    python benchmarks/ray_wire.py                        # thousand_clients, CNN
    python benchmarks/ray_wire.py --set model.arch=mlp

A short Ray cohort run keeps the first cohort task and result of its third pull; then two
plain actors (one CPU each) hold a copy of them and answer: nothing (Ray's floor), the
result as objects, the result as bytes (read back with ``from_wire`` in the driver, as
fedsim does), and the task sent to them as objects or as bytes.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scenario", default="scenarios/thousand_clients.toml")
    p.add_argument("--trips", type=int, default=40)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args()
    here = Path(__file__).resolve().parent  # never this folder's strategies.py
    sys.path[:] = [q for q in sys.path if Path(q or ".").resolve() != here] + [str(ROOT)]

    import fedsim
    import fedsim.engine.ray_cohorts as rc

    kept: list = []
    pool_run = rc.CohortPool.run

    def keep(self, tasks, offset=0):
        results = pool_run(self, tasks, offset)
        kept.append((tasks[0], results[0]))
        return results

    rc.CohortPool.run = keep
    with tempfile.TemporaryDirectory(prefix="fedsim-raywire-") as out:
        fedsim.run(args.scenario, [*args.overrides, "server.rounds=3", "output.eval_every=1000000",
                                   "engine.kind=ray", "engine.vectorize=true",
                                   "engine.ray_workers=2"], out=out, overwrite=True)
    rc.CohortPool.run = pool_run
    blob = rc.to_wire(kept[2])

    import ray

    os.environ.update(rc.LOCAL_RAY_ENV)
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)

    @ray.remote(num_cpus=1)
    class Echo:
        def __init__(self, blob: bytes) -> None:
            self.task, self.result = rc.from_wire(blob)

        def nothing(self) -> None:
            return None

        def result_objects(self):
            return self.result

        def result_bytes(self) -> bytes:
            return rc.to_wire(self.result)

        def take(self, task) -> None:
            return None

        def take_bytes(self, task: bytes) -> None:
            rc.from_wire(task)

    actors = [Echo.remote(blob) for _ in range(2)]
    ray.get([a.nothing.remote() for a in actors])
    task, result = kept[2]
    task_bytes = rc.to_wire(task)

    def trip(call, read=lambda r: r) -> float:
        times = []
        for _ in range(args.trips):
            t = time.perf_counter()
            for r in ray.get([call(a) for a in actors]):
                read(r)
            times.append(time.perf_counter() - t)
        return 1e3 * statistics.median(times)

    rows = [("nothing (Ray's floor)", trip(lambda a: a.nothing.remote())),
            ("result as objects", trip(lambda a: a.result_objects.remote())),
            ("result as bytes, read", trip(lambda a: a.result_bytes.remote(), rc.from_wire)),
            ("task as objects", trip(lambda a: a.take.remote(task))),
            ("task as bytes", trip(lambda a: a.take_bytes.remote(task_bytes)))]
    ray.shutdown()
    print(f"{args.scenario} {' '.join(args.overrides)}: one cohort of {len(task.messages)} "
          f"({len(task_bytes) / 1e3:.0f} kB task, {len(rc.to_wire(result)) / 1e3:.0f} kB "
          f"result); ms per round trip of 2 actors, median of {args.trips}")
    for name, ms in rows:
        print(f"  {name:<24} {ms:7.2f}")


if __name__ == "__main__":
    main()
