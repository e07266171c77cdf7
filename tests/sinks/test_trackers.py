"""TensorBoard, MLflow and W&B, each read back with its own library: TensorBoard's event
reader, ``mlflow.search_runs`` on the local store, ``wandb leet inspect`` on the offline run
file. One tiny run writes all three; a tiny sweep shows the parent run and the group."""

import json
import os
import subprocess
from pathlib import Path

import mlflow
import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator as ea
from tensorboard.plugins.hparams import plugin_data_pb2

import fedsim
from fedsim.sinks.flat import flatten, scalars
from fedsim.sweep import run_sweep

pytestmark = pytest.mark.slow  # W&B starts its service process per run: seconds each

TINY = ["server.rounds=2", "partition.num_clients=4", "server.clients_per_round=2",
        "partition.holdout_clients=0.0", "model.width=8",
        'output.sinks=["tensorboard", "mlflow", "wandb"]']
AUDIT = ['privacy.audits=["mia"]', "privacy.mia.every=1"]  # per-round privacy, a ROC figure


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Nothing here may reach a network: no tracking server, W&B's default (offline) mode."""
    for var in ("MLFLOW_TRACKING_URI", "WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    yield
    # fedsim and these tests name their store; one left in the environment would send every
    # later run with the mlflow sink in this process (and its subprocesses) to that store
    assert "MLFLOW_TRACKING_URI" not in os.environ, os.environ["MLFLOW_TRACKING_URI"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return fedsim.run("scenarios/quickstart.toml", TINY + AUDIT,
                      out=tmp_path_factory.mktemp("trackers") / "run")


def records(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "rounds.jsonl").read_text().splitlines()]


def numbers(record: dict) -> dict[str, float]:
    return {k: v for k, v in scalars(flatten(record)).items() if k != "round"}


def search_runs(uri: str, experiment: str):
    """The experiment's runs in the store at ``uri``, read with a client of that store: the
    process-wide tracking URI stays unset (``mlflow.set_tracking_uri`` also exports it to the
    environment, where later tests' subprocesses would find it)."""
    client = mlflow.MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no experiment {experiment!r} in {uri}"
    return client.search_runs([found.experiment_id])


def wandb_records(run_file: Path) -> list[dict]:
    out = subprocess.run(["wandb", "leet", "inspect", "--json", str(run_file)],
                         capture_output=True, text=True, check=True, timeout=120).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def test_tensorboard_holds_every_number_of_every_round_the_figures_scenario_and_hparams(run):
    acc = ea.EventAccumulator(str(run.path / "tb"), size_guidance={
        ea.SCALARS: 0, ea.IMAGES: 0, ea.TENSORS: 0})
    acc.Reload()
    recs = records(run.path)
    for rec in recs:
        for key, value in numbers(rec).items():
            events = {e.step: e.value for e in acc.Scalars(key.replace(".", "/"))}
            assert events[rec["round"]] == np.float32(value), key  # TensorBoard keeps float32
    assert {e.step for e in acc.Scalars("global_test_accuracy")} == {0, 1, 2}
    assert "client_accuracy/p10" in acc.Tags()["scalars"]
    image = acc.Images("figures/learning_curves")[0]
    assert image.step == 2 and image.width > 100 and image.encoded_image_string[:4] == b"\x89PNG"
    assert "figures/privacy_roc" in acc.Tags()["images"]
    for entry in run.summary["privacy"]["mia_by_round"]:  # rounds 1 and 2
        auc = {e.step: e.value for e in acc.Scalars("privacy/mia/loss/auc")}[entry["round"]]
        assert auc == np.float32(entry["loss"]["auc"])
    text = acc.Tensors("scenario/text_summary")[0].tensor_proto.string_val[0].decode()
    assert 'norm = "gn"' in text and "rounds = 2" in text
    start = plugin_data_pb2.HParamsPluginData.FromString(
        acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["model.norm"].string_value == "gn"
    assert start.hparams["server.rounds"].number_value == 2
    final = {e.step: e.value for e in acc.Scalars("summary/final/global_test_accuracy")}
    assert final == {2: np.float32(run.summary["final"]["global_test_accuracy"])}


def test_mlflow_holds_one_run_with_the_scenario_metrics_per_round_and_the_files(run):
    uri = f"sqlite:///{run.path.resolve() / 'mlflow.db'}"
    runs = search_runs(uri, "quickstart")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    found = runs[0]
    flat = flatten(fedsim.load_scenario(run.path / "scenario.toml").to_dict())
    assert found.data.params["model.norm"] == "gn" and found.data.params["server.rounds"] == "2"
    assert set(found.data.params) == set(flat)
    client = mlflow.MlflowClient(uri)
    recs = records(run.path)
    for key in numbers(recs[1]):
        history = {m.step: m.value for m in client.get_metric_history(found.info.run_id, key)}
        assert history == {r["round"]: numbers(r)[key] for r in recs if key in numbers(r)}, key
    assert found.data.metrics["summary.final.global_test_accuracy"] == \
        run.summary["final"]["global_test_accuracy"]
    files = {a.path for a in client.list_artifacts(found.info.run_id)}
    assert {"summary.json", "rounds.jsonl", "rounds.csv", "model.pt", "scenario.toml",
            "learning_curves.png", "privacy_roc.png"} <= files
    assert not any(f.startswith("checkpoint") for f in files) and "trackers.json" not in files


def test_wandb_writes_an_offline_run_with_config_history_summary_and_figures(run):
    files = list((run.path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1  # offline by default: nothing was sent anywhere
    recs = wandb_records(files[0])
    first = next(r for r in recs if r["type"] == "run")["run"]
    assert first["project"] == "fedsim" and first["display_name"] == "quickstart"
    config = first["config"]["update"]
    assert config["model"]["norm"] == "gn" and config["server"]["rounds"] == 2
    history = {r["history"]["step"].get("num", 0): r["history"]["item"]
               for r in recs if r["type"] == "history"}
    for rec in records(run.path):
        expected = {k.replace(".", "/"): v for k, v in numbers(rec).items()}
        assert {k: history[rec["round"]][k] for k in expected} == expected
    assert history[2]["figures/learning_curves._type"] == "image-file"
    image = files[0].parent / "files" / history[2]["figures/learning_curves.path"]
    assert image.read_bytes()[:4] == b"\x89PNG"
    summary = {}
    for r in recs:
        if r["type"] == "summary":
            summary.update(r["summary"]["update"])
    assert summary["final.global_test_accuracy"] == run.summary["final"]["global_test_accuracy"]
    assert next(r for r in recs if r["type"] == "exit")["exit"].get("exit_code", 0) == 0


def test_a_sweep_is_one_mlflow_parent_with_its_cells_and_one_wandb_group(tmp_path):
    out = tmp_path / "sweep"
    run_sweep("scenarios/quickstart.toml", TINY + ['sweep.model.norm=["gn","ln"]'], out=out,
              workers=2)  # cells in worker processes, one store
    runs = search_runs(f"sqlite:///{out.resolve() / 'mlflow.db'}", "quickstart")
    parent = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    assert sorted(r.info.run_name for r in children) == ["norm-gn", "norm-ln"]
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parent[0].info.run_id}
    assert json.loads(parent[0].data.params["sweep.model.norm"]) == ["gn", "ln"]
    files = {a.path for a in mlflow.MlflowClient(
        f"sqlite:///{out.resolve() / 'mlflow.db'}").list_artifacts(parent[0].info.run_id)}
    assert {"report.md", "cells.csv"} <= files
    for cell in ("norm-gn", "norm-ln"):
        (run_file,) = (out / cell / "wandb").glob("offline-run-*/run-*.wandb")
        first = next(r for r in wandb_records(run_file) if r["type"] == "run")["run"]
        assert first["run_group"] == "quickstart" and first["display_name"] == cell
        assert (out / cell / "tb").is_dir()


def test_wandb_neither_uploads_nor_probes_the_machine(run):
    """W&B's own logs of the run: no API address, no cloud-metadata probe (its system
    monitor, switched off, would ask 169.254.169.254)."""
    logs = list((run.path / "wandb").glob("offline-run-*/logs/*.log"))
    assert len(logs) >= 2
    for log in logs:
        text = log.read_text()
        assert "api.wandb.ai" not in text and "169.254.169.254" not in text, log.name
