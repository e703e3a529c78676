"""One-shot CCA functions against independent scipy oracles, planted correlations and properties."""

import warnings

import numpy as np
import pytest
import torch
from cca_oracle import cca_orth, cca_textbook, planted, pwcca_oracle, svcca_oracle
from hypothesis import given
from hypothesis import strategies as st

from star_heads.metrics import (
    CCASampleSizeWarning,
    canonical_correlations,
    mean_canonical_correlation,
    pwcca,
    svcca,
)


def _t(a, dtype=torch.float64):
    return torch.as_tensor(np.asarray(a), dtype=dtype)


def _data(seed, n, p, q, shared=2):
    x, y = planted(n, [0.8, 0.4][:shared], p, q, seed=seed)
    return _t(x), _t(y)


# ---------------------------------------------------------------- oracle agreement
@pytest.mark.parametrize("n,p,q", [(200, 5, 7), (500, 16, 16), (1000, 40, 12)])
def test_matches_textbook_and_orth_oracles(n, p, q):
    x, y = _data(n, n, p, q)
    got = canonical_correlations(x, y).numpy()
    assert got.shape == (min(p, q),)
    np.testing.assert_allclose(got, cca_textbook(x.numpy(), y.numpy()), atol=1e-10)
    np.testing.assert_allclose(got, cca_orth(x.numpy(), y.numpy()), atol=1e-12)
    assert float(mean_canonical_correlation(x, y)) == pytest.approx(got.mean(), abs=1e-14)


def test_planted_correlations_recovered():
    rho = [0.9, 0.6, 0.3]
    x, y = planted(40000, rho, 6, 5, seed=1)
    got = canonical_correlations(_t(x), _t(y)).numpy()
    sd = (1 - np.asarray(rho) ** 2) / np.sqrt(40000)
    assert np.all(np.abs(got[:3] - rho) < 4 * sd + 1e-3)
    assert np.all(got[3:] < 0.03)  # the zero correlations, biased up by O(sqrt(pq)/n)


def test_float32_input_float64_output_on_x_device():
    x, y = _data(0, 300, 8, 8)
    got = canonical_correlations(x.float(), y.float())
    assert got.dtype == torch.float64 and got.device == x.device
    np.testing.assert_allclose(got.numpy(), cca_orth(x.float().numpy(), y.float().numpy()), atol=1e-10)


# ---------------------------------------------------------------- properties (hypothesis)
dims = st.tuples(st.integers(0, 10_000), st.integers(1, 12), st.integers(1, 12))


@given(dims, st.integers(0, 10_000))
def test_invariant_to_invertible_linear_maps(d, seed2):
    seed, p, q = d
    x, y = _data(seed, 120, p, q, shared=min(2, p, q))
    rng = np.random.default_rng(seed2)
    qa, _ = np.linalg.qr(rng.standard_normal((p, p)))
    a = _t(qa * np.exp(rng.uniform(-2, 2, p)))  # condition number <= e^4
    qb, _ = np.linalg.qr(rng.standard_normal((q, q)))
    b = _t(qb * np.exp(rng.uniform(-2, 2, q)))
    ref = canonical_correlations(x, y)
    torch.testing.assert_close(canonical_correlations(x @ a, y), ref, atol=1e-9, rtol=0)
    torch.testing.assert_close(canonical_correlations(x, y @ b), ref, atol=1e-9, rtol=0)


@given(dims)
def test_invariant_to_column_permutation_and_translation(d):
    seed, p, q = d
    x, y = _data(seed, 100, p, q, shared=min(2, p, q))
    g = torch.Generator().manual_seed(seed)
    ref = canonical_correlations(x, y)
    px, py = torch.randperm(p, generator=g), torch.randperm(q, generator=g)
    torch.testing.assert_close(canonical_correlations(x[:, px], y[:, py]), ref, atol=1e-10, rtol=0)
    shift = torch.randn(p, generator=g, dtype=torch.float64) * 1e3
    torch.testing.assert_close(canonical_correlations(x + shift, y - 7.0), ref, atol=1e-9, rtol=0)


@given(dims)
def test_symmetric_bounded_and_self_correlation_one(d):
    seed, p, q = d
    x, y = _data(seed, 80, p, q, shared=min(2, p, q))
    xy, yx = canonical_correlations(x, y), canonical_correlations(y, x)
    torch.testing.assert_close(xy, yx, atol=1e-12, rtol=0)
    assert bool(((xy >= 0) & (xy <= 1)).all())
    assert bool((xy[:-1] >= xy[1:]).all())  # sorted descending
    torch.testing.assert_close(canonical_correlations(x, x), torch.ones(p, dtype=torch.float64), atol=1e-12, rtol=0)


