"""A grid that knows which node is which client because its engine recorded the nodes'
registration: Ray's (:func:`fedsim.compat.recorded_simulation_nodes`) or the local
Deployment Engine's (each SuperNode's "SuperNode ID" line, :mod:`fedsim.engine.deploy`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from flwr.serverapp import Grid

from fedsim.compat import RegisteredNodes
from fedsim.engine.grid_proxy import DelegatingGrid
from fedsim.engine.ordered import CONNECT_TIMEOUT
from fedsim.files import write_text

#: run-config key of the file where the local Deployment Engine writes its nodes' partitions
NODE_PARTITIONS_KEY = "node-partitions"


def write_node_partitions(path: Path, partitions: Mapping[int, int]) -> Path:
    """Write ``{node id: partition id}`` as JSON (node ids as strings) to ``path``."""
    return write_text(path, json.dumps({str(node): p for node, p in partitions.items()}))


def with_recorded_partitions(grid: Grid, run_config: Mapping, client_ids: Sequence[int]
                             ) -> Grid:
    """``grid`` as a :class:`KnownNodesGrid` when the run config names a node-partitions file
    (:data:`NODE_PARTITIONS_KEY`, written by the local Deployment Engine), else ``grid``."""
    path = run_config.get(NODE_PARTITIONS_KEY)
    if not path:
        return grid
    nodes = RegisteredNodes()
    nodes.record({int(k): int(v) for k, v in json.loads(Path(str(path)).read_text()).items()})
    return KnownNodesGrid(grid, nodes, client_ids)


class KnownNodesGrid(DelegatingGrid):
    """A Flower grid, plus :meth:`client_ids` from the node registration its engine recorded
    (``partition-id`` → ``client_ids[partition-id]``), which a
    :class:`~fedsim.engine.ordered.ClientOrderedGrid` reads instead of asking every node."""

    def __init__(self, base: Grid, nodes: RegisteredNodes, client_ids: Sequence[int],
                 timeout: float = CONNECT_TIMEOUT) -> None:
        super().__init__(base)
        self.nodes = nodes
        self._client_ids = client_ids
        self.timeout = timeout

    def client_ids(self) -> Mapping[int, int] | None:
        """Node id → fedsim client id, once the engine has registered the nodes (Ray does so
        while the ServerApp starts); None if it did not within ``timeout`` s (then the nodes
        are asked)."""
        partitions = self.nodes.wait(self.timeout)
        if partitions is None:
            return None
        if len(partitions) != len(self._client_ids):
            raise RuntimeError(f"the engine registered {len(partitions)} nodes for "
                               f"{len(self._client_ids)} participating clients")
        return {node: int(self._client_ids[p]) for node, p in partitions.items()}
