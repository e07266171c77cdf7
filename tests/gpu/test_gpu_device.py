"""A run on the GPU really trains there: every forward pass (clients, cohorts, server
evaluation) gets its input on the device, and the device's memory is used."""

import pytest
import torch
from torch.nn.modules.module import register_module_forward_pre_hook

import fedsim
from fedsim.device import resolve_device

RUN = ["server.rounds=2", "partition.num_clients=6", "server.clients_per_round=3",
       "partition.holdout_clients=0.0", "model.width=8", "client.epochs=1",
       "server.fraction_evaluate=0.5"]  # federated evaluation on the clients too


def test_auto_picks_the_gpu(device):
    if device.type == "cpu":
        pytest.skip("a dry run on the CPU: there is no GPU for 'auto' to pick")
    assert resolve_device("auto").type == "cuda"


@pytest.mark.parametrize("vectorize", [False, True], ids=["sequential", "vectorized"])
def test_every_forward_pass_of_a_run_is_on_the_device(tmp_path, on_device, device, vectorize):
    seen: set[str] = set()

    def record(module, args):
        seen.update(a.device.type for a in args if isinstance(a, torch.Tensor))

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    handle = register_module_forward_pre_hook(record)
    try:
        result = fedsim.run("scenarios/quickstart.toml",
                            RUN + on_device + [f"engine.vectorize={str(vectorize).lower()}"],
                            out=tmp_path / "run")
    finally:
        handle.remove()
    assert result.summary["timing"]["client_updates"] == 6
    assert seen == {device.type}
    if device.type == "cuda":
        assert torch.cuda.max_memory_allocated() > 0
