"""The CUDA tests: skipped, with the reason, where CUDA is not available.

``FEDSIM_GPU_TESTS_ON_CPU=1`` runs them on the CPU instead: a dry run of the tests' own
logic on a machine without a GPU (benchmarks/gpu_check.sh --cpu); the checks that only mean
something on CUDA (memory allocated on the device) skip then.

TF32 is turned off for these tests: on Ampere and later GPUs, PyTorch runs float32
convolutions in TF32 by default (10 mantissa bits), and the tolerances here are derived from
float32 arithmetic (a float64 reference), as on the CPU.
"""

import os
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
ON_CPU = os.environ.get("FEDSIM_GPU_TESTS_ON_CPU") == "1"


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs CUDA (tests/gpu; skipped without it)")


def pytest_collection_modifyitems(config, items):
    mine = [item for item in items if item.path.is_relative_to(HERE)]
    for item in mine:
        item.add_marker(pytest.mark.gpu)
    if ON_CPU or torch.cuda.is_available():
        return
    skip = pytest.mark.skip(
        reason=f"needs CUDA: torch.cuda.is_available() is False here (torch {torch.__version__},"
               f" built for CUDA {torch.version.cuda}); FEDSIM_GPU_TESTS_ON_CPU=1 runs these "
               "tests on the CPU as a dry run")
    for item in mine:
        item.add_marker(skip)


@pytest.fixture(scope="session")
def device() -> torch.device:
    """Where the tests train: the GPU, or the CPU in a dry run."""
    return torch.device("cpu" if ON_CPU else "cuda")


@pytest.fixture(autouse=True)
def _full_float32(monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


@pytest.fixture
def on_device(device) -> list[str]:
    """The ``--set`` that makes a run train on the test device."""
    return [f"engine.device={device.type}"]
