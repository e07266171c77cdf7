"""The partition report at any size: every client up to ``SAMPLE_ABOVE``, a seeded sample
beyond it, which says so and costs O(sample)."""

from __future__ import annotations

import json
import time

import matplotlib.figure
import pytest

from fedsim.cli import main
from fedsim.config import DataConfig, PartitionConfig, Scenario, ServerConfig
from fedsim.data import build_federated_data, describe_partition, plot_class_counts
from fedsim.data.report import (
    MAX_PLOTTED_CLIENTS,
    REPORT_SAMPLE,
    SAMPLE_ABOVE,
    described_clients,
)

SYNTH = DataConfig(name="synthetic", num_classes=4, image_size=4, channels=1,
                   samples_per_client=10, test_samples=8)
MILLION = 1_000_000
# Report + heat map of a sample, measured at ~0.5 s; describing every one of a million
# clients (~60 µs each) would take about a minute.
MAX_SECONDS = 20.0


def _data(num_clients: int, seed: int = 0, holdout: float = 0.01):
    return build_federated_data(Scenario(
        seed=seed, data=SYNTH, partition=PartitionConfig(
            num_clients=num_clients, kind="dirichlet", alpha=0.5, holdout_clients=holdout),
        server=ServerConfig(clients_per_round=1)))


class Counted:
    """``fd.class_counts`` counting its calls (the report's cost, in clients described)."""

    def __init__(self, fd, monkeypatch) -> None:
        self.calls = 0
        original = fd.class_counts

        def counted(cid):
            self.calls += 1
            return original(cid)

        monkeypatch.setattr(fd, "class_counts", counted)


@pytest.fixture
def titles(monkeypatch):
    """The axes titles of every figure saved while the test runs."""
    seen: list[str] = []
    save = matplotlib.figure.Figure.savefig

    def savefig(fig, *args, **kwargs):
        seen.extend(ax.get_title() for ax in fig.axes)
        return save(fig, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    return seen


def test_small_population_is_described_client_by_client(tmp_path, titles):
    fd = _data(SAMPLE_ABOVE)
    report = describe_partition(fd)
    assert not report.sampled and report.scope == f"all {SAMPLE_ABOVE:,} clients"
    assert [r["client"] for r in report.rows] == list(range(SAMPLE_ABOVE))
    assert [r["client"] for r in report.rows if r["holdout"]] == list(fd.holdout)
    assert report.to_json() is report.rows  # the plain list, as before
    sizes = report.sizes()
    assert sizes["over"] == f"all {SAMPLE_ABOVE:,} clients"
    assert sizes["train_samples"]["median"] == fd.client_size(0)  # every client: same size
    plot_class_counts(fd, tmp_path / "small.png")
    assert f"(first {MAX_PLOTTED_CLIENTS} of {SAMPLE_ABOVE} clients)" in titles[0]
    assert "sample of" not in titles[0]


def test_sample_is_seeded_sorted_and_the_plot_draws_from_it():
    fd = _data(SAMPLE_ABOVE + 1)
    table = described_clients(fd)
    assert len(table) == len(set(table)) == REPORT_SAMPLE and table == sorted(table)
    assert table[0] >= 0 and table[-1] <= SAMPLE_ABOVE
    assert table == described_clients(_data(SAMPLE_ABOVE + 1))  # fixed by the seed
    assert table != described_clients(_data(SAMPLE_ABOVE + 1, seed=1))
    plotted = described_clients(fd, MAX_PLOTTED_CLIENTS)
    assert len(plotted) == MAX_PLOTTED_CLIENTS and set(plotted) <= set(table)


def test_a_million_clients_are_described_by_a_sample_that_says_so(tmp_path, monkeypatch,
                                                                  titles):
    fd = _data(MILLION)
    counted = Counted(fd, monkeypatch)
    start = time.perf_counter()
    report = describe_partition(fd)
    plot_class_counts(fd, tmp_path / "million.png")
    seconds = time.perf_counter() - start
    assert counted.calls == REPORT_SAMPLE + MAX_PLOTTED_CLIENTS  # O(sample), not O(clients)
    assert seconds < MAX_SECONDS
    assert report.sampled and len(report.rows) == REPORT_SAMPLE
    assert report.scope == f"seeded sample of {REPORT_SAMPLE:,} of {MILLION:,} clients"
    assert [r["client"] for r in report.rows if r["holdout"]] == [
        r["client"] for r in report.rows if r["client"] in set(fd.holdout)]
    assert any(r["holdout"] for r in report.rows)  # 1% held out: ~10 of 1,000 sampled
    assert report.sizes()["over"] == report.scope
    assert f"seeded sample of {MAX_PLOTTED_CLIENTS} of {MILLION:,} clients" in titles[0]


def test_partitions_command_labels_a_sample(tmp_path, capsys):
    args = ["partitions", "scenarios/thousand_clients.toml", "--set",
            f"partition.num_clients={MILLION}", "--png", str(tmp_path / "p.png")]
    assert main([*args, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["population"] == MILLION and out["sampled"] == REPORT_SAMPLE
    assert out["note"] == f"seeded sample of {REPORT_SAMPLE:,} of {MILLION:,} clients"
    assert len(out["rows"]) == REPORT_SAMPLE and out["sizes"]["over"] == out["note"]
    assert main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"seeded sample of {REPORT_SAMPLE:,} of {MILLION:,} clients:"
    assert lines[-1].startswith(f"train samples per client over seeded sample of "
                                f"{REPORT_SAMPLE:,} of {MILLION:,} clients: min ")
    assert len(lines) == REPORT_SAMPLE + 3  # scope, header, rows, sizes
