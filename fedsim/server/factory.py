"""The scenario's strategy, built: looked up by name or import path, given its parameters,
wrapped in central DP when ``[server.dp]`` asks for it (:mod:`fedsim.server.dp`) and in canary
clients when ``privacy.audits`` names ``canary_clients`` (:mod:`fedsim.server.canaries`)."""

from __future__ import annotations

import inspect
import logging
from typing import TYPE_CHECKING

from flwr.serverapp.strategy import Strategy

from fedsim.config import Scenario
from fedsim.errors import ScenarioError
from fedsim.server.canaries import wrap_canaries
from fedsim.server.dp import wrap_dp
from fedsim.server.metric_mean import use_weighted_metrics
from fedsim.server.strategies import accepted_params, strategy_class, strategy_kwargs

if TYPE_CHECKING:
    from torch.nn import Module


def make_strategy(scenario: Scenario, model: Module | None = None) -> Strategy:
    """Instantiate the scenario's strategy (DP-wrapped if ``[server.dp]`` asks for it).

    ``model`` (the global model) tells the DP wrapper which arrays are parameters; without
    it the strategy is built only to validate the scenario. Bad constructor arguments are a
    ScenarioError.
    """
    cls = strategy_class(scenario.server.strategy)
    kwargs = strategy_kwargs(scenario, cls)
    accepted = accepted_params(cls)
    unknown = sorted(set(kwargs) - accepted) if accepted is not None else []
    try:
        if unknown:
            raise TypeError(f"unexpected keyword argument(s) {', '.join(map(repr, unknown))}")
        inspect.signature(cls.__init__).bind(None, **kwargs)
    except TypeError as exc:
        allowed = sorted(accepted) if accepted is not None else [
            p for p in inspect.signature(cls.__init__).parameters if p != "self"]
        raise ScenarioError(
            f"[server.params] do not fit {cls.__name__}: {exc}; it accepts: {', '.join(allowed)}"
        ) from None
    flwr_log = logging.getLogger("flwr")
    level = flwr_log.level
    flwr_log.setLevel(logging.ERROR)  # FedAvg warns on fraction_evaluate = 0, our default
    try:
        strategy = cls(**kwargs)
    except Exception as exc:
        raise ScenarioError(
            f"{cls.__name__}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())}) failed: "
            f"{type(exc).__name__}: {exc}"
        ) from None
    finally:
        flwr_log.setLevel(level)
    use_weighted_metrics(strategy)  # Flower's metric mean, the same values at less cost
    if scenario.server.dp.kind != "none":
        strategy = wrap_dp(strategy, scenario, model)
    if model is not None:  # canary clients answer with moves of the model's parameters
        strategy = wrap_canaries(strategy, scenario, [n for n, _ in model.named_parameters()])
    return strategy
