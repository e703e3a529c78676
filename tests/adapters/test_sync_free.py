"""A training step of every adapter makes no host sync and no host↔device copy, forward and backward.

The step runs on the ``meta`` device (the stand-in for CUDA: no values, so a host read either fails or shows up
as the aten op that would sync) under :class:`HostSyncGuard`, which fails at the first ``.item()``, ``equal``,
``nonzero``, ``masked_select``, boolean-mask index, host↔device copy or mixed-device op. Syncs that remain by
design (value checks when switched on, the CCA compute step, ``as_dict``) are shown to be caught by the same
guard, so a pass means something.
"""

import numpy as np
import pytest
import torch
from sync_guard import HostSyncError, HostSyncGuard

import star_heads
from star_heads.adapters import EquiModAdapter, SimCLRAdapter, VICRegAdapter
from star_heads.losses import equivariant_nt_xent, nt_xent, vicreg
from star_heads.metrics import CCAMonitor

ADAPTERS = {"simclr": SimCLRAdapter, "vicreg": VICRegAdapter, "equimod": EquiModAdapter}
HEADS = ["star", "separate", "shared", "single"]
B, D, P = 8, 16, 11

_MONITOR_ON_META = (
    "CCAMeter.update enters torch.autocast('meta', enabled=False), which torch refuses (no autocast key on meta); "
    "the CCA meter (star_heads/metrics/meter.py) is being reworked elsewhere"
)


def _cases():
    for name in ADAPTERS:
        for head in HEADS:
            for joint in (True, False):
                if head == "single" and joint:
                    continue
                for monitor in (False, True):
                    marks: list = []
                    yield pytest.param(name, head, joint, monitor, marks=marks,
                                       id=f"{name}-{head}-{'joint' if joint else 'inv'}-{'cca' if monitor else 'nocca'}")


def _adapter(name, head, *, device="meta", cca_every=0, **kwargs):
    options = {"num_experts": 4} if head == "star" else {}
    return ADAPTERS[name](D, head=head, output_dim=8, cca_every=cca_every, device=device, **options, **kwargs)


def _inputs(device, p=P, local=0):
    hs = [torch.randn(B, D, device=device, requires_grad=True) for _ in range(3 + local)]
    params = [torch.rand(B, p, device=device) for _ in range(2)]
    return hs, params


def _step(adapter, hs, params, joint, local=()):
    h_local = list(local) or None
    if joint:
        out = adapter(hs[1], hs[2], h0=hs[0], params1=params[0], params2=params[1], h_local=h_local)
    else:
        out = adapter(hs[1], hs[2], h_local=h_local)
    out.loss.backward()
    return out


@pytest.mark.parametrize("name, head, joint, monitor", list(_cases()))
def test_a_training_step_makes_no_host_sync(name, head, joint, monitor):
    # the monitor's compute step (every cca_every steps) is a sync by design: 1000 keeps it out of these steps
    adapter = _adapter(name, head, cca_every=1000 if monitor else 0)
    assert {t.device.type for t in [*adapter.parameters(), *adapter.buffers()]} == {"meta"}
    hs, params = _inputs("meta")
    with HostSyncGuard("meta") as guard:
        for _ in range(2):
            out = _step(adapter, hs, params, joint)
    assert guard.events == []
    assert out.loss.device.type == "meta" and out.cca is None
    assert all(p.grad is not None for p in adapter.head.parameters() if p.requires_grad) or not joint


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_multi_crop_and_12d_parameters_make_no_host_sync(name):
    adapter = _adapter(name, "star", param_dim=12)
    hs, params = _inputs("meta", p=12, local=2)
    with HostSyncGuard("meta") as guard:
        out = _step(adapter, hs[:3], params, True, local=hs[3:])
    assert guard.events == [] and {"inv_local1", "inv_local2"} <= set(out.embeddings)


def test_value_checks_are_the_sync_and_are_opt_in():
    """The guard does see a sync: the finite check, when switched on, reads values on the host."""
    hs, params = _inputs("meta")
    for build in (lambda: _adapter("simclr", "star", check_finite=True), lambda: _adapter("simclr", "star")):
        adapter = build()
        with star_heads.value_checks(adapter.check_finite is False), pytest.raises((HostSyncError, NotImplementedError)):
            with HostSyncGuard("meta"):
                _step(adapter, hs, params, True)


def test_losses_make_no_host_sync():
    a, b = (torch.randn(B, D, device="meta", requires_grad=True) for _ in range(2))
    with HostSyncGuard("meta") as guard:
        for loss in (nt_xent(a, b), equivariant_nt_xent(a, b, anchors="first"), vicreg(a, b).loss):
            loss.backward()
    assert guard.events == []


def test_cca_monitor_update_makes_no_host_read_between_results():
    """On the CPU (the meta meter is the xfail above): update reads nothing back until its compute step."""
    g = torch.Generator().manual_seed(0)
    monitor = CCAMonitor(every=3)
    x, y = torch.randn(64, 4, generator=g), torch.randn(64, 3, generator=g)
    with HostSyncGuard("cpu") as guard:
        assert monitor.update(x, y) is None and monitor.update(x, y) is None
    assert guard.events == []
    with pytest.raises(HostSyncError), HostSyncGuard("cpu"):
        monitor.update(x, y)  # the compute step: a host read by design


