"""The set-up parts that grow with the population, and one round's Flower sampling, in CPU
seconds (``time.process_time``) in one process, for ``scenarios/thousand_clients.toml`` at N
clients: building the FederatedData (holdout and participating clients), the ordered node
list, the evaluated clients, the personalised evaluator's nodes, and what Flower's
``FedAvg.configure_train`` does with the node list each round.

Run from the repository root (any tree: a tree whose ``ClientOrderedGrid`` has no
``node_id`` gets the older per-node filter)::

    PYTHONPATH=$PWD python benchmarks/population_parts.py 1000000
"""

from __future__ import annotations

import random
import resource
import sys
import time

from flwr.clientapp import ClientApp
from flwr.serverapp.strategy.strategy_utils import sample_nodes

import fedsim
from fedsim.data.federated import _build
from fedsim.engine.inprocess import InProcessGrid
from fedsim.engine.ordered import ClientOrderedGrid
from fedsim.server.evaluate import pick_clients

ROUNDS = 5


def main(n: int) -> dict[str, float]:
    s = fedsim.load_scenario("scenarios/thousand_clients.toml", [f"partition.num_clients={n}"])
    clock, out = time.process_time, {}
    t = clock()
    fd = _build.__wrapped__(s.seed, s.data, s.partition)  # uncached, as a fresh process
    out["population"] = clock() - t
    t = clock()
    nodes = len(fd.participating)
    grid = ClientOrderedGrid(InProcessGrid(ClientApp(), nodes, client_ids=fd.participating),
                             nodes)
    grid.get_node_ids()
    out["node list"] = clock() - t
    t = clock()
    clients = pick_clients(fd.participating, s.output.eval_clients, s.seed, "participating")
    pick_clients(fd.holdout, s.output.eval_clients, s.seed, "holdout")
    out["eval clients"] = clock() - t
    t = clock()
    if hasattr(grid, "node_id"):
        [nd for nd in map(grid.node_id, sorted(set(clients))) if nd is not None]
    else:
        wanted = set(clients)
        [nd for nd in grid.get_node_ids() if grid.client_id(nd) in wanted]
    out["personal nodes"] = clock() - t
    random.seed(0)
    t = clock()
    for _ in range(ROUNDS):  # FedAvg.configure_train: len(list(...)), then sample_nodes
        len(list(grid.get_node_ids()))
        sample_nodes(grid, 2, s.server.clients_per_round)
    out["sampling per round"] = (clock() - t) / ROUNDS
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2 or not sys.argv[1].replace("_", "").isdigit():
        raise SystemExit("error: give one client count, e.g. "
                         "python benchmarks/population_parts.py 1000000")
    parts = main(int(sys.argv[1].replace("_", "")))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(" ".join(f"{k}={v:.3f}" for k, v in parts.items()), f"peak_rss={peak:.0f}MB")
