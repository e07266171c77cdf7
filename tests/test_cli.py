"""The command line: bad input exits 2 with one ``error:`` line and writes nothing."""

import json
import subprocess
import sys
import time

import pytest

from fedsim.cli import main

TINY = ["--set", "server.rounds=1", "--set", "partition.num_clients=4",
        "--set", "server.clients_per_round=2", "--set", "partition.holdout_clients=0.0"]


@pytest.mark.parametrize(
    ("args", "pattern"),
    [
        (["--set", "model.nrom=bn"], "unknown key 'model.nrom'"),
        (["--set", "partition.alpha=0"], "partition.alpha = 0.0 is out of range"),
        (["--set", "partition.alpha=-2"], "partition.alpha"),
        (["--set", "partition.num_clients=0"], "partition.num_clients"),
        (["--set", "server.clients_per_round=50"], "server.clients_per_round = 50 exceeds"),
        (["--set", "partition.num_clients=5000"], "partition.num_clients"),
        (["--set", "model.norm=batchnorm"], "unknown norm"),
        (["--set", "server.strategy=nope.module:Thing"], "does not import"),
        (["--set", "engine.kind=spark"], "unknown engine"),
        (["--set", "data.name=mnist", "--set", "data.root=/no/such/dir"], "/no/such/dir"),
        (["--set", "model.arch=mlp", "--set", "model.norm=bn", "--set", "client.batch_size=1"],
         "client.batch_size = 1"),
        (["--set", "model.arch=mlp", "--set", "model.width=8", "--set", "model.groups=8"],
         "model.groups = 8 cannot run"),
        (["--set", "privacy.inversion=true"], 'privacy.audits = ["inversion"]'),
        (["--set", "privacy.audit_every=1"],
             "it is privacy.mia.every (and privacy.exposure.every) now"),
        (["--set", 'privacy.audits=["mia","lekage"]'], "did you mean 'leakage'?"),
        (["--set", 'privacy.audits=["inversion"]', "--set", "privacy.inversion.client=99"],
         "privacy.inversion.client = 99 is not a client"),
    ],
)
def test_bad_input_exits_2_with_one_error_line(tmp_path, capsys, args, pattern):
    out = tmp_path / "out"
    code = main(["run", "scenarios/quickstart.toml", "--out", str(out), "--quiet", *args])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    assert pattern in err
    assert not out.exists()  # nothing written


