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
    head = swap_projector(model, num_experts=4)
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
