import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# Deterministic, CI-sized hypothesis runs; tensors ops can be slow on a 2-core CPU.
settings.register_profile(
    "ci", max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


def pytest_addoption(parser):
    parser.addoption(
        "--device",
        default="cpu",
        help="device the device-generic tests run on (cpu, cuda, cuda:1, mps); default cpu",
    )


@pytest.fixture(scope="session")
def device(request) -> torch.device:
    """The device under test (``pytest --device cuda``); tests that take it run unchanged on any device."""
    dev = torch.device(request.config.getoption("--device"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        pytest.exit(f"--device {dev} was asked for, but torch.cuda.is_available() is False", returncode=4)
    return dev
