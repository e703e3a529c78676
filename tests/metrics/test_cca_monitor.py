"""CCAMonitor: results every `every` steps over the right window, detaching, logging, errors."""

import pytest
import torch

from star_heads.metrics import CCAMonitor, CCAResult, canonical_correlations


def _steps(k, b=64, p=6, q=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(k):
        x = torch.randn(b, p, generator=g)
        y = torch.cat([x[:, :2] + 0.5 * torch.randn(b, 2, generator=g), torch.randn(b, q - 2, generator=g)], 1)
        out.append((x, y))
    return out


def _ref(batches):
    return canonical_correlations(torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]))


def test_disjoint_windows_every_k_steps():
    batches = _steps(9)
    logged = []
    monitor = CCAMonitor(every=3, log=lambda step, r: logged.append((step, r)))
    outs = [monitor.update(x, y) for x, y in batches]
    assert [o is not None for o in outs] == [False, False, True] * 3
    for i, o in enumerate(outs[2::3]):
        assert isinstance(o, CCAResult) and o.n == 3 * 64 and o.null_mean is not None
        torch.testing.assert_close(o.correlations, _ref(batches[3 * i:3 * i + 3]), atol=1e-10, rtol=0)
    assert monitor.last is outs[-1]
    assert [s for s, _ in logged] == [3, 6, 9] and logged[-1][1] is outs[-1]


def test_sliding_window_covers_the_last_window_steps():
    batches = _steps(8)
    monitor = CCAMonitor(every=2, window=6, null_baseline=False)
    outs = [monitor.update(x, y) for x, y in batches]
    assert outs[1].n == 128 and outs[3].n == 256 and outs[5].n == 384 and outs[7].n == 384
    torch.testing.assert_close(outs[7].correlations, _ref(batches[2:8]), atol=1e-10, rtol=0)
    torch.testing.assert_close(outs[3].correlations, _ref(batches[0:4]), atol=1e-10, rtol=0)
    assert outs[7].null_mean is None


def test_detaches_inputs_and_ignores_autocast():
    batches = _steps(2)
    w = torch.randn(6, 6, requires_grad=True)
    monitor = CCAMonitor(every=2)
    seen = []
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for x, y in batches:
            z = x @ w  # bf16, part of an autograd graph
            seen.append((z.detach(), y))
            out = monitor.update(z, y)
    assert z.dtype == torch.bfloat16 and z.requires_grad and not out.correlations.requires_grad
    ref = _ref(seen)
    torch.testing.assert_close(out.correlations, ref, atol=1e-10, rtol=0)


def test_reset_restarts_the_count():
    batches = _steps(4)
    monitor = CCAMonitor(every=2)
    assert monitor.update(*batches[0]) is None
    monitor.reset()
    assert monitor.update(*batches[1]) is None
    out = monitor.update(*batches[2])
    torch.testing.assert_close(out.correlations, _ref(batches[1:3]), atol=1e-10, rtol=0)


def test_bad_arguments_and_inputs():
    with pytest.raises(ValueError, match="multiple of every=4"):
        CCAMonitor(every=4, window=6)
    with pytest.raises(ValueError, match="every must be >= 1"):
        CCAMonitor(every=0)
    with pytest.raises(ValueError, match="ridge"):
        CCAMonitor(ridge=-0.1)
    monitor = CCAMonitor(every=2)
    with pytest.raises(ValueError, match="2 dimensions"):
        monitor.update(torch.randn(8), torch.randn(8, 2))
    with pytest.raises(TypeError, match="torch.Tensor"):
        monitor.update([[1.0]], torch.randn(1, 2))
    monitor.update(torch.randn(64, 6), torch.randn(64, 4))
    with pytest.raises(ValueError, match=r"expected x \[n, 6\]"):
        monitor.update(torch.randn(64, 5), torch.randn(64, 4))
    with pytest.raises(ValueError, match="same number of samples"):
        monitor.update(torch.randn(64, 6), torch.randn(63, 4))
    assert monitor.steps == 1  # rejected steps are not counted


def test_non_finite_embeddings_raise_at_the_reporting_step():
    monitor = CCAMonitor(every=2)
    assert monitor.update(torch.full((64, 3), float("nan")), torch.randn(64, 3)) is None  # no per-step sync
    with pytest.raises(ValueError, match="not finite"):
        monitor.update(torch.randn(64, 3), torch.randn(64, 3))


def test_too_small_window_raises_with_needed_n():
    monitor = CCAMonitor(every=1)
    with pytest.raises(ValueError, match=r"n=8 .*need n >= 10"):
        monitor.update(torch.randn(8, 8), torch.randn(8, 4))
