"""What splitting a round into cohorts costs: the same train messages trained as one cohort,
as two halves (what two Ray cohort actors each get), as four quarters, in one process, with
every client's data already materialized, in milliseconds per round (median over rounds).

    python benchmarks/cohort_split_cost.py                     # thousand_clients (CNN)
    python benchmarks/cohort_split_cost.py --set model.arch=mlp

It runs the scenario once on the in-process vectorized engine (one torch thread) and keeps
each round's train messages and client states; then a fresh :class:`CohortTrainer` trains
every kept round once to warm its data cache, and once per split, timed. ``vmap`` is the
stacked local SGD (``train_cohort``), ``host`` the rest (decoding, hooks, replies). The
splits' ``vmap`` minus the whole cohort's is the fixed cost of the extra ``vmap`` calls:
per-op overhead that does not shrink with the cohort.
"""

from __future__ import annotations

import argparse
import pickle
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scenario", default="scenarios/thousand_clients.toml")
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args()
    here = Path(__file__).resolve().parent  # never this folder's strategies.py
    sys.path[:] = [q for q in sys.path if Path(q or ".").resolve() != here] + [str(ROOT)]

    import torch
    from flwr.app import Context, RecordDict

    import fedsim
    import fedsim.engine.vectorized as vectorized
    from fedsim.arrays import fast_flower_records
    from fedsim.client.runtime import ClientRuntime
    from fedsim.context import RunContext
    from fedsim.engine.store import decode_state, encode_state

    kept: list[bytes] = []
    call = vectorized.CohortTrainer.__call__

    def keep(self, msgs, contexts):
        kept.append(pickle.dumps((msgs, [c.node_id for c in contexts],
                                  [encode_state(c.state) if len(c.state) else None
                                   for c in contexts], dict(contexts[0].run_config))))
        return call(self, msgs, contexts)

    overrides = [*args.overrides, f"server.rounds={args.rounds}", "output.eval_every=1000000",
                 "engine.kind=inprocess", "engine.vectorize=true", "engine.threads=1"]
    vectorized.CohortTrainer.__call__ = keep
    with tempfile.TemporaryDirectory(prefix="fedsim-split-") as out:
        fedsim.run(args.scenario, overrides, out=out, overwrite=True)
    vectorized.CohortTrainer.__call__ = call

    scenario = fedsim.load_scenario(args.scenario, overrides)
    torch.set_num_threads(1)
    trainer = vectorized.CohortTrainer(ClientRuntime.for_run(RunContext.build(scenario)))
    in_vmap = [0.0]
    train_cohort = vectorized.train_cohort

    def timed(*a, **k):
        t = time.perf_counter()
        try:
            return train_cohort(*a, **k)
        finally:
            in_vmap[0] += time.perf_counter() - t

    vectorized.train_cohort = timed
    n = scenario.num_participating

    def round_of(blob: bytes):
        msgs, nodes, states, run_config = pickle.loads(blob)
        contexts = [Context(run_id=0, node_id=node,
                            node_config={"partition-id": node - 1, "num-partitions": n},
                            state=RecordDict() if raw is None else decode_state(raw),
                            run_config=dict(run_config))
                    for node, raw in zip(nodes, states)]
        return msgs, contexts

    rounds = kept[1:]  # the first round also builds the trainer's model
    with fast_flower_records():
        for blob in rounds:
            trainer(*round_of(blob))  # materialize every client's data
        print(f"{args.scenario} {' '.join(args.overrides)}: ms per round, median of "
              f"{len(rounds)} rounds, data cached")
        for parts in (1, 2, 4):
            total, vmap = [], []
            for blob in rounds:
                msgs, contexts = round_of(blob)
                size = -(-len(msgs) // parts)
                in_vmap[0] = 0.0
                t = time.perf_counter()
                for i in range(0, len(msgs), size):
                    replies = trainer(msgs[i:i + size], contexts[i:i + size])
                    assert not any(r.has_error() for r in replies), replies[0].error
                total.append(time.perf_counter() - t)
                vmap.append(in_vmap[0])
            t_ms, v_ms = 1e3 * statistics.median(total), 1e3 * statistics.median(vmap)
            print(f"  {parts} cohort(s) of {size:<4} total {t_ms:7.2f}  vmap {v_ms:7.2f}  "
                  f"host {t_ms - v_ms:6.2f}")


if __name__ == "__main__":
    main()