def test_the_example_limits_in_force_are_said_first(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FEDSIM_MAX_ROUNDS", "1")
    monkeypatch.setenv("FEDSIM_MAX_CELLS", "3")
    assert main(["run", str(tmp_path / "missing.toml")]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "note: FEDSIM_MAX_ROUNDS=1: every run stops after at most 1 round(s)",
        "note: FEDSIM_MAX_CELLS=3: a sweep runs only its first 3 cell(s)",
        f"error: scenario file {str(tmp_path / 'missing.toml')!r} does not exist"]


def test_console_script_exit_code_and_stderr(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "fedsim.cli", "run", "scenarios/quickstart.toml",
         "--set", "model.nrom=bn", "--out", str(tmp_path / "o")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: --set model.nrom: unknown key 'model.nrom'")
    assert "(did you mean 'norm'?)" in proc.stderr
    assert proc.stderr.count("\n") == 1


def test_existing_results_folder_is_not_overwritten_silently(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    code = main(["run", "scenarios/quickstart.toml", "--out", str(out), "--quiet", *TINY])
    assert code == 2 and "--overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "x"
    assert main(["run", "scenarios/quickstart.toml", "--out", str(out), "--quiet",
                 "--overwrite", *TINY]) == 0
    assert not (out / "keep.txt").exists() and (out / "summary.json").exists()


def test_partitions_json_and_heat_map(tmp_path, capsys):
    png = tmp_path / "p.png"
    assert main(["partitions", "scenarios/quickstart.toml", "--json", "--png", str(png)]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 20
    assert set(rows[0]) == {"client", "train_counts", "test_counts", "holdout"}
    assert sum(r["holdout"] for r in rows) == 2
    assert sum(sum(r["train_counts"]) + sum(r["test_counts"]) for r in rows) == 1797 - 360
    assert png.stat().st_size > 1000


def test_dp_run_prints_the_privacy_spent(tmp_path, capsys):
    args = ["run", "scenarios/quickstart.toml", "--out", str(tmp_path / "r"), "--quiet", *TINY,
            "--set", "server.dp.kind=fixed", "--set", "server.dp.noise_multiplier=1.5"]
    assert main(args) == 0
    out = capsys.readouterr().out
    spent = json.loads((tmp_path / "r" / "summary.json").read_text())["dp"]["privacy_spent"]
    assert f"DP: ε = {spent['epsilon']:.3g} at δ = 1e-05 after 1 noised rounds" in out
    assert "(fixed_size sampling, rate 0.5, replace_one, σ = 1.5;" in out


@pytest.mark.parametrize("argv", [[], ["run"], ["sweep"], ["report"], ["partitions"]])
def test_help_reads_as_plain_text(argv, capsys):
    """``fedsim --help`` and every command's help are plain text, with examples: no
    reStructuredText markup leaking from docstrings."""
    from fedsim.cli import build_parser

    parser = build_parser()
    with pytest.raises(SystemExit) as exc:
        parser.parse_args([*argv, "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for markup in ("``", ":func:", ":class:", ":mod:", ":data:"):
        assert markup not in text
    if not argv:
        assert "fedsim run scenarios/quickstart.toml" in text and "error:" in text


@pytest.mark.parametrize(("argv", "line"), [
    (["sweep", "s.toml", "--workers", "two"],
     "error: argument --workers: invalid int value: 'two' (see: fedsim sweep --help)"),
    (["run", "s.toml", "--bogus"], "error: unrecognized arguments: --bogus (see: fedsim --help)"),
    (["report"], "error: the following arguments are required: DIR (see: fedsim report --help)"),
    (["partitions"], "error: the following arguments are required: scenario "
                     "(see: fedsim partitions --help)"),
    ([], "error: the following arguments are required: command (see: fedsim --help)"),
])
def test_usage_errors_are_one_error_line_and_exit_2(capsys, argv, line):
    with pytest.raises(SystemExit) as done:
        main(argv)
    assert done.value.code == 2
    assert capsys.readouterr().err == line + "\n"


@pytest.mark.parametrize(("png", "pattern"), [
    ("folder", "is a folder; give a file name, e.g. --png "),
    ("map.xyz", "matplotlib cannot write .xyz files; use one of "),
])
def test_a_heat_map_path_matplotlib_cannot_write_is_one_error_line(tmp_path, capsys, png,
                                                                  pattern):
    (tmp_path / "folder").mkdir()
    code = main(["partitions", "scenarios/quickstart.toml", *TINY, "--png",
                 str(tmp_path / png)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: --png ") and pattern in err, err
    assert len(err.splitlines()) == 1 and sorted(p.name for p in tmp_path.iterdir()) == [
        "folder"]


def test_a_heat_map_named_without_a_suffix_is_written_and_said_as_png(tmp_path, capsys):
    code = main(["partitions", "scenarios/quickstart.toml", *TINY, "--png",
                 str(tmp_path / "map")])
    assert code == 0 and (tmp_path / "map.png").is_file()
    assert capsys.readouterr().err.strip().endswith(f"heat map → {tmp_path / 'map.png'}")


CLAIMED = """[partition]
num_clients = 4
holdout_clients = 0.0
[model]
width = 8
[server]
rounds = 1
clients_per_round = 2
[[claims]]
name = "GN beats BN"
metric = "{metric}"
a = {{ "model.norm" = "gn" }}
b = {{ "model.norm" = "bn" }}
"""


def test_run_on_a_file_with_claims_says_once_they_belong_to_a_sweep(tmp_path, capsys):
    path = tmp_path / "c.toml"
    path.write_text(CLAIMED.format(metric="final.global_test_accuracy"))
    assert main(["run", str(path), "--out", str(tmp_path / "r"), "--quiet"]) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert notes == ["note: the 1 [[claims]] of this file are tested by `fedsim sweep` over its "
                     "[sweep] grid; fedsim run trains the base scenario and tests none"]


def test_run_checks_the_metrics_of_claims_all_the_same(tmp_path, capsys):
    path = tmp_path / "c.toml"
    path.write_text(CLAIMED.format(metric="final.global_test_acc"))
    assert main(["run", str(path), "--out", str(tmp_path / "r"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: claims[0].metric 'final.global_test_acc' is not a number "
                          "summary.json holds") and err.count("\n") == 1
    assert not (tmp_path / "r").exists()


def test_a_newline_in_a_key_cannot_forge_a_second_error_line(tmp_path, capsys):
    path = tmp_path / "s.toml"
    path.write_text('[sweep]\n"seed\\nerror: all good" = [0, 1]\n')
    assert main(["sweep", str(path), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: sweep axis 'seed\\nerror: all good'")
    code = main(["run", "scenarios/quickstart.toml", "--quiet", "--set",
                 "name=\x1b[2J\rok\nerror: forged", "--set", "model.nrom=x"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "\x1b" not in err


def test_a_sweep_of_more_than_a_thousand_cells_asks_for_yes(tmp_path, capsys):
    path = tmp_path / "big.toml"
    path.write_text('[sweep]\nmodel.norm = ["bn", "gn"]\nseed = [' +
                    ", ".join(str(s) for s in range(501)) + "]\n")
    t0 = time.monotonic()
    assert main(["sweep", str(path), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert time.monotonic() - t0 < 10  # refused before any of the 1,002 cells is built
    err = capsys.readouterr().err
    assert err == ("error: the sweep has 1,002 cells (model.norm (2) × seed (501)), more than "
                   "1,000: checking them takes minutes and running them may take days; pass "
                   "--yes to run it anyway, or shrink the grid\n")
    assert not (tmp_path / "o").exists()


def test_a_run_named_with_dollars_draws_its_learning_curves(tmp_path, capsys):
    """The run's name is the figure's title: "$\\frac{$" is no mathtext there (unescaped,
    matplotlib fails to parse it and the run would end in a traceback after training)."""
    out = tmp_path / "r"
    assert main(["run", "scenarios/quickstart.toml", "--out", str(out), "--quiet", *TINY,
                 "--set", 'name="cost $\\\\frac{$ \\u001b[2J"']) == 0
    assert (out / "learning_curves.png").is_file()
    printed = capsys.readouterr().out
    assert printed.startswith("cost $\\frac{$ \\x1b[2J: global test accuracy") and \
        "\x1b" not in printed