# ---------------------------------------------------------------- degenerate inputs
def test_constant_and_duplicated_columns_drop_rank():
    x, y = _data(3, 300, 6, 5)
    xd = torch.cat([x, torch.full((300, 1), 4.2, dtype=torch.float64), x[:, :2], x[:, :1] + x[:, 1:2]], dim=1)
    got = canonical_correlations(xd, y)
    assert got.shape == (5,)
    torch.testing.assert_close(got, canonical_correlations(x, y), atol=1e-10, rtol=0)


def test_collapsed_float32_embedding_uses_its_true_rank():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2000, 4, generator=g)
    z = h @ torch.randn(4, 128, generator=g)  # rank 4 in float32 (rounding noise ~1e-7 relative)
    y = torch.cat([h[:, :2], torch.randn(2000, 6, generator=g)], dim=1)
    got = canonical_correlations(z, y)
    assert got.shape == (4,)
    np.testing.assert_allclose(got.numpy(), cca_orth(h.double().numpy(), y.double().numpy()), atol=1e-6)
    assert got[0] > 0.999 and got[1] > 0.999


@pytest.mark.parametrize("value", [1.0, 0.1, 4.2, 1 / 3, 1e-200 / 3, 1e6 / 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_constant_view_gives_empty_correlations_and_zero_mean(value, dtype):
    # a mean that is not exactly representable leaves a rounding residue after centring: still rank 0
    x = torch.full((301, 3), value, dtype=dtype)
    y = torch.randn(301, 4, generator=torch.Generator().manual_seed(0))
    assert canonical_correlations(x, y).shape == (0,)
    assert float(mean_canonical_correlation(x, y)) == 0.0
    assert float(svcca(x, y)) == 0.0 and float(pwcca(x, y)) == 0.0
    mixed = torch.cat([torch.randn(301, 2, dtype=dtype), x], dim=1)  # constant columns next to data: dropped
    assert canonical_correlations(mixed, y).shape == (2,)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(dtype):
    x, y = _data(4, 400, 8, 8)
    xh, yh = x.to(dtype), y.to(dtype)
    got = canonical_correlations(xh, yh)
    assert torch.isfinite(got).all()
    np.testing.assert_allclose(got.numpy(), cca_orth(xh.double().numpy(), yh.double().numpy()), atol=1e-9)


@pytest.mark.parametrize("scale,dtype", [(1e30, torch.float32), (1e-30, torch.float32), (1e200, torch.float64),
                                         (1e-200, torch.float64)])
def test_huge_and_tiny_scales(scale, dtype):
    x, y = _data(5, 300, 6, 6)
    ref = canonical_correlations(x.to(dtype), y)
    got = canonical_correlations(x.to(dtype) * scale, y * scale)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=0)


def test_autocast_and_grad_are_ignored():
    x, y = _data(6, 300, 8, 8)
    ref = canonical_correlations(x, y)
    xr = x.float().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = canonical_correlations(xr, y.float())
    assert not got.requires_grad
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=0)


def test_ridge_shrinks_towards_zero_and_matches_regularised_oracle():
    x, y = _data(7, 400, 6, 5)
    plain, reg = canonical_correlations(x, y), canonical_correlations(x, y, ridge=0.5)
    assert bool((reg <= plain + 1e-12).all()) and float(reg.sum()) < float(plain.sum())
    xc, yc = x.numpy() - x.numpy().mean(0), y.numpy() - y.numpy().mean(0)
    cxx, cyy, cxy = xc.T @ xc / 399, yc.T @ yc / 399, xc.T @ yc / 399
    cxx += 0.5 * np.trace(cxx) / 6 * np.eye(6)
    cyy += 0.5 * np.trace(cyy) / 5 * np.eye(5)
    w = np.linalg.inv(np.linalg.cholesky(cxx)) @ cxy @ np.linalg.inv(np.linalg.cholesky(cyy)).T
    np.testing.assert_allclose(reg.numpy(), np.linalg.svd(w, compute_uv=False), atol=1e-10)


