"""A run copies each client's data to the device at most once, however many rounds evaluate
it and whichever parts read it: client training, federated and server-side evaluation
(global test set, per-client splits, personalized evaluation with cold starts, the
flatness sample) and the privacy audits (membership pool, client uploads, leakage,
gradient inversion) share the run's device copies (fedsim.device.DeviceSplits).

Counted with a spy on ``Tensor.to``: every call that takes a client's host tensor (as
``FederatedData`` returns it) to the run's device. On the CPU (``FEDSIM_GPU_TESTS_ON_CPU``)
the device cache is made to keep copies as it does on an accelerator, and a ``.to`` call
on a host tensor counts as the copy it would be on a GPU.
"""

from collections import Counter

import pytest
import torch

import fedsim
from fedsim.data.federated import FederatedData
from fedsim.device import DeviceData

RUN = ["server.rounds=2", "partition.num_clients=8",  # evaluated at rounds 0, 1 and 2
       "server.clients_per_round=4",
       "partition.holdout_clients=0.25", "partition.test_fraction=0.5", "model.width=8",
       "model.norm=bn", "client.epochs=1", "server.strategy=fedbn",
       "server.fraction_evaluate=0.5",  # federated evaluation: cold starts on the clients
       "output.sharpness=true", "output.sharpness_samples=32", "output.sharpness_iters=2",
       "output.sharpness_draws=1"]
AUDIT = ['privacy.audits=["mia","client_mia","leakage","inversion"]', "privacy.mia.every=1",
         "privacy.inversion.steps=2", "privacy.inversion.batch=2"]


def _target_device(args, kwargs) -> torch.device | None:
    """The device a ``Tensor.to`` call moves to, if it names one."""
    for a in (*args, kwargs.get("device")):
        if isinstance(a, torch.device | str):
            return torch.device(a)
        if isinstance(a, torch.Tensor):
            return a.device
    return None


@pytest.mark.parametrize("vectorize", [False, True], ids=["sequential", "vectorized"])
def test_each_clients_data_reaches_the_device_once_per_run(tmp_path, monkeypatch, on_device,
                                                          device, vectorize):
    if device.type == "cpu":  # keep device copies as on an accelerator
        monkeypatch.setattr(DeviceData, "shares_host", lambda self: False)
    tags: dict[int, tuple] = {}  # data_ptr of a host tensor -> (split, client, "x" or "y")
    kept: list[torch.Tensor] = []  # tagged tensors stay alive: their addresses stay theirs

    def tagging(name):
        original = getattr(FederatedData, name)

        def wrapper(self, *args):
            out = original(self, *args)
            for part, t in zip("xy", out):
                tags[t.data_ptr()] = (name, *args, part)
                kept.append(t)
            return out
        monkeypatch.setattr(FederatedData, name, wrapper)

    for name in ("client_train", "client_test", "global_test"):
        tagging(name)
    copies: Counter = Counter()
    to = torch.Tensor.to

    def spy(self, *args, **kwargs):
        target = _target_device(args, kwargs)
        if target is not None and target.type == device.type and self.device.type == "cpu":
            try:
                tag = tags.get(self.data_ptr())
            except RuntimeError:  # no storage: a tensor inside a vmap cohort
                tag = None
            if tag is not None:
                copies[tag] += 1
        return to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", spy)
    result = fedsim.run("scenarios/quickstart.toml",
                        RUN + AUDIT + on_device + [f"engine.vectorize={str(vectorize).lower()}"],
                        out=tmp_path / "run")
    p = result.summary["privacy"]
    assert len(p["client_mia"]["per_client"]) == 4 and "inversion" in p and "leakage" in p
    assert result.summary["final"]["personalized_holdout_accuracy"]["n"] == 2
    assert copies and max(copies.values()) == 1, {k: v for k, v in copies.items() if v > 1}
    # every split the rounds evaluate was copied: the global test set, each holdout
    # client's test split (server-side and personalized evaluation, every round)
    assert copies[("global_test", "x")] == copies[("global_test", "y")] == 1
    assert {k[1] for k in copies if k[0] == "client_test"} == set(range(8))
