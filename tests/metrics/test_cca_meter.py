"""CCAMeter: streaming == one-shot, merge / sync exactness, null baseline, errors, DDP with gloo."""

import copy
import pickle

import numpy as np
import pytest
import torch
import torch.distributed as dist
from cca_oracle import cca_orth, planted
from dist_utils import run_distributed
from hypothesis import given
from hypothesis import strategies as st

from star_heads.metrics import (
    CCAMeter,
    CCAMonitor,
    CCAResult,
    CCASampleSizeWarning,
    canonical_correlations,
    mean_canonical_correlation,
    null_mean_canonical_correlation,
    svcca,
)


def _data(seed, n=600, p=7, q=5, rho=(0.9, 0.5)):
    x, y = planted(n, list(rho), p, q, seed=seed)
    return torch.as_tensor(x), torch.as_tensor(y)


def _fed(x, y, sizes, **kw):
    meter = CCAMeter(x.shape[1], y.shape[1], **kw)
    start = 0
    for size in sizes:
        meter.update(x[start:start + size], y[start:start + size])
        start += size
    return meter


def _splits(total):
    return st.lists(st.integers(1, total), min_size=1, max_size=6).map(
        lambda cuts: np.diff([0, *sorted({c for c in cuts if c < total}), total]).tolist()
    )


@given(st.integers(0, 10_000), _splits(600))
def test_streaming_equals_one_shot_for_any_split(seed, sizes):
    x, y = _data(seed)
    result = _fed(x, y, sizes, null_baseline=False).compute()
    ref = canonical_correlations(x, y)
    torch.testing.assert_close(result.correlations, ref, atol=1e-10, rtol=0)
    assert result.mean == pytest.approx(float(ref.mean()), abs=1e-10)
    assert (result.rank_x, result.rank_y, result.n) == (7, 5, 600)


@given(st.integers(0, 10_000), st.integers(1, 598), st.integers(1, 598))
def test_merge_is_associative_and_exact(seed, i, j):
    x, y = _data(seed)
    i, j = sorted((i, j))
    j = max(j, i + 1)
    parts = [(x[:i], y[:i]), (x[i:j], y[i:j]), (x[j:] + 0, y[j:])]
    a, b, c = (_fed(px, py, [len(px)]) for px, py in parts)
    left = CCAMeter(7, 5, null_baseline=False).merge(CCAMeter(7, 5).merge(a).merge(b)).merge(c).compute()
    bc = CCAMeter(7, 5).merge(b).merge(c)
    right = CCAMeter(7, 5, null_baseline=False).merge(a).merge(bc).compute()
    ref = canonical_correlations(x, y)
    torch.testing.assert_close(left.correlations, ref, atol=1e-10, rtol=0)
    torch.testing.assert_close(right.correlations, left.correlations, atol=1e-10, rtol=0)


def test_large_offsets_stay_accurate():
    x, y = _data(1)
    x, y = x + 1e6, y - 3e5  # naive Σxx^T − n μμ^T would lose ~12 digits here
    batches = [(x[k:k + 100] + 0.0, y[k:k + 100]) for k in range(0, 600, 100)]
    meters = [_fed(bx, by, [100]) for bx, by in batches]
    merged = CCAMeter(7, 5)
    for m in meters:
        merged.merge(m)
    torch.testing.assert_close(merged.compute().correlations, canonical_correlations(x, y), atol=1e-9, rtol=0)


def test_rank_deficient_and_constant_views_match_one_shot():
    x, y = _data(2, n=800)
    xd = torch.cat([x, x[:, :3] * 2.0, torch.full((800, 2), 5.0, dtype=torch.float64)], dim=1)
    r = _fed(xd, y, [300, 500]).compute()
    assert r.rank_x == 7
    np.testing.assert_allclose(r.correlations.numpy(), cca_orth(xd.numpy(), y.numpy()), atol=1e-10)
    const = _fed(torch.ones(800, 4), y, [800]).compute()
    assert (const.rank_x, const.correlations.numel(), const.mean, const.null_mean) == (0, 0, 0.0, 0.0)
    for value in (0.1, 1 / 3, 1e-200 / 3):  # means that are not exactly representable
        const = _fed(torch.full((800, 4), value, dtype=torch.float64), y, [300, 500]).compute()
        assert (const.rank_x, const.correlations.numel()) == (0, 0)


