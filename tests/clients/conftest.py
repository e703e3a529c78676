"""Client tier: helpers to run the lightly examples and record what reached the optimiser."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture
def load_example():
    """``load_example(name)`` imports ``examples/<name>.py`` as a module (its ``main`` is not run)."""

    def load(name: str):
        spec = importlib.util.spec_from_file_location(f"_example_{name}", EXAMPLES / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load


class Recorder:
    """Every AdapterOutput produced, and the gradient of every parameter at each optimiser step."""

    def __init__(self) -> None:
        self.outputs: list = []
        self.grads: list[dict[int, torch.Tensor]] = []


@pytest.fixture
def recorder(monkeypatch):
    from star_heads.adapters import AdapterOutput

    rec = Recorder()
    base = torch.optim.SGD

    class RecordingSGD(base):
        def step(self, closure=None):
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()  # Lightning runs forward + backward inside the closure
            rec.grads.append(
                {id(p): p.grad.detach().clone() for g in self.param_groups for p in g["params"] if p.grad is not None}
            )
            super().step()
            return loss

    def hook(module, args, output):
        if isinstance(output, AdapterOutput):
            rec.outputs.append(output)

    monkeypatch.setattr(torch.optim, "SGD", RecordingSGD)
    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    yield rec
    handle.remove()
