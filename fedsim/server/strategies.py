"""Server strategies by name (Flower's built-ins, ours) or by import path (a user's class)."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import logging
import sys
from pathlib import Path
from typing import Any

from flwr.serverapp import strategy as flwr_strategy
from flwr.serverapp.strategy import Strategy

from fedsim.config import Scenario
from fedsim.errors import ScenarioError
from fedsim.registry import Registry

STRATEGIES: Registry[type[Strategy]] = Registry("strategy")

_FLOWER_BUILTINS = {
    "fedavg": "FedAvg",
    "fedprox": "FedProx",
    "fedadam": "FedAdam",
    "fedyogi": "FedYogi",
    "fedadagrad": "FedAdagrad",
    "fedavgm": "FedAvgM",
    "fedmedian": "FedMedian",
    "fedtrimmedavg": "FedTrimmedAvg",
    "krum": "Krum",
}
for _name, _cls in _FLOWER_BUILTINS.items():
    STRATEGIES.register(_name)(getattr(flwr_strategy, _cls))


def _load_ours() -> None:
    """Import the ``strategies`` package so its strategies register themselves."""
    importlib.import_module("strategies")


def _import_path(spec: str) -> type:
    """Resolve ``pkg.module:Class`` or ``path/to/file.py:Class``."""
    target, _, attr = spec.rpartition(":")
    try:
        if target.endswith(".py"):
            path = Path(target)
            if not path.is_file():
                raise ScenarioError(f"server.strategy = {spec!r}: file {target!r} not found")
            mod_name = f"fedsim_user_strategy_{abs(hash(str(path.resolve())))}"
            module = sys.modules.get(mod_name)
            if module is None:
                loader_spec = importlib.util.spec_from_file_location(mod_name, path)
                module = importlib.util.module_from_spec(loader_spec)
                sys.modules[mod_name] = module
                loader_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except ScenarioError:
        raise
    except Exception as exc:
        raise ScenarioError(
            f"server.strategy = {spec!r} does not import ({type(exc).__name__}: {exc}); "
            "use 'package.module:ClassName' importable from here or 'path/to/file.py:ClassName'"
        ) from None
    if not hasattr(module, attr):
        raise ScenarioError(f"server.strategy = {spec!r}: {target!r} has no attribute {attr!r}")
    return getattr(module, attr)


def strategy_class(name: str) -> type[Strategy]:
    """The Strategy subclass named by ``server.strategy`` (registry name or import path)."""
    if ":" in name:
        cls = _import_path(name)
    else:
        _load_ours()
        cls = STRATEGIES.get(name, key="server.strategy")
    if not (inspect.isclass(cls) and issubclass(cls, Strategy)):
        raise ScenarioError(
            f"server.strategy = {name!r} is not a subclass of flwr.serverapp.strategy.Strategy"
        )
    return cls


def _accepts(cls: type, name: str) -> bool:
    params = inspect.signature(cls.__init__).parameters
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def strategy_kwargs(scenario: Scenario, cls: type[Strategy]) -> dict[str, Any]:
    """Sampling arguments from ``[server]`` (where the class takes them) + ``[server.params]``."""
    n = scenario.num_participating
    k = scenario.server.clients_per_round
    fe = scenario.server.fraction_evaluate
    standard = {
        "fraction_train": k / n,
        "min_train_nodes": k,
        "min_available_nodes": n,
        "fraction_evaluate": fe,
        "min_evaluate_nodes": max(1, int(fe * n)) if fe > 0 else 0,
    }
    kwargs = {key: v for key, v in standard.items() if _accepts(cls, key)}
    kwargs.update(scenario.server.params)
    return kwargs


def make_strategy(scenario: Scenario) -> Strategy:
    """Instantiate the scenario's strategy; bad constructor arguments are a ScenarioError."""
    cls = strategy_class(scenario.server.strategy)
    kwargs = strategy_kwargs(scenario, cls)
    try:
        inspect.signature(cls.__init__).bind(None, **kwargs)
    except TypeError as exc:
        allowed = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
        raise ScenarioError(
            f"[server.params] do not fit {cls.__name__}: {exc}; it accepts: {', '.join(allowed)}"
        ) from None
    flwr_log = logging.getLogger("flwr")
    level = flwr_log.level
    flwr_log.setLevel(logging.ERROR)  # FedAvg warns on fraction_evaluate = 0, our default
    try:
        return cls(**kwargs)
    except Exception as exc:
        raise ScenarioError(
            f"{cls.__name__}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())}) failed: "
            f"{type(exc).__name__}: {exc}"
        ) from None
    finally:
        flwr_log.setLevel(level)
