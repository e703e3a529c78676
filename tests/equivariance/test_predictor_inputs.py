"""EquivariantPredictor refuses what it cannot compute, in its own words, before any state changes."""

import copy

import pytest
import torch
from torch import nn

from star_heads._value_checks import value_checks
from star_heads.equivariance import EquivariantPredictor


def _unchanged(m, before):
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("kind", ["star", "equimod"])
def test_batch_of_one_in_training_is_refused_in_our_words(kind):
    m = EquivariantPredictor(8, 5, kind=kind, hidden_dim=16)
    before = copy.deepcopy(m.state_dict())
    with pytest.raises(ValueError, match=r"z0 has a batch of 1 \(shape \(1, 8\)\): BatchNorm in training mode"):
        m(torch.randn(1, 8), torch.randn(1, 5))
    _unchanged(m, before)
    assert m.eval()(torch.randn(1, 8), torch.randn(1, 5)).shape == (1, 8)
    ln = EquivariantPredictor(8, 5, kind=kind, hidden_dim=16, norm_layer=nn.LayerNorm)
    assert ln(torch.randn(1, 8), torch.randn(1, 5)).shape == (1, 8)


def test_embeddings_of_another_dtype_are_refused_outside_autocast():
    m = EquivariantPredictor(8, 5, hidden_dim=16)
    with pytest.raises(TypeError, match="z0 has dtype torch.float64 but the predictor's parameters are torch.float32"):
        m(torch.randn(4, 8, dtype=torch.float64), torch.randn(4, 5))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast decides the compute dtype
        assert torch.isfinite(m(torch.randn(4, 8, dtype=torch.float64), torch.randn(4, 5))).all()


@pytest.mark.parametrize("norm", [nn.BatchNorm2d, nn.BatchNorm3d, nn.InstanceNorm1d])
@pytest.mark.parametrize("kind", ["star", "equimod"])
def test_image_and_instance_norms_are_refused_at_construction(norm, kind):
    with pytest.raises(TypeError, match=rf"norm_layer must normalise \[B, width\] features.*{norm.__name__}"):
        EquivariantPredictor(8, 5, kind=kind, norm_layer=norm)


@pytest.mark.parametrize("value, name", [(nn.BatchNorm1d(8), "norm_layer"), ("relu", "act_layer")])
def test_layers_must_be_classes(value, name):
    with pytest.raises(TypeError, match=f"{name} must be an nn.Module class"):
        EquivariantPredictor(8, 5, **{name: value})


def test_check_finite_type_and_global_switch():
    with pytest.raises(TypeError, match="check_finite must be a bool, got str 'no'"):
        EquivariantPredictor(8, 5, check_finite="no")
    m = EquivariantPredictor(8, 5, hidden_dim=16)
    z0 = torch.randn(4, 8)
    z0[0, 0] = float("nan")
    with value_checks(), pytest.raises(ValueError, match="z0 contains NaN or Inf"):
        m(z0, torch.randn(4, 5))
