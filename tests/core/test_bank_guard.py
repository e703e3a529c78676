"""BatchNorm running statistics skip a batch holding NaN/Inf, decided on the device (bank and predictor).

References: ``nn.BatchNorm1d`` itself (a finite batch must leave exactly its statistics), a BatchNorm that only
ever saw the finite batches (a non-finite one must leave no trace), and the meta device under
:class:`HostSyncGuard` (no host read, no host-device copy).
"""

import copy
from functools import partial

import pytest
import torch
from sync_guard import HostSyncGuard
from torch import nn

from star_heads._running_stats import guarded_batch_norm
from star_heads.equivariance import EquivariantPredictor
from star_heads.experts import ExpertBank


def _stats(module):
    return {k: v.clone() for k, v in module.state_dict().items() if "running" in k or "num_batches" in k}


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _poison(x, value=float("nan"), row=1, col=0):
    x = x.clone()
    x[row, col] = value
    return x


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_guard_equals_batchnorm_on_finite_batches_and_skips_non_finite_ones(momentum, bad, device):
    """guarded_batch_norm: bit-identical to nn.BatchNorm1d on finite batches; a batch with one non-finite value
    leaves every buffer as a BatchNorm that never saw it has them, and its output still carries the value."""
    torch.manual_seed(0)
    guarded = nn.BatchNorm1d(5, momentum=momentum, device=device)
    plain = copy.deepcopy(guarded)
    gen = torch.Generator(device=device).manual_seed(1)
    batches = [torch.randn(8, 5, generator=gen, device=device) * 3 + 1 for _ in range(3)]
    for i, x in enumerate(batches):
        torch.testing.assert_close(guarded_batch_norm(guarded, x), plain(x), rtol=0, atol=0)
        _assert_same(_stats(guarded), _stats(plain))
        if i == 1:  # a non-finite batch in between: no trace in the statistics, the output shows it
            y = guarded_batch_norm(guarded, _poison(x, bad))
            assert not torch.isfinite(y).all()
            _assert_same(_stats(guarded), _stats(plain))


def _bank(device, **kw):
    torch.manual_seed(0)
    return ExpertBank(3, 6, 5, 4, last_norm_layer=partial(nn.BatchNorm1d, affine=False), device=device, **kw)


def test_bank_nan_row_leaves_every_expert_statistic_unchanged(device):
    bank = _bank(device)
    gen = torch.Generator(device=device).manual_seed(2)
    x = torch.randn(8, 6, generator=gen, device=device)
    bank(x)  # non-trivial statistics
    before = _stats(bank)
    assert len(before) == 3 * 3  # running mean, var, num_batches_tracked of each of the three BatchNorms
    gates = torch.softmax(torch.randn(8, 2, 3, generator=gen, device=device), -1)
    z = bank(_poison(x), gates)
    assert torch.isnan(z).any()  # the loss shows it
    _assert_same(_stats(bank), before)
    bank.eval()
    assert torch.isfinite(bank(x, gates)).all()


def test_bank_finite_batches_give_nn_batchnorm_statistics(device):
    """A finite batch updates the statistics exactly as the per-expert nn.BatchNorm1d modules do (float64)."""
    bank = _bank(device, dtype=torch.float64)
    modules = bank.to_modules()
    gen = torch.Generator(device=device).manual_seed(3)
    for _ in range(2):
        x = torch.randn(8, 6, generator=gen, device=device, dtype=torch.float64)
        bank(x)
        for m in modules:
            m(x)
    for k, expert in enumerate(bank.to_modules()):
        for (name, a), (_, b) in zip(expert.named_buffers(), modules[k].named_buffers()):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=lambda m: f"expert {k} {name}: {m}")


def test_bank_after_sync_batchnorm_conversion_is_guarded(device):
    """convert_sync_batchnorm swaps the bank's BatchNorms for SyncBatchNorm; the bank calls them through the same
    guard, so a non-finite batch is skipped there too (across processes every rank sees the same global
    statistics, hence takes the same decision)."""
    bank = nn.SyncBatchNorm.convert_sync_batchnorm(_bank(device))
    assert sum(isinstance(m, nn.SyncBatchNorm) for m in bank.norms) == 3
    x = torch.randn(8, 6, device=device)
    bank(x)
    before = _stats(bank)
    assert torch.isnan(bank(_poison(x, row=0, col=5))).any()
    _assert_same(_stats(bank), before)


def _predictor(kind, device):
    torch.manual_seed(0)
    return EquivariantPredictor(8, 5, kind=kind, hidden_dim=16).to(device)


@pytest.mark.parametrize("kind", ["star", "equimod"])
@pytest.mark.parametrize("convert", [False, True])
def test_predictor_nan_row_leaves_statistics_unchanged(kind, convert, device):
    m = _predictor(kind, device)
    if convert:
        m = nn.SyncBatchNorm.convert_sync_batchnorm(m)
    plain = copy.deepcopy(m)  # its Sequentials run without the guard: the nn.BatchNorm1d reference
    gen = torch.Generator(device=device).manual_seed(4)
    z0, a = torch.randn(6, 8, generator=gen, device=device), torch.randn(6, 5, generator=gen, device=device)
    out = m(z0, a)
    ref = plain.mlp(torch.cat([z0, plain.param_encoder(a)], 1))
    torch.testing.assert_close(out, z0 + ref if kind == "star" else ref, rtol=0, atol=0)
    _assert_same(_stats(m), _stats(plain))
    before = _stats(m)
    assert torch.isnan(m(z0, _poison(a, float("inf")))).any()  # every BatchNorm sees it
    _assert_same(_stats(m), before)
    assert torch.isnan(m(_poison(z0), a)).any()  # reaches φ's BatchNorms; EquiMod's ψ sees a finite batch
    _assert_same(_stats(m.mlp), _stats(plain.mlp))
    m.eval()
    assert torch.isfinite(m(z0, a)).all()


def test_training_step_with_the_guard_makes_no_host_sync():
    """On the meta device (the stand-in for CUDA), a training step of the bank and of the predictor, forward and
    backward, reads nothing back to the host and copies nothing between host and device."""
    bank = ExpertBank(4, 8, 8, 8, last_norm_layer=nn.BatchNorm1d, device="meta")
    pred = EquivariantPredictor(8, 5, hidden_dim=16).to("meta")
    equimod = EquivariantPredictor(8, 5, kind="equimod").to("meta")
    x = torch.randn(6, 8, device="meta", requires_grad=True)
    gates = torch.softmax(torch.randn(6, 2, 4, device="meta"), -1)
    a = torch.randn(6, 5, device="meta")
    with HostSyncGuard("meta"):
        z = bank(x, gates)
        loss = z.sum() + pred(z[0], a).sum() + equimod(z[1], a).sum()
        loss.backward()
    assert x.grad is not None and x.grad.device.type == "meta"
