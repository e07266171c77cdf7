"""A million-client federation on one machine: ``scenarios/million_clients.toml`` runs in a
fresh process with a peak memory that does not grow with the population, and a resume at
1,000,000 clients gives exactly the uninterrupted run."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from same_run import assert_same_run  # tests/same_run.py

import fedsim
from fedsim.sinks.progress import round_stats

ROOT = Path(__file__).resolve().parents[1]
SCENARIO = "scenarios/million_clients.toml"
# 2 rounds, checkpoints after each (round 1's is what the resume starts from); fewer clients
# evaluated than the scenario ships with, to keep the test quick
SHORT = ["server.rounds=2", "output.eval_every=2", "output.eval_clients=20",
         "output.checkpoint_every=1"]
# Peak RSS growth of the run over the process after its imports (torch, Flower, fedsim),
# measured at ~0.25 GB on CPU. A per-client object or message before training (what the
# population cost before issue 20: ~3.7 KB per client) would add ~3.7 GB at 1M clients.
MAX_GROWTH_MB = 1024
# Seconds from the imports' end to the run's end, measured at ~3 s on a shared 2-core
# container; one query message per client (~75 µs each) would take ~75 s.
MAX_SECONDS = 40

PROBE = """
import json, resource, sys, time
import fedsim.runner  # torch, Flower and every registry: the baseline the run grows from
from fedsim.cli import main

base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
rc = main(sys.argv[1:])
print(json.dumps({"rc": rc, "seconds": time.perf_counter() - t0, "base_kb": base,
                  "peak_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


@pytest.fixture(scope="module")
def million(tmp_path_factory):
    """The 2-round run of million_clients.toml in a fresh process: its folder and probe."""
    out = tmp_path_factory.mktemp("million") / "ref"
    sets = [a for s in SHORT for a in ("--set", s)]
    # one torch thread, as in this process (tests/conftest.py): the resume below then agrees
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", PROBE, "run", SCENARIO, *sets, "--quiet",
                           "--out", str(out)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    probe = json.loads(proc.stdout.strip().splitlines()[-1])
    assert probe["rc"] == 0, proc.stderr[-3000:]
    return out, probe


def test_a_million_clients_run_in_seconds_with_bounded_memory(million):
    out, probe = million
    summary = json.loads((out / "summary.json").read_text())
    records = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    trained = [r for r in records if r.get("round", 0) >= 1]
    assert [r["round"] for r in trained] == [1, 2]
    assert all(r["updates"] == 100 for r in trained)
    assert all(0 <= c < 1_000_000 for r in trained for c in r["clients"])
    assert summary["final"]["global_test_accuracy"] is not None
    growth_mb = (probe["peak_kb"] - probe["base_kb"]) / 1024  # ru_maxrss: KiB on Linux
    assert growth_mb < MAX_GROWTH_MB, probe
    assert probe["seconds"] < MAX_SECONDS, probe


def interrupted_copy(ref: Path, dst: Path) -> Path:
    """``ref`` as a kill right after round 1's checkpoint would leave it: round 2 already in
    rounds.jsonl plus half a line, no summary, no model (as in tests/resilience)."""
    shutil.copytree(ref, dst)
    for name in ("summary.json", "model.pt", "learning_curves.png", "checkpoint.pt"):
        (dst / name).unlink(missing_ok=True)
    (dst / "checkpoint.prev.pt").rename(dst / "checkpoint.pt")
    with open(dst / "rounds.jsonl", "a") as fh:
        fh.write('{"round": 99, "clie')
    return dst


def test_resume_at_a_million_clients_equals_the_uninterrupted_run(million, tmp_path):
    ref, _ = million
    resumed = fedsim.resume(interrupted_copy(ref, tmp_path / "resumed"))
    assert resumed.summary["resumed_from"] == [1]
    assert_same_run(ref, resumed.path)


def test_the_progress_line_shows_the_population():
    rec = {"round": 3, "updates": 100, "clients": list(range(100)), "train_seconds": 0.5}
    line = round_stats(rec, 300, 1.5, 290, [0.5], population=1_000_000)
    assert line.startswith("100 of 1,000,000 clients  300 updates by 290 clients")
    assert round_stats(rec, 300, 1.5, 290, [0.5]).startswith("100 clients  300 updates")


# ----------------------------------------------- the in-process grid reads no client ids


class _AscendingIds:
    """Participating client ids that declare their order and count how often they are read:
    listing nodes in client order must not read them (a Python loop over the population)."""

    ascending = True

    def __init__(self, ids):
        self.ids, self.reads = list(ids), 0

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        self.reads += 1
        return self.ids[i]

    def __iter__(self):
        self.reads += len(self.ids)
        return iter(self.ids)

    def index(self, cid):
        return self.ids.index(cid)


def test_node_order_is_client_order_without_reading_the_population():
    from flwr.clientapp import ClientApp

    from fedsim.engine.inprocess import InProcessGrid
    from fedsim.engine.ordered import ClientOrderedGrid

    ids = _AscendingIds([0, 2, 3, 7, 9])
    grid = ClientOrderedGrid(InProcessGrid(ClientApp(), 5, client_ids=ids), expected_nodes=5)
    assert grid.get_node_ids() == (1, 2, 3, 4, 5) and ids.reads == 0
    assert [grid.node_id(c) for c in (0, 7, 9, 4)] == [1, 4, 5, None]
    assert grid.client_id(4) == 7


def test_node_of_a_client_on_a_queried_grid_inverts_the_learned_mapping():
    from fedsim.engine.ordered import ClientOrderedGrid

    class Known:  # a base grid whose mapping is a plain dict (what a query returns)
        def client_ids(self):
            return {11: 5, 12: 1, 13: 3}

    grid = ClientOrderedGrid(Known(), expected_nodes=3)
    assert grid.get_node_ids() == (12, 13, 11)
    assert [grid.node_id(c) for c in (1, 3, 5, 2)] == [12, 13, 11, None]


def test_the_participating_clients_of_a_big_population_map_to_nodes_in_order():
    from flwr.clientapp import ClientApp

    from fedsim.data.population import make_population
    from fedsim.engine.inprocess import InProcessGrid
    from fedsim.engine.ordered import ClientOrderedGrid

    pop = make_population("keyed", 0, 1_000_000, 10_000)
    grid = ClientOrderedGrid(InProcessGrid(ClientApp(), 990_000,
                                           client_ids=pop.participating),
                             expected_nodes=990_000)
    nodes = grid.get_node_ids()
    assert len(nodes) == 990_000 and nodes[0] == 1 and nodes[-1] == 990_000
    for node in (1, 123_456, 990_000):
        cid = grid.client_id(node)
        assert cid == pop.participating[node - 1] and grid.node_id(cid) == node
    assert grid.node_id(pop.holdout[0]) is None
