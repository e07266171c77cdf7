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


def test_keep_copy_links_and_leaves_the_source(tmp_path):
    src, dst = tmp_path / "checkpoint.pt", tmp_path / "checkpoint.prev.pt"
    src.write_bytes(b"round 1")
    dst.write_bytes(b"round 0")
    files.keep_copy(src, dst)
    assert (src.read_bytes(), dst.read_bytes()) == (b"round 1", b"round 1")
    assert src.stat().st_ino == dst.stat().st_ino  # a hard link: no bytes copied
    files.keep_copy(src, dst)  # already one file (a rename between its links does nothing)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.prev.pt", "checkpoint.pt"]


def test_keep_copy_copies_where_there_are_no_hard_links(tmp_path, monkeypatch):
    import errno
    import os

    src, dst = tmp_path / "a", tmp_path / "b"
    src.write_bytes(b"x" * 3_000_000)

    def no_links(*_args):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    files.keep_copy(src, dst)
    assert dst.read_bytes() == src.read_bytes() and src.stat().st_ino != dst.stat().st_ino
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]


def test_a_wrapped_os_error_becomes_results_not_written_naming_the_file(tmp_path):
    from fedsim.errors import ResultsNotWritten

    def torch_like(fh):  # torch.save raises a RuntimeError while handling the OSError
        try:
            raise OSError(28, "No space left on device")
        except OSError:
            raise RuntimeError("unexpected pos 704 vs 598") from None

    with pytest.raises(ResultsNotWritten) as err:
        files.atomic_write(tmp_path / "model.pt", torch_like)
    assert (err.value.errno, err.value.path) == (28, str(tmp_path / "model.pt"))
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError):  # not a failure to write: unchanged
        files.atomic_write(tmp_path / "x", lambda fh: int("x"))