def test_float32_collapsed_embedding_rank_matches_one_shot():
    g = torch.Generator().manual_seed(3)
    h = torch.randn(3000, 5, generator=g)
    z, y = h @ torch.randn(5, 64, generator=g), torch.randn(3000, 9, generator=g)
    r = _fed(z, y, [1000, 2000]).compute()
    ref = canonical_correlations(z, y)
    assert r.rank_x == 5 and ref.numel() == 5
    torch.testing.assert_close(r.correlations, ref, atol=1e-8, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_and_autocast(dtype):
    x, y = _data(4)
    xh, yh = x.to(dtype), y.to(dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        r = _fed(xh, yh, [200, 400]).compute()
    torch.testing.assert_close(r.correlations, canonical_correlations(xh, yh), atol=1e-9, rtol=0)


@pytest.mark.parametrize("scale", [1e30, 1e-30])
def test_extreme_float32_scales(scale):
    x, y = _data(5)
    r = _fed((x * scale).float(), y.float(), [600]).compute()
    torch.testing.assert_close(r.correlations, canonical_correlations(x.float(), y.float()), atol=1e-8, rtol=0)


def test_ridge_matches_one_shot():
    x, y = _data(6)
    r = _fed(x, y, [250, 350], ridge=0.3).compute()
    torch.testing.assert_close(r.correlations, canonical_correlations(x, y, ridge=0.3), atol=1e-10, rtol=0)
    assert r.null_mean < _fed(x, y, [600]).compute().null_mean  # shrinkage lowers the null too


# ---------------------------------------------------------------- null baseline
def test_null_matches_independent_data_and_shuffled_pairing():
    n, p = 700, 24
    observed, shuffled = [], []
    for seed in range(6):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(n, p, generator=g, dtype=torch.float64) @ torch.randn(p, p, generator=g, dtype=torch.float64)
        y = torch.rand(n, p, generator=g, dtype=torch.float64) ** 3  # non-Gaussian, skewed
        observed.append(float(mean_canonical_correlation(x, y)))
        xp, yp = planted(n, [0.9, 0.8, 0.7], p, p, seed=seed)  # shuffle a correlated pair
        perm = np.random.default_rng(seed).permutation(n)
        shuffled.append(float(np.mean(cca_orth(xp, yp[perm]))))
    null = _fed(x, y, [n]).compute().null_mean
    assert 0.15 < null < 0.3  # far from 0: the bias at n ≈ 15(p + q)
    assert np.mean(observed) == pytest.approx(null, abs=0.01)
    assert np.mean(shuffled) == pytest.approx(null, abs=0.01)


def test_null_clearly_below_planted_value_and_shrinks_with_n():
    x, y = planted(4000, [0.9, 0.7, 0.5, 0.3], 16, 16, seed=7)
    r = _fed(torch.as_tensor(x), torch.as_tensor(y), [1000] * 4).compute()
    assert r.mean > r.null_mean + 0.1 and r.excess == pytest.approx(r.mean - r.null_mean)
    ones = torch.ones(16, dtype=torch.float64)
    nulls = [null_mean_canonical_correlation(n, ones, ones) for n in (100, 1000, 10000)]
    assert nulls[0] > nulls[1] > nulls[2] > 0
    assert null_mean_canonical_correlation(1000, ones, ones) == nulls[1]  # deterministic


def test_null_disabled():
    x, y = _data(8)
    assert _fed(x, y, [600], null_baseline=False).compute().null_mean is None


# ---------------------------------------------------------------- state, pickling, errors
def test_reset_pickle_and_result_is_frozen():
    x, y = _data(9)
    meter = _fed(x, y, [600])
    clone = pickle.loads(pickle.dumps(meter))
    torch.testing.assert_close(clone.compute().correlations, meter.compute().correlations, atol=0, rtol=0)
    result = meter.compute()
    assert isinstance(result, CCAResult)
    with pytest.raises(AttributeError):
        result.mean = 0.0
    meter.reset()
    assert meter.n == 0
    meter.update(x[:300], y[:300])
    torch.testing.assert_close(meter.compute().correlations, canonical_correlations(x[:300], y[:300]), atol=1e-10, rtol=0)


def test_bad_updates_raise_before_changing_state():
    x, y = _data(10)
    meter = _fed(x, y, [600])
    before = meter.compute().correlations
    bad = [
        ((x[:10, :6], y[:10]), ValueError, r"expected x \[n, 7\]"),
        ((x[:10], y[:11]), ValueError, "same number of samples"),
        ((x[:10].int(), y[:10]), TypeError, "floating-point"),
        ((x[:10, 0], y[:10]), ValueError, "2 dimensions"),
        ((torch.full((10, 7), float("nan")), y[:10]), ValueError, "NaN"),
        ((x[:0], y[:0]), ValueError, "non-empty"),
    ]
    for args, err, match in bad:
        with pytest.raises(err, match=match):
            meter.update(*args)
    assert meter.n == 600
    torch.testing.assert_close(meter.compute().correlations, before, atol=0, rtol=0)


def test_compute_errors_and_bad_construction():
    meter = CCAMeter(8, 4)
    meter.update(torch.randn(9, 8), torch.randn(9, 4))
    with pytest.raises(ValueError, match=r"n=9.*need n >= 10"):
        meter.compute()
    unchecked = CCAMeter(2, check_finite=False)
    unchecked.update(torch.tensor([[1.0, float("inf")]] * 10), torch.randn(10, 2))
    with pytest.raises(ValueError, match="not finite"):
        unchecked.compute()
    with pytest.raises(ValueError, match="cannot merge"):
        CCAMeter(3).merge(CCAMeter(4))
    with pytest.raises(TypeError, match="CCAMeter"):
        CCAMeter(3).merge("x")
    with pytest.raises(ValueError, match="p must be >= 1"):
        CCAMeter(0)
    with pytest.raises(TypeError, match="q must be an int"):
        CCAMeter(3, 2.5)
    with pytest.raises(ValueError, match="ridge"):
        CCAMeter(3, ridge=-1.0)
    with pytest.raises(TypeError, match="null_baseline must be a bool"):
        CCAMeter(3, null_baseline="yes")
    with pytest.raises(TypeError, match="check_finite must be a bool"):
        CCAMeter(3, check_finite=1)


def test_sync_without_distributed_keeps_the_statistics_but_guards():
    x, y = _data(11)
    meter = _fed(x, y, [600])
    before = meter.compute().correlations
    assert meter.sync() is meter and meter.n == 600 and meter.synced
    torch.testing.assert_close(meter.compute().correlations, before, atol=0, rtol=0)
    for action in (lambda: meter.sync(), lambda: meter.update(x[:10], y[:10]), lambda: meter.merge(_fed(x, y, [10])),
                   lambda: CCAMeter(7, 5).merge(meter)):
        with pytest.raises(RuntimeError, match="unsync"):
            action()
    assert meter.unsync() is meter and not meter.synced and meter.n == 600
    with pytest.raises(RuntimeError, match="not synced"):
        meter.unsync()
    with meter.sync_context() as synced:
        assert synced.synced and synced.compute().n == 600
    assert not meter.synced
    meter.update(x[:10], y[:10])
    assert meter.n == 610


def test_self_merge_is_refused_and_a_copy_counts_twice():
    x, y = _data(13)
    meter = _fed(x, y, [600])
    with pytest.raises(ValueError, match="into itself"):
        meter.merge(meter)
    assert meter.n == 600
    doubled = meter.merge(copy.deepcopy(meter))
    assert doubled.n == 1200
    ref = canonical_correlations(torch.cat([x, x]), torch.cat([y, y]))
    torch.testing.assert_close(doubled.compute().correlations, ref, atol=1e-10, rtol=0)


@pytest.mark.parametrize("scale_x,scale_y", [(1e-200, 1e-200), (1e200, 1e200), (1e-200, 1e200), (1e-300, 1e300)])
def test_meter_is_scale_invariant_over_float64(scale_x, scale_y):
    x, y = _data(14)
    ref = canonical_correlations(x, y)
    r = _fed(x * scale_x, y * scale_y, [100, 250, 250], svcca_keep=0.99).compute()
    torch.testing.assert_close(r.correlations, ref, atol=1e-10, rtol=0)
    assert r.svcca == pytest.approx(float(svcca(x, y, keep=0.99)), abs=1e-10)
    assert r.null_mean == _fed(x, y, [600]).compute().null_mean


def test_meter_follows_a_scale_that_changes_between_batches():
    x, y = _data(15)
    # batches whose magnitudes differ by up to 1e300: the statistics are re-scaled by exact powers of two
    for factors in [(1e-150, 1.0, 1e150), (1e150, 1.0, 1e-150), (0.0, 1e-200, 1e-200)]:
        xs = torch.cat([x[:200] * factors[0], x[200:400] * factors[1], x[400:] * factors[2]])
        meter = _fed(xs, y, [200, 200, 200], null_baseline=False)
        split = [_fed(xs[k:k + 200], y[k:k + 200], [200]) for k in (0, 200, 400)]
        merged = CCAMeter(7, 5, null_baseline=False).merge(split[2]).merge(split[0]).merge(split[1])
        ref = canonical_correlations(xs, y)  # (a zero batch is data too: rows at the origin)
        assert ref.numel() == 5
        torch.testing.assert_close(meter.compute().correlations, ref, atol=1e-9, rtol=0)
        torch.testing.assert_close(merged.compute().correlations, ref, atol=1e-9, rtol=0)


def test_svcca_from_the_meter_matches_the_one_shot_function():
    g = np.random.default_rng(8)
    x = g.standard_normal((500, 20)) * np.geomspace(10, 0.01, 20)
    y = np.concatenate([x[:, :3] + 0.1 * g.standard_normal((500, 3)), g.standard_normal((500, 5))], axis=1)
    xt, yt = torch.as_tensor(x), torch.as_tensor(y)
    for keep in (0.5, 0.9, 0.99, 1.0):
        r = _fed(xt, yt, [123, 377], svcca_keep=keep).compute()
        assert r.svcca == pytest.approx(float(svcca(xt, yt, keep=keep)), abs=1e-9)
    assert _fed(xt, yt, [500]).compute().svcca is None
    with pytest.raises(ValueError, match="keep"):
        CCAMeter(3, svcca_keep=0.0)


def test_null_baseline_is_cached_by_the_null_module():
    from star_heads.metrics import null as null_module

    x, y = _data(16)
    _fed(x, y, [600]).compute()
    hits = null_module._unit_null.cache_info().hits
    again = _fed(x, y, [300, 300]).compute()  # another meter: same n and ranks
    assert null_module._unit_null.cache_info().hits == hits + 1
    assert again.null_mean == null_mean_canonical_correlation(600, torch.ones(7), torch.ones(5))


@pytest.mark.parametrize(
    "kwargs,err,match",
    [
        ({"draws": 0}, ValueError, "draws must be >= 1, got 0"),
        ({"draws": 2.5}, TypeError, "draws must be an int"),
        ({"seed": -1}, ValueError, "seed must be >= 0"),
        ({"n": 0}, ValueError, "n must be >= 1"),
        ({"n": 5}, ValueError, "n - 1 > rank"),
        ({"shrink_x": torch.full((3,), 2.0)}, ValueError, r"shrink_x must hold shrinkage factors in \[0, 1\]"),
        ({"shrink_y": [1.0, 1.0]}, TypeError, "shrink_y must be a 1-D float tensor"),
    ],
)
def test_null_baseline_rejects_bad_arguments(kwargs, err, match):
    args = {"n": 100, "shrink_x": torch.ones(5), "shrink_y": torch.ones(3)} | kwargs
    with pytest.raises(err, match=match):
        null_mean_canonical_correlation(args.pop("n"), args.pop("shrink_x"), args.pop("shrink_y"), **args)


# ---------------------------------------------------------------- DDP (2 gloo processes)
def _ddp_worker(rank, world_size, x, y):
    x = x * 1e-200  # far below float64's square root: the statistics must be pre-scaled
    half = x.shape[0] // world_size
    lo, hi = rank * half, (rank + 1) * half
    meter = CCAMeter(x.shape[1], y.shape[1])
    step = 50 + 7 * rank  # different batchings on purpose: ranks use different shifts
    for k in range(lo, hi, step):
        meter.update(x[k:min(k + step, hi)], y[k:min(k + step, hi)])
    meter.update(x[lo:lo + 1] * 0 + x[lo:lo + 1], y[lo:lo + 1])  # one duplicated row per rank
    empty = CCAMeter(x.shape[1], y.shape[1])  # a rank with no data must not break the sum
    if rank == 0:
        empty.update(x[:100], y[:100])
    monitor = CCAMonitor(every=2)
    out = monitor.update(x[lo:lo + 150], y[lo:lo + 150])
    assert out is None
    out = monitor.update(x[lo + 150:lo + 300], y[lo + 150:lo + 300])
    short = CCAMonitor(every=1, null_baseline=False)  # 10 rows per rank and step; 2(p + q) = 24 over both ranks
    short_outs = [short.update(x[lo + 10 * k:lo + 10 * k + 10], y[lo + 10 * k:lo + 10 * k + 10]) for k in range(2)]
    local_n = meter.n
    result = meter.sync().compute()
    try:
        meter.sync()
    except RuntimeError as err:
        guard = str(err)
    meter.unsync()
    return {"meter": result, "empty": empty.sync().compute(), "monitor": out, "guard": guard,
            "local_n_after_unsync": meter.n == local_n, "short": short_outs, "initialised": dist.is_initialized()}


@pytest.mark.distributed
def test_ddp_sync_equals_single_process_on_concatenated_data():
    x, y = _data(12, n=1200)
    x[700] *= 1e3  # an outlier on rank 1 only: the ranks' scale exponents differ
    results = run_distributed(_ddp_worker, world_size=2, args=(x, y))
    full_x = torch.cat([x, x[0:1], x[600:601]])
    full_y = torch.cat([y, y[0:1], y[600:601]])
    ref = canonical_correlations(full_x, full_y)
    mon_idx = torch.cat([torch.arange(0, 300), torch.arange(600, 900)])
    mon_ref = canonical_correlations(x[mon_idx], y[mon_idx])
    for r in results:
        assert r["initialised"]
        assert r["meter"].n == 1202
        torch.testing.assert_close(r["meter"].correlations, ref, atol=1e-10, rtol=0)
        torch.testing.assert_close(r["empty"].correlations, canonical_correlations(x[:100], y[:100]), atol=1e-10, rtol=0)
        assert r["monitor"].n == 600
        torch.testing.assert_close(r["monitor"].correlations, mon_ref, atol=1e-10, rtol=0)
        assert "cannot sync a synced CCAMeter" in r["guard"] and r["local_n_after_unsync"]
        assert r["short"][0] is None and r["short"][1].n == 40  # both ranks decide on the global count
        short_idx = torch.cat([torch.arange(0, 20), torch.arange(600, 620)])
        torch.testing.assert_close(r["short"][1].correlations, canonical_correlations(x[short_idx], y[short_idx]),
                                   atol=1e-10, rtol=0)
    assert results[0]["meter"].mean == results[1]["meter"].mean
    assert results[0]["meter"].null_mean == results[1]["meter"].null_mean


def test_null_when_some_correlations_are_trivially_one():
    # n − 1 < p + q: (p + q) − (n − 1) = 31 correlations are exactly 1 whatever the data
    ones_x, ones_y = torch.ones(150, dtype=torch.float64), torch.ones(40, dtype=torch.float64)
    null = null_mean_canonical_correlation(160, ones_x, ones_y)
    g = torch.Generator().manual_seed(0)
    with pytest.warns(CCASampleSizeWarning):
        observed = [
            float(mean_canonical_correlation(torch.randn(160, 150, generator=g, dtype=torch.float64),
                                             torch.randn(160, 40, generator=g, dtype=torch.float64)))
            for _ in range(4)
        ]
    assert null > 31 / 40 and np.mean(observed) == pytest.approx(null, abs=0.005)
    assert null == null_mean_canonical_correlation(160, ones_y, ones_x)  # symmetric in the two views


# ---------------------------------------------------------------- registered state (nn.Module)
def test_meter_state_round_trips_through_state_dict_and_a_checkpoint():
    import io

    x, y = _data(21)
    model = torch.nn.ModuleDict({"proj": torch.nn.Linear(3, 3), "cca": CCAMeter(7, 5, ridge=0.1)})
    model["cca"].update(x[:250], y[:250])
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    restored = torch.nn.ModuleDict({"proj": torch.nn.Linear(3, 3), "cca": CCAMeter(7, 5, ridge=0.1)})
    buffer.seek(0)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert restored["cca"].n == 250
    for meter in (model["cca"], restored["cca"]):  # both continue to the full data, exactly alike
        meter.update(x[250:], y[250:])
    a, b = model["cca"].compute(), restored["cca"].compute()
    assert a.mean == b.mean and torch.equal(a.correlations, b.correlations) and b.n == x.shape[0]
    ref = canonical_correlations(x, y, ridge=0.1)
    torch.testing.assert_close(b.correlations, ref, rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match=r"widths \(p, q\) = \(7, 5\) cannot be loaded into \(5, 5\)"):
        CCAMeter(5).load_state_dict(model["cca"].state_dict())


def test_meter_moves_with_to_and_stays_float64_under_dtype_casts():
    x, y = _data(22)
    meter = CCAMeter(7, 5)
    meter.update(x, y)
    before = meter.compute()
    meter.half().to(torch.float32)  # a model cast must not touch the statistics
    assert all(b.dtype == torch.float64 for b in meter.buffers())
    assert meter.compute().mean == before.mean
    meter.to("meta")
    assert meter.device.type == "meta" and all(b.device.type == "meta" for b in meter.buffers())
    fresh = CCAMeter(7, 5, device="meta")
    fresh.update(x, y)  # an empty meter follows its first batch
    assert fresh.device.type == "cpu" and fresh.compute().mean == before.mean


def test_synced_meter_refuses_to_save():
    x, y = _data(23)
    meter = _fed(x, y, [600])
    meter.sync()
    with pytest.raises(RuntimeError, match="cannot save a synced CCAMeter"):
        meter.state_dict()
    meter.unsync()
    assert meter.state_dict()["stats._extra_state"]["n"] == 600


@pytest.mark.parametrize("option", [{"ridge": 0.1}, {"rank_tol": 1e-3}])
def test_merge_refuses_meters_with_another_estimator(option):
    x, y = _data(24)
    mine, other = _fed(x[:300], y[:300], [300]), _fed(x[300:], y[300:], [300], **option)
    key = next(iter(option))
    with pytest.raises(ValueError, match=f"cannot merge a CCAMeter with other options.*{key}="):
        mine.merge(other)
    assert mine.n == 300  # unchanged
    readouts = _fed(x[300:], y[300:], [300], null_baseline=False, svcca_keep=0.99, check_finite=False)
    assert mine.merge(readouts).n == 600  # readout options do not change the estimator


@pytest.mark.parametrize("scale", [1e-320, 1e-310, 1e300])
def test_cca_at_subnormal_and_huge_scales_equals_the_unscaled_cca(scale):
    x, y = _data(25, n=400)
    ref = canonical_correlations(x, y)
    tiny_x, tiny_y = x * scale, y * scale
    assert torch.isfinite(tiny_x).all() and (tiny_x != 0).float().mean() > 0.99
    # at 1e-320 the inputs keep only ~4 significant bits, so the reference is the CCA of those rounded inputs
    rounded = canonical_correlations(tiny_x / scale, tiny_y / scale) if scale < 1e-300 else ref
    for got in (canonical_correlations(tiny_x, tiny_y), _fed(tiny_x, tiny_y, [150, 250]).compute().correlations):
        torch.testing.assert_close(got, rounded, rtol=0, atol=1e-9)
    assert mean_canonical_correlation(tiny_x, tiny_y) > 0.3


def test_gram_backends_agree_on_the_cpu():
    from star_heads.metrics.covariance import gram

    g = torch.Generator().manual_seed(0)
    z, w = torch.randn(50, 6, generator=g, dtype=torch.float64), torch.randn(50, 4, generator=g, dtype=torch.float64)
    ref = torch.as_tensor((z.numpy().T.astype(np.longdouble) @ w.numpy().astype(np.longdouble)).astype(np.float64))
    for backend in ("auto", "numpy", "torch"):
        torch.testing.assert_close(gram(z, w, backend=backend), ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(gram(z, backend=backend), gram(z, z, backend="numpy"), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="backend must be one of"):
        gram(z, backend="cuda")


def _width_worker(rank, world_size):
    meter = CCAMeter(4 + rank, 3)  # rank 1 meters wider views
    meter.update(torch.randn(20, 4 + rank), torch.randn(20, 3))
    try:
        meter.sync()
    except ValueError as err:
        return {"error": str(err), "synced": meter.synced, "n": meter.n}
    return {"error": None}


@pytest.mark.distributed
def test_ranks_with_different_widths_raise_instead_of_hanging():
    results = run_distributed(_width_worker, world_size=2)
    for r in results:
        assert r["error"] is not None and "differ in widths (p, q) across ranks: [(4, 3), (5, 3)]" in r["error"]
        assert not r["synced"] and r["n"] == 20


def test_meter_update_and_merge_are_sync_free_on_the_device():
    from sync_guard import HostSyncGuard

    meter = CCAMeter(7, 5, check_finite=False, device="meta")
    other = CCAMeter(7, 5, check_finite=False, device="meta")
    x, y = torch.randn(40, 7, device="meta"), torch.randn(40, 5, device="meta")
    with HostSyncGuard("meta"):
        meter.update(x, y)
        meter.update(x, y)
        other.update(x, y)
        meter.merge(other)
    assert meter.n == 120 and meter.device.type == "meta"
