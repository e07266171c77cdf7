"""Tidy tables: flattening rules on hand-made records, and a real run's rounds.csv /
rounds.parquet equal to its rounds.jsonl, value for value."""

import csv
import io
import json
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import fedsim
from fedsim.cli import main
from fedsim.sinks.flat import flatten, scalars
from fedsim.sinks.tables import arrow_table, csv_text

TINY = ["server.rounds=2", "partition.num_clients=6", "server.clients_per_round=3",
        "partition.holdout_clients=0.2", "model.width=8", "model.norm=hybrid",
        'output.sinks=["parquet"]']

RECORD = {
    "round": 3, "clients": [4, 1], "failures": [{"client": 2, "reason": "dropout"}],
    "client_accuracy": {"mean": 0.5, "p10": 0.125, "n": 4},
    "communication": {"uploaded": {"total": 100, "max": 60}},
    "generalization": {"holdout_accuracy": None, "participation_gap": -0.25},
    "client_dp": {"epsilon": {"4": 1.5, "1": 2.0}, "noise_multiplier": {"min": 1.0}},
    "hybrid_alpha": {"block.0.norm": 0.75}, "train_loss": float("nan"), "stopped": None,
    "flag": True,
}


def test_flatten_dots_nested_records_and_keeps_lists_and_per_client_maps_as_json():
    assert flatten(RECORD) == {
        "round": 3, "clients": "[4, 1]",
        "failures": '[{"client": 2, "reason": "dropout"}]',
        "client_accuracy.mean": 0.5, "client_accuracy.p10": 0.125, "client_accuracy.n": 4,
        "communication.uploaded.total": 100, "communication.uploaded.max": 60,
        "generalization.participation_gap": -0.25,
        "client_dp.epsilon": '{"1": 2.0, "4": 1.5}', "client_dp.noise_multiplier.min": 1.0,
        "hybrid_alpha.block.0.norm": 0.75, "flag": True,
    }
    assert scalars(flatten(RECORD))["client_accuracy.n"] == 4.0
    assert "flag" not in scalars(flatten(RECORD)) and "clients" not in scalars(flatten(RECORD))


def test_csv_cells_read_back_to_the_same_floats_and_missing_values_are_empty():
    rows = [{"round": 0, "acc": 0.1}, {"round": 1, "acc": 1 / 3, "loss": 2.5e-17, "ok": False}]
    text = csv_text(rows, first=("round",))
    assert text.splitlines() == ["round,acc,loss,ok", "0,0.1,,", f"1,{1 / 3!r},2.5e-17,false"]
    back = list(csv.DictReader(io.StringIO(text)))
    assert float(back[1]["acc"]) == 1 / 3 and back[0]["loss"] == ""
    assert csv_text([], first=("name", "verdict")) == "name,verdict\n"


def test_parquet_columns_are_typed_one_type_per_column():
    rows = [{"n": 1, "x": 1, "ok": True, "s": "a"}, {"n": 2, "x": 0.5, "s": "[1]"}]
    table = arrow_table(rows)
    assert table.schema.field("n").type == pa.int64()
    assert table.schema.field("x").type == pa.float64()  # ints and floats mixed
    assert table.schema.field("ok").type == pa.bool_()
    assert table.schema.field("s").type == pa.string()
    assert table.column("ok").to_pylist() == [True, None]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return fedsim.run("scenarios/quickstart.toml", TINY,
                      out=tmp_path_factory.mktemp("tables") / "run").path


def _records(folder):
    return [flatten(json.loads(line))
            for line in (folder / "rounds.jsonl").read_text().splitlines()]


