"""Where one round's time goes, per piece, in milliseconds per round: the client work of a
vectorized cohort (its ``vmap`` training, and the per-client host work around it: decoding,
hooks, replies, state) and the server's own work between cohorts (configure, screening,
aggregation, records, checkpoint).

    python benchmarks/round_pieces.py                                  # thousand_clients, 30 rounds
    python benchmarks/round_pieces.py --scenario scenarios/quickstart.toml --rounds 20
    python benchmarks/round_pieces.py --set model.arch=mlp --json

It runs the scenario in this process on the in-process vectorized engine (the driver's work
is the same code on the Ray cohort engine) with timers wrapped around the pieces, so the
figures include the timers' own small cost. To compare two trees (before/after a change),
run it alternately with ``PYTHONPATH`` set to each (``PYTHONPATH=/tmp/before python
benchmarks/round_pieces.py`` times the code in /tmp/before, e.g. a ``git worktree`` of the
earlier commit) and compare medians of the paired ratios: this machine's timings drift
between runs far more than within one.

Pieces (ms per round, over all rounds):
  ``cohort``         CohortTrainer calls (the client side of every train round);
  ``cohort_vmap``    ``train_cohort`` inside them (the stacked local SGD);
  ``cohort_host``    the difference: per-client host work;
  ``driver``         a round minus the cohort calls and server-side evaluation, plus the
                     checkpoint and the round record (what Ray cohorts' driver does serially);
  and the driver's main parts: ``aggregate_train``, ``_nonfinite`` (screening),
  ``configure_train``, ``checkpoint``.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class Timers:
    """Wall-clock totals of wrapped callables; ``exclude`` pieces are subtracted from the
    ``net`` pieces that enclose them."""

    def __init__(self) -> None:
        self.total: dict[str, float] = collections.defaultdict(float)
        self._excluded = 0.0

    def wrap(self, owner, name: str, label: str | None = None, *, exclude: bool = False,
             net: bool = False) -> None:
        f = getattr(owner, name)
        label = label or name

        def timed(*a, **k):
            t, before = time.perf_counter(), self._excluded
            try:
                return f(*a, **k)
            finally:
                dt = time.perf_counter() - t
                if net:
                    dt -= self._excluded - before
                self.total[label] += dt
                if exclude:
                    self._excluded += dt

        setattr(owner, name, timed)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scenario", default="scenarios/thousand_clients.toml")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    # fedsim and the ``strategies`` package from PYTHONPATH first, else this repository; never
    # this folder, whose strategies.py would shadow the package
    here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here] + [str(ROOT)]

    import fedsim
    import fedsim.checkpoint as checkpoint
    import fedsim.engine.vectorized as vectorized
    import fedsim.engine.vectorized_eval as vectorized_eval
    import fedsim.server.evaluate as evaluate
    import fedsim.server.loop as loop
    import fedsim.sinks.folder as folder
    from fedsim.server.strategies import STRATEGIES

    timers = Timers()
    inside = [0]
    call = vectorized.CohortTrainer.__call__

    def cohort(self, msgs, contexts):
        inside[0] += 1
        try:
            return call(self, msgs, contexts)
        finally:
            inside[0] -= 1

    vectorized.CohortTrainer.__call__ = cohort
    timers.wrap(vectorized.CohortTrainer, "__call__", "cohort", exclude=True)
    train_cohort = vectorized.train_cohort

    def vmap_only(*a, **k):  # not the model check's dry step before round 1
        if not inside[0]:
            return train_cohort(*a, **k)
        t = time.perf_counter()
        try:
            return train_cohort(*a, **k)
        finally:
            timers.total["cohort_vmap"] += time.perf_counter() - t

    vectorized.train_cohort = vmap_only
    timers.wrap(vectorized_eval.CohortEvaluator, "__call__", "cohort_eval", exclude=True)
    timers.wrap(evaluate.Evaluator, "__call__", "server_eval", exclude=True)
    timers.wrap(loop, "_one_round", "round_net", net=True)
    timers.wrap(checkpoint.Checkpointer, "__call__", "checkpoint")
    timers.wrap(folder.RunFolder, "on_round", "record")
    timers.wrap(loop, "_nonfinite")
    scenario = fedsim.load_scenario(args.scenario, args.overrides)
    strategy = STRATEGIES.get(scenario.server.strategy, key="server.strategy")
    for hook in ("configure_train", "aggregate_train"):
        if isinstance(strategy, type) and hasattr(strategy, hook):
            timers.wrap(strategy, hook)
    with tempfile.TemporaryDirectory(prefix="fedsim-pieces-") as out:
        t0 = time.perf_counter()
        fedsim.run(args.scenario, args.overrides + [
            f"server.rounds={args.rounds}", "engine.kind=inprocess", "engine.vectorize=true",
            "output.eval_every=1000000"], out=out, overwrite=True)
        wall = time.perf_counter() - t0
    t = {k: 1e3 * v / args.rounds for k, v in timers.total.items()}
    res = {"cohort": t.get("cohort", 0.0), "cohort_vmap": t.get("cohort_vmap", 0.0)}
    res["cohort_host"] = res["cohort"] - res["cohort_vmap"]
    res["driver"] = t.get("round_net", 0.0) + t.get("checkpoint", 0.0) + t.get("record", 0.0)
    for k in ("aggregate_train", "_nonfinite", "configure_train", "checkpoint"):
        res[k] = t.get(k, 0.0)
    res["wall_s"] = wall
    if args.json:
        print(json.dumps(res))
        return
    print(f"{args.scenario}, {args.rounds} rounds {' '.join(args.overrides)}: ms per round")
    for k, v in res.items():
        print(f"  {k:<16} {v:9.2f}")


if __name__ == "__main__":
    main()