def test_as_dict_reads_every_loss_exactly():
    adapter = _adapter("vicreg", "star", device="cpu")
    hs, params = _inputs("cpu")
    out = _step(adapter, hs, params, True)
    flat = out.as_dict(routing=False)  # one stacked read: the values are the tensors' own
    assert flat["loss"] == out.loss.item() and flat["eq/covariance"] == out.losses["eq/covariance"].item()
    assert set(flat) == {"loss", *out.losses}
    with pytest.raises(TypeError, match="prefix must be a str, got NoneType None"):
        out.as_dict(None)


# ----------------------------------------------------------------------------- VICReg's covariance term
@pytest.mark.parametrize("d", [1, 2, 3, 16, 64, 200])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_covariance_term_equals_masked_select_and_float64_numpy(d, dtype):
    from star_heads.losses._numerics import off_diagonal_square_mean

    g = torch.Generator().manual_seed(d)
    z = (torch.randn(40, d, generator=g, dtype=torch.float64) * torch.rand(d, generator=g, dtype=torch.float64)).to(dtype)
    centred = z - z.mean(0)
    cov = centred.T @ centred / 39
    selected = cov.square().masked_select(~torch.eye(d, dtype=torch.bool)).sum() / d  # the syncing formulation
    got = off_diagonal_square_mean(z)
    zn = z.double().numpy()
    c = np.cov(zn, rowvar=False, ddof=1).reshape(d, d)
    want = (np.square(c).sum() - np.square(np.diag(c)).sum()) / d
    # the same terms summed in another order: equal to a few ulps of the sum (not bitwise; reduction order differs)
    eps = torch.finfo(dtype).eps
    assert got.dtype == dtype
    assert abs(got.item() - selected.item()) <= 8 * eps * max(selected.item(), 1e-30) * max(1, np.log2(d * d))
    assert got.item() == pytest.approx(want, rel=50 * eps, abs=1e-300)
    if d == 1:
        assert got.item() == 0.0


@pytest.mark.parametrize("scale", [1e-30, 1.0, 1e10, 1e60])
def test_vicreg_matches_float64_numpy_at_any_scale(scale, device):
    if device.type == "mps":
        pytest.skip("MPS has no float64")
    g = torch.Generator().manual_seed(1)
    z1 = torch.randn(32, 6, generator=g, dtype=torch.float64) * scale
    z2 = torch.randn(32, 6, generator=g, dtype=torch.float64) * scale
    out = vicreg(z1.to(device), z2.to(device))
    want = 0.0
    for z in (z1.numpy() / scale, z2.numpy() / scale):  # c(Z) is homogeneous of degree 4: unit scale, then scale⁴
        c = np.cov(z, rowvar=False, ddof=1)
        want += (np.square(c).sum() - np.square(np.diag(c)).sum()) / z.shape[1]
    assert np.isfinite(out.loss.item())
    assert out.covariance.item() == pytest.approx(want * scale**4, rel=1e-10)


def test_float32_covariance_is_finite_where_the_naive_sum_overflows():
    """float32 embeddings whose Cov² entries fit but whose sum over d² entries overflows (the naive term is inf)."""
    d, n = 48, 256
    base = torch.randn(n, 1, generator=torch.Generator().manual_seed(2)).expand(n, d).contiguous()  # collapsed
    z = base * 1e9
    centred = z - z.mean(0)
    naive = (centred.T @ centred / (n - 1)).square().masked_fill(torch.eye(d, dtype=torch.bool), 0).sum() / d
    assert not torch.isfinite(naive)
    got = vicreg(z, z.clone()).covariance
    var = np.var(base[:, 0].double().numpy(), ddof=1) * 1e18
    want = var**2 * (d - 1) * 2  # c(Z) + c(Z'): every Cov_ij equals the variance
    assert torch.isfinite(got) and got.item() == pytest.approx(want, rel=1e-4)


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_a_training_step_on_the_device_under_test(name, device):
    """On ``pytest --device cuda`` the step runs under CUDA's own sync debugging (errors on a sync); on the CPU it
    runs the same step and checks it trains the head."""
    adapter = _adapter(name, "star", device=device, cca_every=1000)
    hs, params = _inputs(device, local=1)
    sync_mode = torch.cuda.get_sync_debug_mode() if device.type == "cuda" else None
    if device.type == "cuda":
        _step(adapter, hs[:3], params, True, local=hs[3:])  # warm-up (allocator, cuBLAS handles)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
    try:
        out = _step(adapter, hs[:3], params, True, local=hs[3:])
    finally:
        if sync_mode is not None:
            torch.cuda.set_sync_debug_mode(sync_mode)
    assert out.loss.device.type == device.type
    assert all(p.grad is not None for p in adapter.predictor.parameters())
