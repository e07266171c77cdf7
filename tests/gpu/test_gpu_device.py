"""A run on the GPU really trains there: every forward pass of its rounds (clients, cohorts,
server and federated evaluation) gets its input on the device, and the device's memory is
used."""

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
    """Recorded from the first round record on (round 0: the initial evaluation), so the
    checks before training, which probe the model on the CPU, are left out."""
    recorded: list[int] = []  # rounds recorded so far
    seen: set[str] = set()

    def record(module, args):
        if recorded:
            seen.update(a.device.type for a in args if isinstance(a, torch.Tensor))

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    handle = register_module_forward_pre_hook(record)
    try:
        result = fedsim.run("scenarios/quickstart.toml",
                            RUN + on_device + [f"engine.vectorize={str(vectorize).lower()}"],
                            out=tmp_path / "run", progress=lambda r: recorded.append(r["round"]))
    finally:
        handle.remove()
    assert recorded == [0, 1, 2] and result.summary["timing"]["client_updates"] == 6
    assert seen == {device.type}
    if device.type == "cuda":
        assert torch.cuda.max_memory_allocated() > 0
