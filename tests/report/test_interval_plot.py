"""The sweep report's interval plots on hand-made rows."""

from fedsim.report.report import interval_plot


def _row(norm: str, seed: int, acc: float) -> dict:
    return {"model.norm": norm, "seed": seed, "acc": acc,
            "params": {"model.norm": norm, "seed": seed}}


def test_interval_plot_draws_seeds_equal_up_to_rounding(tmp_path):
    """Two seeds a rounding error apart (0.15 and 0.15000000000000002: per-client p10 of
    small clients) have no spread, so their interval is one of them, a hair off their mean:
    the bars are zero, not negative (matplotlib refuses negative error bars)."""
    rows = [_row("ln", 0, 0.15), _row("ln", 1, 0.15000000000000002),
            _row("bn", 0, 0.2), _row("bn", 1, 0.3)]
    path = interval_plot(rows, [("accuracy", "acc")], tmp_path / "acc.png", None)
    assert path == tmp_path / "acc.png" and path.stat().st_size > 0
