"""The reference a recalibrated run is checked against (tests/server, tests/gpu): a
centralized pass over the union of the last round's clients' training data."""

import json

import torch

from fedsim.config import load_scenario
from fedsim.context import RunContext
from fedsim.models.bn_statistics import bn_layers


def rounds(path):
    return [json.loads(line) for line in (path / "rounds.jsonl").read_text().splitlines()]


def centralized_reference(path, overrides):
    """The run's final global model in float64 with every BN layer's statistics set by a
    pass over the union of the last round's clients' training data (torch's BatchNorm, one
    batch, momentum 1, layer by layer in call order), and the run's own statistics."""
    run = RunContext.build(load_scenario("scenarios/quickstart.toml", overrides))
    state = torch.load(path / "model.pt", weights_only=True)
    model = run.new_model()
    model.load_state_dict(state)
    model = model.double().eval()
    x = torch.cat([run.data.client_train(c)[0] for c in rounds(path)[-1]["clients"]]).double()
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, _ in bn_layers(model, (1, 8, 8)):
            modules[name].train()
            modules[name].momentum = 1.0
            model(x)
            modules[name].eval()
    return model.state_dict(), state


def assert_recalibrated(path, overrides):
    """float32 clients against the float64 reference: a width-8 CNN's activations are sums of
    at most 72 float32 products, a relative rounding of a few float32 eps (1.2e-7) each; the
    statistics come out within ~1e-7 relative on x86 CPUs, and the bound is 1e-5 (~80 eps,
    room for other kernels' summation orders). The mean's bound scales with the std, as a
    relative bound on a mean near zero would not."""
    ref, state = centralized_reference(path, overrides)
    names = [k[: -len(".running_mean")] for k in state if k.endswith(".running_mean")]
    assert names == ["features.1", "features.5"]
    for name in names:
        var = ref[f"{name}.running_var"]
        torch.testing.assert_close(state[f"{name}.running_var"].double(), var, rtol=1e-5,
                                   atol=0.0)
        diff = (state[f"{name}.running_mean"].double() - ref[f"{name}.running_mean"]).abs()
        assert (diff <= 1e-5 * var.sqrt() + 1e-7).all(), (name, diff.max())
