"""Learning curves say when their client curves are a sample of the population."""

import matplotlib.figure
import pytest

from fedsim.sinks.plots import plot_learning_curves


def _rounds(n: int) -> list[dict]:
    dist = {"mean": 0.5, "p10": 0.4, "p90": 0.6, "n": n}
    return [{"round": r, "global_test_accuracy": 0.5, "global_test_loss": 1.0,
             "train_loss": 1.1, "client_accuracy": dist} for r in (0, 1)]


@pytest.fixture
def legends(monkeypatch):
    """The legend texts of every figure saved while the test runs."""
    seen: list[str] = []
    save = matplotlib.figure.Figure.savefig

    def savefig(fig, *args, **kwargs):
        seen.extend(t.get_text() for ax in fig.axes if ax.get_legend()
                    for t in ax.get_legend().get_texts())
        return save(fig, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    return seen


def test_client_curves_of_a_sample_say_so(tmp_path, legends):
    plot_learning_curves(_rounds(200), tmp_path / "a.png", population=1_000_000)
    assert "client mean (sample of 200 of 1,000,000 clients)" in legends
    assert "client p10–p90 (sample of 200 of 1,000,000 clients)" in legends


@pytest.mark.parametrize("population", [18, None])
def test_client_curves_of_every_client_are_unlabelled(tmp_path, legends, population):
    plot_learning_curves(_rounds(18), tmp_path / "b.png", population=population)
    assert "client mean" in legends and not any("sample" in t for t in legends)
