"""``fedsim report``: a sweep's report rebuilt in place; separate runs compared as cells."""

import json
import shutil

import pytest

import fedsim
from fedsim.cli import main
from fedsim.sweep import run_sweep

TINY = ["server.rounds=1", "partition.num_clients=4", "server.clients_per_round=2",
        "partition.holdout_clients=0.0", "model.width=8", "client.epochs=1"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two finished runs that differ in their norm (and, irrelevantly, in where they ran)."""
    root = tmp_path_factory.mktemp("runs")
    for norm, threads in (("bn", 1), ("gn", 2)):
        fedsim.run("scenarios/quickstart.toml", TINY + [f"model.norm={norm}",
                                                        f"engine.threads={threads}"],
                   out=root / norm)
    return root


def test_runs_are_compared_by_what_varies_between_them(runs, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["report", str(runs / "bn"), str(runs / "gn"), "--out", str(out)]) == 0
    assert f"report → {out / 'report.md'}" in capsys.readouterr().out
    rows = json.loads((out / "report.json").read_text())["rows"]
    # engine.threads differs too, but it says how a run executed, not what it learned
    assert [(r["cell"], r["params"], r["model.norm"]) for r in rows] == [
        ("bn", {"model.norm": "bn"}, "bn"), ("gn", {"model.norm": "gn"}, "gn")]
    for row in rows:
        summary = json.loads((runs / row["cell"] / "summary.json").read_text())
        assert row["acc"] == summary["final"]["global_test_accuracy"]
    text = (out / "report.md").read_text()
    assert text.startswith("# Comparison of runs: cmp")
    assert "Axes: `model.norm` = `[\"bn\", \"gn\"]`." in text and "| gn |" in text
    assert (out / "accuracy.png").is_file() and (out / "learning_curves.png").is_file()
    listed = json.loads((out / "runs.json").read_text())
    assert [r["path"] for r in listed] == [str((runs / n).resolve()) for n in ("bn", "gn")]


def test_a_single_run_reports_without_axes(runs, tmp_path):
    assert main(["report", str(runs / "gn"), "--out", str(tmp_path / "one")]) == 0
    text = (tmp_path / "one" / "report.md").read_text()
    assert "1 of 1 cells finished. No axes: the cells share every setting." in text


def test_same_named_run_folders_get_distinct_names(runs, tmp_path):
    shutil.copytree(runs / "gn", tmp_path / "other" / "bn")
    fedsim.report.compare.report([runs / "bn", tmp_path / "other" / "bn"], tmp_path / "cmp")
    rows = json.loads((tmp_path / "cmp" / "report.json").read_text())["rows"]
    assert [r["cell"] for r in rows] == [f"{runs.name}/bn", "other/bn"]


def test_a_sweeps_report_is_rebuilt_in_place(tmp_path):
    sweep = run_sweep("scenarios/quickstart.toml",
                      TINY + ['sweep.model.norm=["bn","ln"]'], out=tmp_path / "s")
    before = json.loads((sweep.report.parent / "report.json").read_text())
    text = sweep.report.read_text()
    for name in ("report.md", "report.json", "accuracy.png"):
        (sweep.path / name).unlink()
    assert main(["report", str(sweep.path)]) == 0
    assert json.loads((sweep.path / "report.json").read_text()) == before
    assert sweep.report.read_text() == text and (sweep.path / "accuracy.png").is_file()


@pytest.mark.parametrize("case,pattern", [
    ("missing", "is not a folder"),
    ("unfinished", "is not a finished run folder; pass folders written by fedsim run"),
    ("interrupted", "finish it with: fedsim run --resume"),
    ("no-out", "comparing run folders needs --out DIR"),
    ("twice", "the same run folder is given twice"),
    ("sweep-and-run", "is a sweep folder: its report is rebuilt in place"),
    ("broken-sweep", "is not a sweep folder written by fedsim sweep"),
])
def test_bad_folders_exit_2_naming_the_fix(runs, tmp_path, capsys, case, pattern):
    empty = tmp_path / "empty"
    empty.mkdir()
    interrupted = tmp_path / "interrupted"
    shutil.copytree(runs / "bn", interrupted)
    (interrupted / "summary.json").unlink()
    (interrupted / "checkpoint.pt").write_bytes(b"")
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "sweep.json").write_text("{}")
    out = ["--out", str(tmp_path / "cmp")]
    args = {
        "missing": [str(tmp_path / "nope"), *out],
        "unfinished": [str(empty), *out],
        "interrupted": [str(interrupted), *out],
        "no-out": [str(runs / "bn"), str(runs / "gn")],
        "twice": [str(runs / "bn"), str(runs / "bn"), *out],
        "sweep-and-run": [str(sweep), str(runs / "bn")],
        "broken-sweep": [str(sweep)],
    }[case]
    assert main(["report", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and pattern in err and "\n" not in err


def _files(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_a_non_empty_out_folder_is_replaced_only_with_overwrite(runs, tmp_path, capsys):
    out = tmp_path / "cmp"
    out.mkdir()
    (out / "report.md").write_text("an earlier report")
    argv = ["report", str(runs / "bn"), str(runs / "gn"), "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err == (f"error: --out {str(out)!r} is not empty; pass --overwrite to replace what "
                   "it holds, or another --out DIR\n")
    assert _files(out) == {"report.md": b"an earlier report"}
    assert main([*argv, "--overwrite"]) == 0
    assert (out / "report.md").read_text().startswith("# Comparison of runs: cmp")
    assert (out / "runs.json").is_file() and not (out / ".fedsim.lock").exists()


@pytest.mark.parametrize("where", ["is", "lies inside", "holds"])
def test_a_report_never_writes_into_a_run_it_compares(runs, tmp_path, capsys, where):
    shutil.copytree(runs, tmp_path / "runs")
    bn, gn = tmp_path / "runs" / "bn", tmp_path / "runs" / "gn"
    out = {"is": bn, "lies inside": bn / "cmp", "holds": tmp_path / "runs"}[where]
    before = {f: _files(f) for f in (bn, gn)}
    assert main(["report", str(bn), str(gn), "--out", str(out), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --out {str(out)!r} {where} the compared run folder "), err
    assert "a report never writes into a run it compares: pass another --out DIR" in err
    assert len(err.splitlines()) == 1
    assert {f: _files(f) for f in (bn, gn)} == before  # learning_curves.png and all
    assert not (bn / "cmp").exists()
