"""What each client holds: a per-client class-count table and a heat map of it.

A population of up to :data:`SAMPLE_ABOVE` clients is described client by client. A larger
one (a synthetic population of a million) is described by a sample of
:data:`REPORT_SAMPLE` clients, fixed by the scenario seed, so the report costs the same at
any size; every table, summary and plot made from a sample says so ("sample of K of N
clients"), and the summary statistics are labelled as the sample's.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedsim.data.federated import FederatedData
from fedsim.files import make_folder, save_figure
from fedsim.rng import numpy_rng

MAX_PLOTTED_CLIENTS = 200
#: populations larger than this are described by a seeded sample, not client by client
SAMPLE_ABOVE = 1000
#: clients in that sample (the heat map draws the first ``MAX_PLOTTED_CLIENTS`` of them)
REPORT_SAMPLE = 1000


def described_clients(fd: FederatedData, limit: int = REPORT_SAMPLE) -> list[int]:
    """The client ids a report describes, in increasing order.

    Every client (the first ``limit`` of them) when the population is at most
    :data:`SAMPLE_ABOVE`; otherwise ``limit`` clients drawn without replacement by
    ``(seed, "report", "clients")`` in O(``limit``): the first ``limit`` of one seeded
    random order, so the heat map's clients are among the table's.
    """
    n = fd.num_clients
    if n <= SAMPLE_ABOVE:
        return list(range(min(n, limit)))
    order = numpy_rng(fd.seed, "report", "clients").choice(
        n, size=min(n, max(limit, REPORT_SAMPLE)), replace=False)
    return sorted(int(c) for c in order[:limit])


def is_sampled(fd: FederatedData) -> bool:
    """Whether reports describe a sample of ``fd``'s clients rather than every client."""
    return fd.num_clients > SAMPLE_ABOVE


def sample_caption(shown: int, population: int) -> str:
    """``"sample of K of N clients"``, the words every sampled report carries."""
    return f"seeded sample of {shown:,} of {population:,} clients"


def _holdout(fd: FederatedData, cid: int) -> bool:
    """Whether ``cid`` is a holdout client (``fd.holdout`` is sorted: no set of it)."""
    i = bisect.bisect_left(fd.holdout, cid)
    return i < len(fd.holdout) and fd.holdout[i] == cid


def _row(fd: FederatedData, cid: int) -> dict[str, Any]:
    train, test = fd.class_counts(cid)
    return {"client": cid, **fd.describe(cid), "train_counts": train, "test_counts": test,
            "holdout": _holdout(fd, cid)}


@dataclass(frozen=True)
class PartitionReport:
    """Rows of the clients a report describes, and whether they are a sample.

    ``rows`` are :func:`partition_table`'s; ``population`` is the number of clients in the
    federation. Summaries computed from a sample are labelled as the sample's.
    """

    population: int
    rows: list[dict[str, Any]]
    sampled: bool

    @property
    def scope(self) -> str:
        """What the rows cover: ``"all N clients"`` or ``"sample of K of N clients ..."``."""
        if self.sampled:
            return sample_caption(len(self.rows), self.population)
        return f"all {self.population:,} clients"

    def sizes(self) -> dict[str, Any]:
        """Quantiles of training samples and of classes present per client, over the rows
        (``over`` names them: every client, or the sample)."""
        train = np.array([sum(r["train_counts"]) for r in self.rows], dtype=float)
        classes = np.array([sum(c > 0 for c in r["train_counts"]) for r in self.rows],
                           dtype=float)
        return {"over": self.scope, "train_samples": _quantiles(train),
                "classes_present": _quantiles(classes)}

    def to_json(self) -> list[dict[str, Any]] | dict[str, Any]:
        """Every client: the list of rows (as always). A sample: an object that says so,
        ``{"population", "sampled", "note", "sizes", "rows"}``."""
        if not self.sampled:
            return self.rows
        return {"population": self.population, "sampled": len(self.rows), "note": self.scope,
                "sizes": self.sizes(), "rows": self.rows}


def _quantiles(v: np.ndarray) -> dict[str, float]:
    if v.size == 0:
        return {}
    p10, median, p90 = np.percentile(v, [10, 50, 90])
    return {"min": float(v.min()), "p10": float(p10), "median": float(median),
            "p90": float(p90), "max": float(v.max())}


def describe_partition(fd: FederatedData, limit: int = REPORT_SAMPLE) -> PartitionReport:
    """The partition report of ``fd``: every client, or a seeded sample beyond
    :data:`SAMPLE_ABOVE` clients (cost O(sample), not O(clients))."""
    rows = [_row(fd, cid) for cid in described_clients(fd, limit)]
    return PartitionReport(fd.num_clients, rows, is_sampled(fd))


def partition_table(fd: FederatedData) -> list[dict[str, Any]]:
    """One JSON-ready row per described client: ``client``, ``train_counts``,
    ``test_counts``, ``holdout`` (every client, or the seeded sample of a large population:
    :func:`describe_partition` says which)."""
    return describe_partition(fd).rows


def plot_class_counts(fd: FederatedData, path: str | Path,
                      max_clients: int = MAX_PLOTTED_CLIENTS) -> Path:
    """Write a clients x classes heat map of training counts to ``path`` (PNG).

    Holdout clients are marked with a red triangle. Up to :data:`SAMPLE_ABOVE` clients, the
    first ``max_clients`` are drawn (the title says so when that is not all); beyond, a seeded
    sample of ``max_clients`` (rows labelled by client id) and the title says "sample of K of
    N clients".
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    clients = described_clients(fd, max_clients)
    shown = len(clients)
    counts = np.array([fd.class_counts(cid)[0] for cid in clients])
    title = f"{fd.name}, partition {fd.partition.kind!r}: training samples per class"
    if is_sampled(fd):
        title += f"\n({sample_caption(shown, fd.num_clients)})"
    elif shown < fd.num_clients:
        title += f"\n(first {shown} of {fd.num_clients} clients)"
    fig, ax = plt.subplots(figsize=(2.5 + 0.45 * fd.num_classes, min(14.0, 2.0 + 0.12 * shown)))
    image = ax.imshow(counts, aspect="auto", cmap="viridis", interpolation="nearest")
    fig.colorbar(image, ax=ax, label="training samples")
    held = [row for row, cid in enumerate(clients) if _holdout(fd, cid)]
    if held:  # a red triangle just right of the map marks each holdout row
        ax.plot([fd.num_classes - 0.5 + 0.3] * len(held), held, "<", color="red",
                markersize=5, clip_on=False, linestyle="none")
        ax.set_xlim(-0.5, fd.num_classes - 0.5)
        title += "\nred \u25c0: holdout client (never trains)"
    ax.set_xlabel("class")
    if is_sampled(fd):
        _label_rows(ax, clients)
        ax.set_ylabel("sampled client (id)")
    else:
        ax.set_ylabel("client")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xticks(range(fd.num_classes))
    ax.set_title(title, fontsize="medium")
    path = Path(path)
    try:
        make_folder(path.parent)
        save_figure(fig, path, dpi=100, bbox_inches="tight")
    finally:
        plt.close(fig)
    return path


def _label_rows(ax, clients: Sequence[int], ticks: int = 10) -> None:
    """Label about ``ticks`` rows of a sampled heat map with their client ids."""
    rows = sorted(set(np.linspace(0, len(clients) - 1, min(ticks, len(clients)),
                                  dtype=int).tolist()))
    ax.set_yticks(rows)
    ax.set_yticklabels([f"{clients[r]:,}" for r in rows])
