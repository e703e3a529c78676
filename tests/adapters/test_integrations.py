import pytest
import torch
from torch import nn

from star_heads.heads import STARSimCLRProjectionHead
from star_heads.integrations import swap_projector
from star_heads.integrations.swap import projector_shape


class _SoloLikeMethod(nn.Module):
    """Mimics solo-learn: self.projector built in __init__ from proj_hidden_dim / proj_output_dim."""

    def __init__(self, features_dim=32, proj_hidden_dim=48, proj_output_dim=16):
        super().__init__()
        self.backbone = nn.Linear(10, features_dim)
        self.projector = nn.Sequential(
            nn.Linear(features_dim, proj_hidden_dim), nn.BatchNorm1d(proj_hidden_dim), nn.ReLU(),
            nn.Linear(proj_hidden_dim, proj_output_dim),
        )

    @property
    def learnable_params(self):
        return [{"name": "backbone", "params": self.backbone.parameters()},
                {"name": "projector", "params": self.projector.parameters()}]


def test_swap_projector_keeps_shapes_and_returns_invariant_tensor():
    model = _SoloLikeMethod()
    old = model.projector
    head = swap_projector(model, num_experts=4, expert_hidden_dim=48)  # the paper's per-expert shape
    assert model.projector is head and isinstance(head, STARSimCLRProjectionHead)
    assert projector_shape(old) == (32, 48, 16, 2)
    assert [(l.in_features, l.out_features) for l in head.experts.linears] == [(32, 48), (48, 16)]
    z = model.projector(model.backbone(torch.randn(5, 10)))
    assert isinstance(z, torch.Tensor) and z.shape == (5, 16)
    assert model.projector(model.backbone(torch.randn(5, 10)), task="eq").shape == (5, 16)
    # the optimiser reads the new head's parameters through learnable_params
    ids = {id(p) for g in model.learnable_params for p in g["params"]}
    assert all(id(p) in ids for p in head.parameters())


def test_swap_projector_errors():
    with pytest.raises(AttributeError, match="no projector module at attribute 'projection_head'"):
        swap_projector(_SoloLikeMethod(), "projection_head")
    m = nn.Module()
    m.projector = nn.ReLU()
    with pytest.raises(ValueError, match="no nn.Linear layers"):
        swap_projector(m)


def test_lightly_head_swap():
    lightly_heads = pytest.importorskip("lightly.models.modules.heads")
    from star_heads.integrations.lightly import replace_projection_head

    model = nn.Module()
    model.projection_head = lightly_heads.SimCLRProjectionHead(32, 32, 8)
    head = replace_projection_head(model, num_experts=2)
    assert head(torch.randn(4, 32)).shape == (4, 8)


def test_solo_learn_replace_projector():
    pytest.importorskip("solo.methods.base")
    from star_heads.integrations.solo_learn import replace_projector

    with pytest.raises(TypeError, match="solo-learn BaseMethod"):
        replace_projector(_SoloLikeMethod())


def test_lightly_momentum_head_swap_keeps_update_momentum_consistent():
    lightly_heads = pytest.importorskip("lightly.models.modules.heads")
    lightly_utils = pytest.importorskip("lightly.models.utils")
    import copy

    from star_heads.integrations.lightly import replace_projection_head

    model = nn.Module()  # lightly's BYOL example: a momentum copy of the projection head, gradients off
    model.projection_head = lightly_heads.BYOLProjectionHead(32, 64, 16)
    model.projection_head_momentum = copy.deepcopy(model.projection_head)
    lightly_utils.deactivate_requires_grad(model.projection_head_momentum)
    head = replace_projection_head(model, num_experts=2, momentum_attr="projection_head_momentum")
    teacher = model.projection_head_momentum
    assert teacher is not head and not any(p.requires_grad for p in teacher.parameters())
    before = [p.clone() for p in teacher.parameters()]
    with torch.no_grad():
        for p in head.parameters():
            p.add_(1.0)
    lightly_utils.update_momentum(head, teacher, m=0.9)
    for b, t, o in zip(before, teacher.parameters(), head.parameters()):
        torch.testing.assert_close(t, 0.9 * b + 0.1 * o)
    assert teacher(torch.randn(4, 32)).shape == (4, 16)


def test_missing_solo_learn_says_how_to_install_it(monkeypatch):
    import sys

    from star_heads.integrations.solo_learn import replace_projector

    monkeypatch.setitem(sys.modules, "solo", None)  # as if solo-learn were not installed
    monkeypatch.setitem(sys.modules, "solo.methods", None)
    monkeypatch.setitem(sys.modules, "solo.methods.base", None)
    with pytest.raises(ImportError) as info:
        replace_projector(_SoloLikeMethod())
    message = str(info.value)
    assert "from source" in message and "torch 1.9" in message
    assert "pip install solo-learn" not in message


def test_lightning_integration_is_lazy_and_says_what_is_missing(monkeypatch):
    import importlib
    import sys

    import star_heads

    assert "star_heads.integrations.lightning" not in sys.modules or "lightning" in sys.modules
    for name in ("lightning", "lightning.pytorch", "pytorch_lightning"):
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.delitem(sys.modules, "star_heads.integrations.lightning", raising=False)
    with pytest.raises(ImportError, match="pip install lightning"):
        importlib.import_module("star_heads.integrations.lightning")
    assert star_heads.__version__  # the package itself never needed it
