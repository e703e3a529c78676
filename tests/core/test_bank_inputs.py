"""ExpertBank input checks in the user's terms: raised before any state changes, no host syncs by default."""

import copy

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from star_heads.experts import ExpertBank


def _unchanged(bank, before):
    for k, v in bank.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize(
    "x, gates, exc, match",
    [
        (torch.randn(0, 6), None, ValueError, r"at least one sample, got shape \[0, 6\]"),
        (torch.randn(1, 6), None, ValueError, r"batch of 1 \(shape \(1, 6\)\).*BatchNorm in training mode"),
        (torch.randn(4, 6, dtype=torch.float64), None, TypeError, "x has dtype torch.float64 but the bank's parameters are torch.float32"),
        (torch.randn(4, 6, dtype=torch.bfloat16), None, TypeError, "x has dtype torch.bfloat16"),
        (torch.randn(4, 6), torch.rand(4, 2, 2), ValueError, r"gates must have shape \[4, \*, 3\]"),
        (torch.randn(4, 6), torch.rand(5, 2, 3), ValueError, r"gates must have shape \[4, \*, 3\]"),
        (torch.randn(4, 6), torch.ones(4, 2, 3, dtype=torch.long), TypeError, "gates must be a floating-point tensor"),
        (torch.randn(4, 6), torch.rand(4, 2, 3, dtype=torch.float64), TypeError, "gates has dtype torch.float64 but x has torch.float32"),
    ],
)
def test_bad_inputs_are_named_in_user_terms(x, gates, exc, match):
    bank = ExpertBank(3, 6, 5, 4)
    before = copy.deepcopy(bank.state_dict())
    with pytest.raises(exc, match=match):
        bank(x, gates)
    _unchanged(bank, before)


def test_single_sample_allowed_when_no_batch_statistics():
    x = torch.randn(1, 6)
    assert ExpertBank(3, 6, 5, 4).eval()(x).shape == (1, 3, 4)
    assert ExpertBank(3, 6, 5, 4, norm_layer=nn.LayerNorm)(x).shape == (1, 3, 4)
    assert ExpertBank(3, 6, 5, 4, norm_layer=None)(x).shape == (1, 3, 4)


def test_autocast_casts_inputs_of_other_dtypes():
    torch.manual_seed(0)
    bank = ExpertBank(3, 6, 5, 4)
    x = torch.randn(8, 6, dtype=torch.float64)
    gates = torch.softmax(torch.randn(8, 2, 3, dtype=torch.float64), -1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = bank(x, gates)
    assert z.dtype == torch.bfloat16
    ref = bank(x.float(), gates.float())
    torch.testing.assert_close(z.float(), ref, rtol=0.05, atol=0.05)


def test_non_finite_values_only_checked_on_request():
    x = torch.randn(4, 6)
    gates = torch.softmax(torch.randn(4, 2, 3), -1)
    gates[1, 0, 2] = float("nan")
    bank = ExpertBank(3, 6, 5, 4, check_finite=True)
    before = copy.deepcopy(bank.state_dict())
    with pytest.raises(ValueError, match="gates contains NaN or Inf"):
        bank(x, gates)
    x_bad = x.clone()
    x_bad[0, 0] = float("inf")
    with pytest.raises(ValueError, match="x contains NaN or Inf"):
        bank(x_bad)
    _unchanged(bank, before)


class _SyncCounter(TorchDispatchMode):
    """Counts ops that read a value back to the host (what a value check would add on a GPU)."""

    def __init__(self):
        super().__init__()
        self.syncs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in ("_local_scalar_dense", "item", "is_nonzero"):
            self.syncs += 1
        return func(*args, **(kwargs or {}))


def test_default_checks_add_no_host_syncs():
    bank = ExpertBank(3, 6, 5, 4)
    x = torch.randn(4, 6)
    gates = torch.softmax(torch.randn(4, 2, 3), -1)
    with _SyncCounter() as c:
        bank(x, gates)
    assert c.syncs == 0
    with _SyncCounter() as c:
        ExpertBank(3, 6, 5, 4, check_finite=True)(x, gates)
    assert c.syncs == 2  # x and gates, only on request


@pytest.mark.parametrize("value", ["no", 1, None])
def test_check_finite_must_be_a_bool(value):
    with pytest.raises(TypeError, match=f"check_finite must be a bool, got {type(value).__name__}"):
        ExpertBank(3, 6, 5, 4, check_finite=value)


@pytest.mark.parametrize("norm", [nn.InstanceNorm1d, nn.BatchNorm2d, nn.LazyBatchNorm1d, nn.GroupNorm])
def test_norms_the_bank_cannot_compute_like_its_modules_are_refused(norm):
    """Only norms whose fused form equals the per-expert to_modules() one are accepted (an InstanceNorm1d
    normalises each sample on its own; a BatchNorm2d wants images)."""
    with pytest.raises(TypeError, match=rf"norm_layer must be one of BatchNorm1d, SyncBatchNorm, LayerNorm .*got .*{norm.__name__}"):
        ExpertBank(3, 6, 5, 4, norm_layer=norm)
    with pytest.raises(TypeError, match=norm.__name__):
        ExpertBank(3, 6, 5, 4, last_norm_layer=norm)


def test_global_value_switch_reaches_the_bank():
    from star_heads._value_checks import value_checks

    bank = ExpertBank(3, 6, 5, 4)
    x = torch.randn(4, 6)
    x[2, 1] = float("nan")
    before = copy.deepcopy(bank.state_dict())
    with value_checks(), pytest.raises(ValueError, match="x contains NaN or Inf"):
        bank(x)
    _unchanged(bank, before)
    assert torch.isnan(bank(x)).any()  # off again: the NaN flows to the output (and skips the statistics)
    _unchanged(bank, before)


def test_private_forward_is_the_same_maths_without_checks():
    torch.manual_seed(1)
    bank = ExpertBank(3, 6, 5, 4).eval()
    x, gates = torch.randn(4, 6), torch.softmax(torch.randn(4, 2, 3), -1)
    torch.testing.assert_close(bank._forward(x, gates), bank(x, gates), rtol=0, atol=0)
    z, experts = bank._forward(x, gates, True)
    torch.testing.assert_close(experts, bank(x), rtol=0, atol=0)
    with _SyncCounter() as c:
        bank._forward(x, gates)
    assert c.syncs == 0