def test_rounds_csv_and_parquet_equal_the_json_records(run):
    records = _records(run)
    assert [r["round"] for r in records] == [0, 1, 2]
    with open(run / "rounds.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0])[0] == "round"
    assert set(rows[0]) == set().union(*records)  # one column per flattened field
    for rec, row in zip(records, rows):
        for col, cell in row.items():
            value = rec.get(col)
            if value is None:
                assert cell == "", col
            elif isinstance(value, bool):
                assert cell == str(value).lower(), col
            elif isinstance(value, (int, float)):
                assert float(cell) == value, col  # exact: repr round-trips
            else:
                assert cell == value, col
    table = pq.read_table(run / "rounds.parquet").to_pylist()
    for rec, row in zip(records, table):
        assert {k: v for k, v in row.items() if v is not None} == rec
    assert any(k.startswith("hybrid_alpha.") for k in records[1])  # per layer, a column each
    assert json.loads(rows[1]["clients"]) == json.loads((run / "rounds.jsonl").read_text()
                                                       .splitlines()[1])["clients"]


def test_fedsim_table_rebuilds_the_run_table(run, tmp_path, capsys):
    before = (run / "rounds.csv").read_text()
    (run / "rounds.csv").unlink()
    assert main(["table", str(run)]) == 0
    assert (run / "rounds.csv").read_text() == before
    assert capsys.readouterr().out.strip() == f"table → {run / 'rounds.csv'}"
    out = tmp_path / "r.parquet"
    assert main(["table", str(run), "--format", "parquet", "--out", str(out)]) == 0
    assert pq.read_table(out).to_pylist() == pq.read_table(run / "rounds.parquet").to_pylist()


def test_fedsim_table_refuses_a_folder_that_is_no_run(tmp_path, capsys):
    assert main(["table", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "neither a run folder" in err[0]


def test_nan_is_an_empty_cell():
    assert csv_text([flatten({"round": 1, "x": math.inf})]) == "round\n1\n"


def hand_made_sweep(root):
    """A sweep folder written by hand: three cells (finished, unfinished, damaged), each with
    the scenario it ran."""
    cells = [("norm-bn", {"model.norm": "bn", "client.batch_size": 8}),
             ("norm-gn", {"model.norm": "gn", "client.batch_size": 8}),
             ("norm-ln", {"model.norm": "ln", "client.batch_size": 8})]
    root.mkdir()
    (root / "sweep.json").write_text(json.dumps({
        "scenario": "s", "axes": {"model.norm": ["bn", "gn", "ln"], "client.batch_size": [8]},
        "cells": [{"name": n, "params": p} for n, p in cells]}))
    for name, _ in cells:
        (root / name).mkdir()
        (root / name / "scenario.toml").write_text(f'name = "s/{name}"\n')
        (root / name / "rounds.jsonl").write_text(
            '{"round": 0, "global_test_accuracy": 0.1}\n'
            '{"round": 1, "global_test_accuracy": 0.5, "clients": [1, 2]}\n')
    (root / "norm-bn" / "summary.json").write_text("{}")
    (root / "norm-ln" / "summary.json").write_text("{}")
    (root / "norm-ln" / "rounds.jsonl").write_text('{"round": 0}\nnot json\n{"round": 1}\n')
    (root / "report.json").write_text(json.dumps({"claims": [{
        "name": "bn > gn", "verdict": "inconclusive", "diff_mean": 0.25, "n_pairs": 1,
        "a": {"model.norm": "bn"}, "b": {"model.norm": "gn"}, "settings": [], "pairs": [
            {"a": "norm-bn", "b": "norm-gn", "diff": 0.25}]}]}))


def test_fedsim_table_of_a_sweep_skips_unreadable_cells_with_one_note_each(tmp_path, capsys):
    root = tmp_path / "sweep"
    hand_made_sweep(root)
    assert main(["table", str(root)]) == 0
    notes = capsys.readouterr().err.strip().splitlines()
    assert notes == ["note: cell norm-gn skipped: not finished (no summary.json)",
                     "note: cell norm-ln skipped: damaged: rounds.jsonl: line 2 not JSON "
                     "(Expecting value: line 1 column 1 (char 0))"]
    assert (root / "cells.csv").read_text().splitlines() == [
        "cell,model.norm,client.batch_size,round,clients,global_test_accuracy",
        "norm-bn,bn,8,0,,0.1",
        'norm-bn,bn,8,1,"[1, 2]",0.5']
    claims = list(csv.DictReader(io.StringIO((root / "claims.csv").read_text())))
    assert claims[0]["name"] == "bn > gn" and claims[0]["a.model.norm"] == "bn"
    assert list(claims[0])[:3] == ["name", "verdict", "diff_mean"]
    assert json.loads(claims[0]["pairs"]) == [{"a": "norm-bn", "b": "norm-gn", "diff": 0.25}]
    out = tmp_path / "t" / "cells.parquet"
    out.parent.mkdir()
    assert main(["table", str(root), "--format", "parquet", "--out", str(out)]) == 0
    assert pq.read_table(out).column("round").to_pylist() == [0, 1]
    assert pq.read_table(tmp_path / "t" / "cells_claims.parquet").num_rows == 1