# ---------------------------------------------------------------- svcca / pwcca parity
def test_svcca_matches_oracle_and_reduces_dimensions():
    g = np.random.default_rng(8)
    x = g.standard_normal((500, 20)) * np.geomspace(10, 0.01, 20)  # ~all variance in few directions
    y = np.concatenate([x[:, :3] + 0.1 * g.standard_normal((500, 3)), g.standard_normal((500, 5))], axis=1)
    got = float(svcca(_t(x), _t(y), keep=0.99))
    assert got == pytest.approx(svcca_oracle(x, y, 0.99), abs=1e-12)
    assert got != pytest.approx(float(mean_canonical_correlation(_t(x), _t(y))), abs=1e-3)
    assert float(svcca(_t(x), _t(y), keep=1.0)) == pytest.approx(float(mean_canonical_correlation(_t(x), _t(y))))


@pytest.mark.parametrize("p,q", [(6, 9), (9, 6), (7, 7)])
def test_pwcca_matches_google_formula(p, q):
    x, y = _data(9, 600, p, q)
    got = float(pwcca(x, y))
    assert got == pytest.approx(pwcca_oracle(x.numpy(), y.numpy()), abs=1e-10)
    assert got != pytest.approx(float(mean_canonical_correlation(x, y)), abs=1e-3)


# ---------------------------------------------------------------- sample size and bad input
def test_too_few_samples_raise_with_needed_n():
    x, y = torch.randn(129, 128), torch.randn(129, 16)
    with pytest.raises(ValueError, match=r"n=129.*need n >= 130"):
        canonical_correlations(x, y)
    for fn in (mean_canonical_correlation, svcca, pwcca):
        with pytest.raises(ValueError, match="trivially 1"):
            fn(x, y)


def test_warns_below_twice_the_dimensions():
    x, y = torch.randn(100, 20), torch.randn(100, 30)
    with pytest.warns(CCASampleSizeWarning, match=r"n=99 .*2\(p \+ q\) = 100"):
        pass_n = canonical_correlations(x[:99], y[:99])
    assert pass_n.shape == (20,)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        canonical_correlations(x, y)  # n = 2(p + q): no warning


@pytest.mark.parametrize(
    "x,y,err,match",
    [
        (torch.randn(10, 2), torch.randn(11, 2), ValueError, r"same number of samples.*\(10, 2\).*\(11, 2\)"),
        (torch.randn(10), torch.randn(10, 2), ValueError, "x must have 2 dimensions"),
        (torch.randn(10, 2), torch.randn(10, 2, 1), ValueError, "y must have 2 dimensions"),
        (torch.randn(10, 2), torch.ones(10, 2, dtype=torch.int64), TypeError, "floating-point.*int64"),
        (np.ones((10, 2)), torch.randn(10, 2), TypeError, "torch.Tensor"),
        (torch.randn(0, 2), torch.randn(0, 2), ValueError, "non-empty"),
        (torch.randn(10, 0), torch.randn(10, 2), ValueError, "non-empty"),
        (torch.tensor([[1.0], [float("nan")], [2.0], [3.0]]), torch.randn(4, 1), ValueError, "x contains NaN"),
        (torch.randn(4, 1), torch.tensor([[1.0], [float("inf")], [2.0], [3.0]]), ValueError, "y contains NaN or Inf"),
        (torch.randn(10, 2), torch.empty(10, 2, device="meta"), ValueError, "same device"),
    ],
)
def test_bad_input_raises(x, y, err, match):
    for fn in (canonical_correlations, mean_canonical_correlation, svcca, pwcca):
        with pytest.raises(err, match=match):
            fn(x, y)


@pytest.mark.parametrize("kw", [{"ridge": -1.0}, {"ridge": float("nan")}, {"rank_tol": 1.0}, {"rank_tol": -0.1}])
def test_bad_options_raise(kw):
    with pytest.raises(ValueError, match=next(iter(kw))):
        canonical_correlations(torch.randn(20, 2), torch.randn(20, 2), **kw)


@pytest.mark.parametrize("kw", [{"ridge": "0.1"}, {"ridge": True}, {"rank_tol": "1e-3"}])
def test_option_of_wrong_type_raises_type_error(kw):
    with pytest.raises(TypeError, match=f"{next(iter(kw))} must be a real number, got"):
        canonical_correlations(torch.randn(20, 2), torch.randn(20, 2), **kw)


