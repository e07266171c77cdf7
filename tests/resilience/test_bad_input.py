"""Bad input never gives a traceback: generated scenario files either run or exit 2 with one
``error:`` line; results folders are never overwritten silently, not even by ``--resume``;
broken dataset files are named with the format expected."""

import contextlib
import dataclasses
import gzip
import io
import os
import struct
import tempfile
import typing
from pathlib import Path

import tomli_w
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import fedsim
from fedsim.cli import main
from fedsim.config import Scenario

# Keys the generated files may set, by section (the top level is "").
SECTIONS = {
    f.name: [g.name for g in dataclasses.fields(typing.get_type_hints(Scenario)[f.name])]
    for f in dataclasses.fields(Scenario)
    if dataclasses.is_dataclass(typing.get_type_hints(Scenario)[f.name])
}
TOP = [f.name for f in dataclasses.fields(Scenario) if f.name not in SECTIONS]
NAMES = ["digits", "synthetic", "mnist", "iid", "dirichlet", "shards", "quantity", "feature",
         "cnn", "resnet", "mlp", "bn", "gn", "in", "ln", "none", "hybrid", "fedavg", "fedprox",
         "fedadam", "krum", "fedmedian", "inprocess", "cpu", "auto", "rotate", "noise", "retry",
         "stop"]
# A run that validates is kept tiny: these overrides come after the file.
FORCE = ["server.rounds=1", "client.epochs=1", "engine.kind=inprocess",
         "partition.num_clients=4", "server.clients_per_round=2", "data.samples_per_client=16",
         "data.test_samples=40", "data.image_size=8", "model.width=8", "output.eval_clients=4"]

atoms = st.one_of(
    st.integers(-3, 40),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(-2, 2),
    st.booleans(),
    st.text(max_size=8),
    st.sampled_from(NAMES),
)
values = st.one_of(atoms, atoms, st.lists(atoms, max_size=3),
                   st.dictionaries(st.text(min_size=1, max_size=5), atoms, max_size=2))


def plausible(default):
    """Values of the default's own type, mostly near the valid range (to get past parsing)."""
    if isinstance(default, bool):
        return st.booleans()
    if isinstance(default, int):
        return st.integers(-2, 12)
    if isinstance(default, float):
        return st.one_of(st.floats(-0.5, 2), st.sampled_from([0.0, 1.0, 1e-9, 1e9]))
    if isinstance(default, str):
        return st.sampled_from(NAMES)
    if isinstance(default, tuple):
        return st.lists(st.sampled_from(NAMES), max_size=3)
    return values


DEFAULTS = {name: dataclasses.asdict(getattr(Scenario(), name)) for name in SECTIONS}


@st.composite
def scenario_texts(draw):
    doc = {}
    if draw(st.integers(0, 5)) == 0:  # rarely: top-level keys, known or not
        for key in draw(st.lists(st.one_of(st.sampled_from(TOP),
                                           st.text(min_size=1, max_size=6)), max_size=2)):
            doc[key] = draw(values)
    odd = st.text(min_size=1, max_size=6)
    for section in draw(st.lists(st.one_of(*[st.sampled_from(sorted(SECTIONS))] * 6, odd),
                                 max_size=4)):
        table = {}
        known = DEFAULTS.get(section, {"x": 0})
        for _ in range(draw(st.integers(0, 4))):
            if draw(st.integers(0, 9)) == 0:
                table[draw(st.text(min_size=1, max_size=8))] = draw(values)
            else:
                key = draw(st.sampled_from(sorted(known)))
                table[key] = draw(st.one_of(plausible(known[key]), plausible(known[key]),
                                            values))
        doc[section] = table
    try:
        text = tomli_w.dumps(doc)
    except (TypeError, ValueError):
        assume(False)
    mutation = draw(st.sampled_from(["none", "none", "none", "truncate", "garbage"]))
    if mutation == "truncate":
        text = text[: draw(st.integers(0, len(text)))]
    elif mutation == "garbage":
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.text(min_size=1, max_size=6)) + text[at:]
    return text


