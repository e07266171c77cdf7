"""fedsim: federated-learning simulation on Flower and PyTorch, focused on normalization."""

import os

# Flower sends usage telemetry unless FLWR_TELEMETRY_ENABLED=0, and reads the variable once,
# when it is first imported: fedsim runs turn it off before importing Flower, unless the user
# has set the variable (README "Install"). Child processes (Ray, Deployment Engine) inherit it.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

from fedsim.config import Scenario, load_scenario
from fedsim.errors import EngineFailed, ScenarioError
from fedsim.run import RunResult, resume, run

__all__ = ["EngineFailed", "RunResult", "Scenario", "ScenarioError", "load_scenario", "resume",
           "run"]
__version__ = "0.1.0"
