"""Atomic writes: a file is replaced whole or left as it was, and no temporary file stays."""

import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from fedsim import files  # noqa: E402


def test_write_text_replaces_whole_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "summary.json"
    path.write_text("old")
    files.write_text(path, "new ü")
    assert path.read_text(encoding="utf-8") == "new ü"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_a_failing_write_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    path = tmp_path / "report.md"
    path.write_text("old")

    def half_then_fail(fh):
        fh.write(b"torn")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        files.atomic_write(path, half_then_fail)
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.md"]


def test_an_interrupt_during_the_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "model.pt"
    path.write_bytes(b"old")

    def interrupted(fh):
        fh.write(b"x")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        files.atomic_write(path, interrupted)
    assert path.read_bytes() == b"old"
    assert not files.temporary_name(path).exists()


def test_write_json_round_trips_with_a_final_newline(tmp_path):
    path = files.write_json(tmp_path / "a.json", {"b": [1, 2.5, None]}, indent=2)
    text = path.read_text()
    assert text.endswith("}\n") and json.loads(text) == {"b": [1, 2.5, None]}


def test_save_torch_loads_back_bitwise(tmp_path):
    state = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3) / 7}
    files.save_torch(state, tmp_path / "model.pt")
    back = torch.load(tmp_path / "model.pt", weights_only=True)
    assert torch.equal(back["w"], state["w"])


@pytest.mark.parametrize("suffix, magic", [(".png", b"\x89PNG"), (".pdf", b"%PDF")])
def test_save_figure_takes_the_format_from_the_suffix(tmp_path, suffix, magic):
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    path = files.save_figure(fig, tmp_path / f"curve{suffix}", dpi=50)
    plt.close(fig)
    assert path.read_bytes().startswith(magic)
    assert [p.name for p in tmp_path.iterdir()] == [f"curve{suffix}"]
