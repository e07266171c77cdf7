"""fedsim: federated-learning simulation on Flower and PyTorch, focused on normalization."""

from fedsim.config import Scenario, load_scenario
from fedsim.errors import ScenarioError
from fedsim.run import RunResult, resume, run

__all__ = ["RunResult", "Scenario", "ScenarioError", "load_scenario", "resume", "run"]
__version__ = "0.1.0"