def run_cli(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, err.getvalue()


def assert_clean_error(code, err):
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert "Traceback" not in err
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, err


@settings(max_examples=50, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(scenario_texts())
def test_generated_scenario_files_run_or_exit_2_with_one_error_line(text):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "gen.toml"
        path.write_text(text, encoding="utf-8")
        argv = ["run", str(path), "--out", str(Path(tmp) / "out"), "--quiet"]
        code, err = run_cli(argv + [a for s in FORCE for a in ("--set", s)])
        assert "Traceback" not in err
        if code != 0:
            assert_clean_error(code, err)
            assert not (Path(tmp) / "out").exists() or (Path(tmp) / "out" / "rounds.jsonl"
                                                          ).exists()


def test_non_utf8_and_binary_scenario_files(tmp_path):
    for i, raw in enumerate([b"\xff\xfe\x00garbage", b"[model]\nnorm = '\xe9'\n", b"\x00" * 10]):
        path = tmp_path / f"bad{i}.toml"
        path.write_bytes(raw)
        assert_clean_error(*run_cli(["run", str(path), "--out", str(tmp_path / "o"), "--quiet"]))
        assert not (tmp_path / "o").exists()


def test_bad_strategy_params_and_a_raising_strategy_give_one_error_line(tmp_path):
    base = ["run", "scenarios/quickstart.toml", "--quiet", "--set", "server.rounds=1",
            "--set", "partition.num_clients=4", "--set", "server.clients_per_round=2"]
    code, err = run_cli(base + ["--out", str(tmp_path / "a"), "--set", "server.strategy=fedadam",
                                "--set", 'server.params.eta="x"'])
    assert_clean_error(code, err)
    assert "server.params.eta = 'x' must be a finite number" in err
    assert not (tmp_path / "a").exists()
    out = tmp_path / "b"
    code, err = run_cli(base + ["--out", str(out), "--set",
                                "server.strategy=tests/resilience/stateful_strategy.py:BrokenFedAvg"])
    assert_clean_error(code, err)
    assert "round 1: BrokenFedAvg.aggregate_train raised ZeroDivisionError: bug in my" in err
    assert (out / "rounds.jsonl").exists() and (out / "summary.json").exists()


# --------------------------------------------------------------------------- folders

TINY = ["server.rounds=2", "partition.num_clients=4", "server.clients_per_round=2",
        "partition.holdout_clients=0.0"]


def snapshot(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_resume_never_overwrites_or_mixes_folders_silently(tmp_path):
    done = fedsim.run("scenarios/quickstart.toml", TINY, out=tmp_path / "done").path
    before = snapshot(done)
    cases = [
        (["--resume", str(done)], "already finished"),
        (["--resume", str(done), "--overwrite"], "--overwrite"),
        (["--resume", str(done), "--out", str(tmp_path / "x")], "--out"),
        (["scenarios/quickstart.toml", "--resume", str(done)], "FILE"),
        (["--resume", str(done), "--set", "server.rounds=5"], "--set"),
        (["--resume", str(tmp_path / "missing")], "not a fedsim results folder"),
    ]
    for args, pattern in cases:
        code, err = run_cli(["run", *args, "--quiet"])
        assert_clean_error(code, err)
        assert pattern in err, (args, err)
    assert snapshot(done) == before
    assert not (tmp_path / "x").exists()
    # a plain run into the finished folder is refused too (--overwrite is explicit)
    code, err = run_cli(["run", "scenarios/quickstart.toml", "--out", str(done), "--quiet"])
    assert_clean_error(code, err)
    assert "--overwrite" in err
    assert snapshot(done) == before


def test_resume_of_an_edited_scenario_or_a_folder_without_checkpoint(tmp_path):
    run = fedsim.run("scenarios/quickstart.toml", TINY, out=tmp_path / "a").path
    (run / "summary.json").unlink()
    toml = run / "scenario.toml"
    toml.write_text(toml.read_text().replace("seed = 0", "seed = 5"))
    code, err = run_cli(["run", "--resume", str(run), "--quiet"])
    assert_clean_error(code, err)
    assert "another scenario" in err and "checkpoint.pt" in err
    for name in ("checkpoint.pt", "checkpoint.prev.pt"):
        (run / name).unlink()
    code, err = run_cli(["run", "--resume", str(run), "--quiet"])
    assert_clean_error(code, err)
    assert "no checkpoint to resume from" in err


def test_corrupted_checkpoint_on_resume_names_the_file(tmp_path):
    run = fedsim.run("scenarios/quickstart.toml", TINY, out=tmp_path / "a").path
    (run / "summary.json").unlink()
    for name in ("checkpoint.pt", "checkpoint.prev.pt"):
        raw = (run / name).read_bytes()
        (run / name).write_bytes(raw[: len(raw) - 200])
    code, err = run_cli(["run", "--resume", str(run), "--quiet"])
    assert_clean_error(code, err)
    assert str(run / "checkpoint.pt") in err and "truncated or corrupted" in err


# --------------------------------------------------------------------------- datasets


def idx(kind: int, dims: list[int], payload: bytes) -> bytes:
    return struct.pack(">HBB", 0, kind, len(dims)) + struct.pack(f">{len(dims)}I", *dims) + \
        payload


def test_broken_dataset_files_name_the_file_and_the_format(tmp_path):
    root = tmp_path / "mnist"
    root.mkdir()
    good_images = idx(0x08, [3, 28, 28], bytes(3 * 28 * 28))
    (root / "train-images-idx3-ubyte").write_bytes(good_images[: len(good_images) // 2])
    (root / "train-labels-idx1-ubyte").write_bytes(idx(0x08, [3], bytes(3)))
    (root / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(good_images))
    (root / "t10k-labels-idx1-ubyte").write_bytes(b"\x00\x00\x09\x01" + bytes(8))
    base = ["run", "scenarios/quickstart.toml", "--out", str(tmp_path / "o"), "--quiet",
            "--set", "data.name=mnist", "--set", f"data.root={root}"]
    code, err = run_cli(base)
    assert_clean_error(code, err)
    assert "train-images-idx3-ubyte" in err and "IDX" in err and "truncated" in err
    good = idx(0x08, [3, 28, 28], bytes(3 * 28 * 28))
    (root / "train-images-idx3-ubyte").write_bytes(good)
    code, err = run_cli(base)
    assert_clean_error(code, err)
    assert "t10k-labels-idx1-ubyte" in err and "magic number" in err
    os.remove(root / "t10k-labels-idx1-ubyte")
    code, err = run_cli(base)
    assert_clean_error(code, err)
    assert "t10k-labels-idx1-ubyte" in err
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------- population sizes

def test_bad_population_sizes_are_refused_before_any_work_naming_the_keys(tmp_path):
    """0 clients, more clients per round than participating clients, and more clients than a
    dataset can split: one ``error:`` line naming the keys, and no results folder."""
    cases = [
        (["partition.num_clients=0"],
         "error: partition.num_clients = 0 is out of range; it must be >= 1"),
        (["server.clients_per_round=0"],
         "error: server.clients_per_round = 0 is out of range; it must be >= 1"),
        (["partition.num_clients=50", "server.clients_per_round=60",
          "partition.holdout_clients=0.1"],
         "error: server.clients_per_round = 60 exceeds the 45 participating clients "
         "(partition.num_clients = 50 minus 5 held out by partition.holdout_clients = 0.1)"),
        (["partition.num_clients=1000000", "server.clients_per_round=1000000",
          "partition.holdout_clients=0.01"],
         "error: server.clients_per_round = 1000000 exceeds the 990000 participating clients"),
        (["partition.num_clients=2", "partition.holdout_clients=0.75",
          "server.clients_per_round=1"],
         "error: partition.holdout_clients = 0.75 is out of range; at least one client must "
         "train"),
        (["data.name=digits", "partition.num_clients=1000000", "server.clients_per_round=10"],
         "error: partition.num_clients = 1000000 but the digits training split has only 1437 "
         "samples; every client needs at least 2 (one to train, one to test): set "
         "partition.num_clients <= 718"),
    ]
    for i, (sets, message) in enumerate(cases):
        out = tmp_path / f"o{i}"
        argv = ["run", "scenarios/quickstart.toml", "--quiet", "--out", str(out)]
        code, err = run_cli(argv + [a for s in sets for a in ("--set", s)])
        assert_clean_error(code, err)
        assert message in err, (sets, err)
        assert not out.exists(), sets
