"""Plots people would rather look at than read: learning curves of a run."""

from __future__ import annotations

from pathlib import Path

from fedsim.files import save_figure
from fedsim.text import mathtext


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_learning_curves(rounds: list[dict], path: Path, title: str = "",
                         population: int | None = None) -> None:
    """Global test accuracy, mean client accuracy and losses per round (two panels).

    ``population`` (the participating clients) labels the client curves as a sample when
    fewer clients were evaluated (``output.eval_clients``): "sample of K of N clients".
    """
    plt = _pyplot()
    ev = [r for r in rounds if r.get("global_test_accuracy") is not None]
    tr = [r for r in rounds if r.get("train_loss") is not None]
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(10, 4))
    ax_acc.plot([r["round"] for r in ev], [r["global_test_accuracy"] for r in ev],
                marker="o", label="global test")
    client = [(r["round"], r["client_accuracy"]) for r in ev if r.get("client_accuracy")]
    if client and "mean" in client[0][1]:
        xs = [c[0] for c in client]
        sample = _sample_note(client[-1][1].get("n"), population)
        ax_acc.plot(xs, [c[1]["mean"] for c in client], marker=".",
                    label="client mean" + sample)
        ax_acc.fill_between(xs, [c[1]["p10"] for c in client], [c[1]["p90"] for c in client],
                            alpha=0.2, label="client p10–p90" + sample)
    ax_acc.set_xlabel("round")
    ax_acc.set_ylabel("accuracy")
    ax_acc.set_ylim(0, 1)
    ax_acc.legend()
    ax_loss.plot([r["round"] for r in ev], [r["global_test_loss"] for r in ev],
                 marker="o", label="global test loss")
    ax_loss.plot([r["round"] for r in tr], [r["train_loss"] for r in tr],
                 marker=".", label="client train loss")
    ax_loss.set_xlabel("round")
    ax_loss.set_ylabel("cross-entropy")
    ax_loss.legend()
    fig.suptitle(mathtext(title))  # a run's name is data: a "$" in it is no mathtext
    fig.tight_layout()
    try:
        save_figure(fig, path, dpi=100)
    finally:
        plt.close(fig)


def _sample_note(evaluated: int | None, population: int | None) -> str:
    """``" (sample of K of N clients)"`` when fewer than all clients were evaluated."""
    if evaluated is None or population is None or evaluated >= population:
        return ""
    return f" (sample of {evaluated:,} of {population:,} clients)"