@pytest.mark.parametrize("keep,err", [(0.0, ValueError), (1.5, ValueError), (True, TypeError), (None, TypeError)])
def test_svcca_bad_keep(keep, err):
    with pytest.raises(err, match="keep"):
        svcca(torch.randn(20, 2), torch.randn(20, 2), keep=keep)


# ---------------------------------------------------------------- covariance route vs QR/SVD fallback
def _conditioned(seed, spread, n=2000, p=24, q=16):
    """x with eigenvalue spread λ_max/λ_min = ``spread`` (singular values geometric), y correlated with it."""
    rng = np.random.default_rng(seed)
    x0 = rng.standard_normal((n, p))
    y = np.concatenate([0.7 * x0[:, :q // 2] + rng.standard_normal((n, q // 2)), rng.standard_normal((n, q - q // 2))], 1)
    qa, _ = np.linalg.qr(rng.standard_normal((p, p)))
    qb, _ = np.linalg.qr(rng.standard_normal((p, p)))
    a = qa @ np.diag(np.geomspace(1.0, spread ** -0.5, p)) @ qb.T
    return x0 @ a + 5.0, y


@pytest.mark.parametrize("spread", [1e2, 1e5, 0.9e6, 1e8, 1e10])
def test_any_conditioning_stays_within_1e10_of_the_oracle(spread):
    x, y = _conditioned(int(np.log10(spread)), spread)
    got = canonical_correlations(_t(x), _t(y)).numpy()
    np.testing.assert_allclose(got, cca_orth(x, y), atol=1e-10)


def test_route_choice_follows_the_spectrum(monkeypatch):
    from star_heads.metrics import cca as cca_module

    calls = []
    original = cca_module._qr_svd
    monkeypatch.setattr(cca_module, "_qr_svd", lambda *a: calls.append(1) or original(*a))
    for spread, fallback in [(1e4, False), (0.9e6, False), (1e8, True)]:
        calls.clear()
        x, y = _conditioned(0, spread)
        canonical_correlations(_t(x), _t(y))
        assert bool(calls) is fallback, spread
    x, y = _data(1, 500, 8, 6)
    small = torch.randn(500, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    near_cut = torch.cat([x, small * 3e-5 * float(x.std())], dim=1)  # an independent direction just above the cut-off
    calls.clear()
    assert canonical_correlations(near_cut, y).shape == (6,) and calls  # kept but ill-conditioned: fallback
    calls.clear()
    canonical_correlations(torch.cat([x, x[:, :2] * 3.0], dim=1), y)  # exact duplicates: clearly dropped
    assert not calls
    calls.clear()
    canonical_correlations(x, y, rank_tol=0.0)  # full rank and well conditioned: covariance route
    assert not calls


def test_rank_cut_off_decisions_match_the_svd_of_the_data():
    x, y = _data(2, 800, 6, 6)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(800, 3, generator=g, dtype=torch.float64)
    for rel, kept in [(3e-5, True), (3e-6, False), (1e-9, False)]:
        xd = torch.cat([x, noise * rel * float(x.std())], dim=1)
        s = torch.linalg.svdvals(xd - xd.mean(0))
        assert bool((s > 1e-5 * s[0]).sum() == 9) is kept
        got = canonical_correlations(xd, y)
        np.testing.assert_allclose(got.numpy(), cca_orth(xd.numpy(), y.numpy()), atol=1e-10)


@pytest.mark.parametrize("scale_x,scale_y", [(1e-200, 1e-200), (1e200, 1e200), (1e-200, 1e200), (1e-300, 1e300)])
def test_every_entry_point_is_scale_invariant_over_float64(scale_x, scale_y):
    x, y = _data(5, 300, 6, 6)
    xs, ys = x * scale_x, y * scale_y
    torch.testing.assert_close(canonical_correlations(xs, ys), canonical_correlations(x, y), atol=1e-12, rtol=0)
    assert float(svcca(xs, ys)) == pytest.approx(float(svcca(x, y)), abs=1e-12)
    assert float(svcca(xs, ys)) == pytest.approx(svcca_oracle(x.numpy(), y.numpy()), abs=1e-12)
    assert float(pwcca(xs, ys)) == pytest.approx(float(pwcca(x, y)), abs=1e-12)
    assert float(svcca(xs, ys)) > 0.1 and float(pwcca(xs, ys)) > 0.1
    reg = canonical_correlations(xs, ys, ridge=0.2)
    torch.testing.assert_close(reg, canonical_correlations(x, y, ridge=0.2), atol=1e-12, rtol=0)
