"""Server strategies by name (Flower's built-ins, ours) or by import path (a user's class).

``STRATEGIES`` holds Flower's built-ins; fedsim's own strategies (the top-level
``strategies`` package) register themselves when :mod:`fedsim.plugins` imports them, so
this registry imports no plugin. :func:`fedsim.server.factory.make_strategy` builds the
scenario's strategy from what is looked up here. Every failure — a path that does not
import, a class that is not a Strategy, an unknown name — is a ScenarioError raised by the
edge check (:func:`fedsim.run.check`), before anything trains.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
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


def _import_path(spec: str) -> type:
    """Resolve ``pkg.module:Class`` or ``path/to/file.py:Class``."""
    target, _, attr = spec.rpartition(":")
    try:
        if target.endswith(".py"):
            path = Path(target)
            if not path.is_file():
                raise ScenarioError(f"server.strategy = {spec!r}: file {target!r} not found")
            digest = hashlib.blake2b(str(path.resolve()).encode(), digest_size=6).hexdigest()
            mod_name = f"fedsim_user_strategy_{digest}"
            module = sys.modules.get(mod_name)
            if module is None:
                loader_spec = importlib.util.spec_from_file_location(mod_name, path)
                module = importlib.util.module_from_spec(loader_spec)
                sys.modules[mod_name] = module
                try:
                    loader_spec.loader.exec_module(module)
                except BaseException:
                    del sys.modules[mod_name]  # a fixed file must import again next time
                    raise
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
    # a registry name: Flower's, or fedsim's own once fedsim.plugins has registered them
    cls = _import_path(name) if ":" in name else STRATEGIES.get(name, key="server.strategy")
    if not (inspect.isclass(cls) and issubclass(cls, Strategy)):
        raise ScenarioError(
            f"server.strategy = {name!r} is not a subclass of flwr.serverapp.strategy.Strategy"
        )
    return cls


def accepted_params(cls: type) -> set[str] | None:
    """Keyword arguments ``cls(...)`` accepts, following ``**kwargs`` up the MRO.

    A subclass written as ``def __init__(self, warmup=5, **kwargs): super().__init__(**kwargs)``
    accepts its own names plus its parent's. None means "anything" (``**kwargs`` that do not
    end at a parent's explicit signature).
    """
    names: set[str] = set()
    open_kwargs = False  # a subclass passed **kwargs on to its parents
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        if klass is object:  # **kwargs that reach object.__init__ went elsewhere: cannot tell
            return None if open_kwargs else names
        params = list(inspect.signature(init).parameters.values())[1:]
        names |= {p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
        open_kwargs = any(p.kind is p.VAR_KEYWORD for p in params)
        if not open_kwargs:
            return names
    return None


def _accepts(cls: type, name: str) -> bool:
    accepted = accepted_params(cls)
    return accepted is None or name in accepted


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
