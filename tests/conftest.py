import os

import torch
from hypothesis import HealthCheck, settings

# Deterministic, CI-sized hypothesis runs; tensors ops can be slow on a 2-core CPU.
settings.register_profile(
    "ci", max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
