"""Same names, same behaviour: star_heads' lightly-named losses against the real lightly (client tier)."""

import inspect

import pytest
import torch

from star_heads import NTXentLoss, VICRegLoss

lightly_loss = pytest.importorskip("lightly.loss")


def _params(cls, n):
    return [(k, p.default) for k, p in list(inspect.signature(cls.__init__).parameters.items())[1 : n + 1]]


def test_signatures_and_defaults_are_lightlys():
    assert _params(NTXentLoss, 3) == _params(lightly_loss.NTXentLoss, 3)
    assert _params(VICRegLoss, 5) == _params(lightly_loss.VICRegLoss, 5)


@pytest.mark.parametrize("args", [(), (0.1,), (0.2, 0), (0.7, (0, 32), False)])
def test_ntxent_equals_lightly_for_the_same_arguments(args):
    g = torch.Generator().manual_seed(len(args))
    z0, z1 = torch.randn(12, 32, generator=g), torch.randn(12, 32, generator=g)
    ours, theirs = NTXentLoss(*args), lightly_loss.NTXentLoss(*args)
    torch.testing.assert_close(ours(z0, z1), theirs(z0, z1))
    a, b = z0.clone().requires_grad_(), z0.clone().requires_grad_()
    ours(a, z1).backward()
    theirs(b, z1).backward()
    torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.parametrize("args", [(), (10.0, 5.0, 2.0), (25.0, 25.0, 1.0, False, 1e-3)])
def test_vicreg_equals_lightly_for_the_same_arguments(args):
    g = torch.Generator().manual_seed(len(args))
    z0, z1 = 0.4 * torch.randn(16, 24, generator=g), torch.randn(16, 24, generator=g)  # some std below 1
    torch.testing.assert_close(VICRegLoss(*args)(z0, z1), lightly_loss.VICRegLoss(*args)(z0, z1))


def test_memory_bank_lightly_would_use_is_refused():
    lightly_loss.NTXentLoss(0.1, (64, 32))  # lightly builds a bank here ...
    with pytest.raises(NotImplementedError, match="lightly.loss.NTXentLoss"):
        NTXentLoss(0.1, (64, 32))  # ... we refuse rather than silently drop it
