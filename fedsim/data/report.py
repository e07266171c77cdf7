"""What each client holds: a per-client class-count table and a heat map of it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from fedsim.data.federated import FederatedData

MAX_PLOTTED_CLIENTS = 200


def partition_table(fd: FederatedData) -> list[dict[str, Any]]:
    """One JSON-ready row per client: ``client``, ``train_counts``, ``test_counts``, ``holdout``."""
    held = set(fd.holdout)
    rows = []
    for cid in range(fd.num_clients):
        train, test = fd.class_counts(cid)
        rows.append({"client": cid, "train_counts": train, "test_counts": test,
                     "holdout": cid in held})
    return rows


def plot_class_counts(fd: FederatedData, path: str | Path,
                      max_clients: int = MAX_PLOTTED_CLIENTS) -> Path:
    """Write a clients x classes heat map of training counts to ``path`` (PNG).

    Holdout clients are marked with a red triangle; beyond ``max_clients`` only the first
    ones are drawn and the title says so.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    shown = min(fd.num_clients, max_clients)
    counts = np.array([fd.class_counts(cid)[0] for cid in range(shown)])
    title = f"{fd.name}, partition {fd.partition.kind!r}: training samples per class"
    if shown < fd.num_clients:
        title += f"\n(first {shown} of {fd.num_clients} clients)"
    fig, ax = plt.subplots(figsize=(2.5 + 0.45 * fd.num_classes, min(14.0, 2.0 + 0.12 * shown)))
    image = ax.imshow(counts, aspect="auto", cmap="viridis", interpolation="nearest")
    fig.colorbar(image, ax=ax, label="training samples")
    held = [cid for cid in fd.holdout if cid < shown]
    if held:  # a red triangle just right of the map marks each holdout row
        ax.plot([fd.num_classes - 0.5 + 0.3] * len(held), held, "<", color="red",
                markersize=5, clip_on=False, linestyle="none")
        ax.set_xlim(-0.5, fd.num_classes - 0.5)
        title += "\nred \u25c0: holdout client (never trains)"
    ax.set_xlabel("class")
    ax.set_ylabel("client")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xticks(range(fd.num_classes))
    ax.set_title(title, fontsize="medium")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path
