"""Property-based bad-input suite over the CCA entry points.

Whatever they are given, the one-shot functions, CCAMeter and CCAMonitor either raise the documented
exception type (TypeError for a wrong type, ValueError for a wrong value or shape, RuntimeError for a
synced meter) with a message, before any state changes — or return a finite result of the right
shape and dtype, in [0, 1], that agrees with an independent float64 oracle.
"""

import copy
import warnings

import numpy as np
import pytest
import torch
from cca_oracle import cca_orth
from hypothesis import given, settings
from hypothesis import strategies as st

from star_heads.metrics import (
    CCAMeter,
    CCAMonitor,
    canonical_correlations,
    mean_canonical_correlation,
    pwcca,
    svcca,
)

DOCUMENTED = (TypeError, ValueError)
FLOAT_DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
OTHER_DTYPES = [torch.int64, torch.bool, torch.complex64]


@st.composite
def tensors(draw, rows=None, cols=None):
    """Tensors of any rank 0-3, small sizes, float or not, with NaN/Inf/huge/tiny/constant values.

    The first entry of every choice is a valid one, so that hypothesis' simplest examples exercise values.
    """
    ndim = draw(st.sampled_from([2] * 8 + [1, 0, 3]))
    shape = [draw(st.integers(0, 6)) for _ in range(ndim)]
    if ndim == 2:
        n = rows if rows is not None else draw(st.sampled_from([40, 30, 12, 9, 5, 1, 0]))
        shape = [n, cols if cols is not None else draw(st.sampled_from([3, 1, 2, 4, 6, 0]))]
    dtype = draw(st.sampled_from(FLOAT_DTYPES + FLOAT_DTYPES + OTHER_DTYPES))
    kind = draw(st.sampled_from(["normal", "scaled", "constant", "integers", "normal", "nan", "inf"]))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g, dtype=torch.float64)
    if kind == "constant":
        base = torch.full(shape, 3.5, dtype=torch.float64)
    elif kind == "integers":
        base = torch.randint(-2, 3, shape, generator=g).double()
    elif kind == "scaled":
        base = base * draw(st.sampled_from([1e-200, 1e-300, 1e-30, 1e30, 1e200, 1e300]))
    if kind in ("nan", "inf") and base.numel():
        base.view(-1)[draw(st.integers(0, base.numel() - 1))] = float("nan") if kind == "nan" else -float("inf")
    if dtype in (torch.int64, torch.bool):
        return base.nan_to_num(0.0, 0.0, 0.0).clamp(-5, 5).to(dtype)
    return base.to(dtype)


not_tensors = st.one_of(st.none(), st.floats(), st.integers(), st.text(max_size=3),
                        st.lists(st.lists(st.floats(-3, 3), min_size=2, max_size=2), max_size=3),
                        st.just(np.ones((30, 2))))
anything = st.one_of(tensors(), tensors(), tensors(), not_tensors)


@st.composite
def pairs(draw):
    """Mostly paired views of the same n (so that values, not only shapes, get tested), else anything."""
    if draw(st.integers(0, 3)) == 3:
        return draw(anything), draw(anything)
    n = draw(st.sampled_from([40, 30, 12, 9, 5, 1, 0]))
    return draw(tensors(rows=n)), draw(tensors(rows=n))
options = st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True), st.integers(-2, 2), st.booleans(),
                    st.text(max_size=2), st.sampled_from([0.0, 0.1, 1.0, 1e-5, 0.999]))


def _assert_valid_correlations(rho, x, y):
    assert isinstance(rho, torch.Tensor) and rho.dtype == torch.float64 and rho.ndim == 1
    assert rho.numel() <= min(x.shape[1], y.shape[1])
    assert bool(torch.isfinite(rho).all()) and bool(((rho >= 0) & (rho <= 1)).all())
    assert bool((rho[:-1] >= rho[1:]).all())


def _oracle_agrees(rho, x, y):
    """The float64 oracle, where its rank decisions cannot differ from ours (no direction near the cut-off)."""
    xd, yd = x.double().numpy(), y.double().numpy()
    for view in (xd, yd):
        c = view - view.mean(0)
        if np.abs(c).max() == 0:
            continue
        s = np.linalg.svd(c / np.abs(c).max(), compute_uv=False)
        rel = s / s[0]
        if np.any((rel > 1e-7) & (rel < 1e-3)):
            return  # a direction near the cut-off: rank decisions may legitimately differ at float rounding
    ref = cca_orth(xd, yd)
    assert rho.numel() == ref.size, (rho, ref)
    np.testing.assert_allclose(rho.numpy(), ref, atol=1e-8)


@settings(max_examples=80)
@given(pairs())
def test_one_shot_functions_raise_documented_errors_or_return_valid_values(pair):
    x, y = pair
    for fn in (canonical_correlations, mean_canonical_correlation, svcca, pwcca):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out = fn(x, y)
        except DOCUMENTED as err:
            assert str(err)
            continue
        assert isinstance(x, torch.Tensor) and x.ndim == 2 and x.shape[0] == y.shape[0] >= max(x.shape[1], y.shape[1]) + 2
        assert x.is_floating_point() and y.is_floating_point(), (x.dtype, y.dtype)
        if fn is canonical_correlations:
            _assert_valid_correlations(out, x, y)
            _oracle_agrees(out, x, y)
        else:
            assert out.dtype == torch.float64 and out.shape == () and 0.0 <= float(out) <= 1.0


@given(tensors(rows=30, cols=4), tensors(rows=30, cols=3), options, options)
def test_options_raise_documented_errors_or_are_used(x, y, ridge, rank_tol):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rho = canonical_correlations(x, y, ridge=ridge, rank_tol=rank_tol)
    except DOCUMENTED as err:
        assert str(err)
        return
    assert not isinstance(ridge, bool) and float(ridge) >= 0 and np.isfinite(float(ridge))
    _assert_valid_correlations(rho, x, y)


def _snapshot(meter):
    st_ = meter.stats
    return None if st_ is None else (st_.n, st_.exponent.clone(), st_.total.clone(), st_.moment.clone())


def _same(a, b):
    if a is None or b is None:
        return a is b
    return a[0] == b[0] and all(u.shape == v.shape and torch.allclose(u, v, rtol=0, atol=0, equal_nan=True)
                                for u, v in zip(a[1:], b[1:]))


@settings(max_examples=60)
@given(st.lists(pairs(), min_size=1, max_size=4), st.booleans())
def test_meter_never_corrupts_its_state_and_computes_valid_values(batches, check_finite):
    meter = CCAMeter(4, 3, check_finite=check_finite, null_baseline=False)
    good_x, good_y = [], []
    for x, y in batches:
        before = _snapshot(meter)
        try:
            meter.update(x, y)
        except DOCUMENTED as err:
            assert str(err) and _same(_snapshot(meter), before)  # raised before any state changed
            continue
        good_x.append(x)
        good_y.append(y)
    if not good_x:
        assert meter.n == 0
        return
    assert meter.n == sum(len(x) for x in good_x)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = meter.compute()
    except ValueError as err:
        assert str(err)
        return
    x, y = torch.cat([v.double() for v in good_x]), torch.cat([v.double() for v in good_y])
    assert bool(torch.isfinite(x).all() and torch.isfinite(y).all())  # non-finite batches never give a value
    _assert_valid_correlations(result.correlations, x, y)
    assert 0.0 <= result.mean <= 1.0


@given(anything)
def test_meter_merge_and_sync_reject_what_they_cannot_take(other):
    meter = CCAMeter(4, 3)
    meter.update(torch.randn(20, 4), torch.randn(20, 3))
    before = _snapshot(meter)
    with pytest.raises(TypeError, match="can only merge a CCAMeter"):
        meter.merge(other)
    with pytest.raises(ValueError, match="into itself"):
        meter.merge(meter)
    with pytest.raises(ValueError, match="cannot merge"):
        meter.merge(CCAMeter(3, 4))
    meter.sync()
    with pytest.raises(RuntimeError, match="unsync"):
        meter.sync()
    with pytest.raises(RuntimeError, match="unsync"):
        meter.merge(copy.deepcopy(meter))
    meter.unsync()
    assert _same(_snapshot(meter), before)


@given(st.lists(pairs(), min_size=1, max_size=5), st.integers(1, 3))
def test_monitor_raises_documented_errors_or_returns_valid_results(batches, every):
    monitor = CCAMonitor(every=every, null_baseline=False)
    for x, y in batches:
        steps = monitor.steps
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out = monitor.update(x, y)
        except DOCUMENTED as err:
            assert str(err)
            # a rejected batch is not counted; a non-finite window is reported at its reporting step
            assert monitor.steps == steps or "not finite" in str(err)
            continue
        if out is not None:
            assert 0.0 <= out.mean <= 1.0 and bool(torch.isfinite(out.correlations).all())
            assert all(type(v) is float and np.isfinite(v) for v in out.as_dict().values())


@given(st.one_of(options, st.integers(-3, 0)), st.sampled_from(["every", "window", "min_samples", "ridge",
                                                                  "svcca_keep"]))
def test_monitor_and_meter_constructors_validate_every_option(value, name):
    try:
        CCAMonitor(**{name: value})
    except DOCUMENTED as err:
        assert name in str(err)
        return
    if name in ("window", "min_samples") and value is None:
        return  # the documented default
    if name in ("every", "window", "min_samples"):
        assert isinstance(value, int) and not isinstance(value, bool) and value >= 1
    elif name == "ridge":
        assert np.isfinite(float(value)) and float(value) >= 0
    else:
        assert value is None or 0 < float(value) <= 1


@st.composite
def well_formed_pairs(draw):
    """Float 2-D views with enough rows, but edge values: constant, integer, tiny/huge, half precision, NaN/Inf."""
    p, q = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    n = draw(st.integers(max(p, q) + 2, 50))
    return draw(tensors(rows=n, cols=p).filter(lambda t: t.ndim == 2)), draw(
        tensors(rows=n, cols=q).filter(lambda t: t.ndim == 2))


@settings(max_examples=60)
@given(well_formed_pairs())
def test_well_formed_edge_values_give_correct_values_or_name_the_bad_view(pair):
    x, y = pair
    wrong_type = [name for name, v in (("x", x), ("y", y)) if not v.is_floating_point()]
    non_finite = [name for name, v in (("x", x), ("y", y)) if not bool(torch.isfinite(v.to(torch.float64) if not v.is_complex() else v).all())]
    bad = wrong_type or non_finite  # type errors are reported before value errors
    for fn in (canonical_correlations, svcca, pwcca):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out = fn(x, y)
        except DOCUMENTED as err:
            assert bad and str(err).startswith(bad[0])  # the first bad view is named
            continue
        assert not bad
        if fn is canonical_correlations:
            _assert_valid_correlations(out, x, y)
            _oracle_agrees(out, x, y)
        else:
            assert out.shape == () and 0.0 <= float(out) <= 1.0
    meter = CCAMeter(x.shape[1], y.shape[1], null_baseline=False)
    try:
        meter.update(x, y)
    except DOCUMENTED as err:
        assert bad and str(err).startswith(bad[0])
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = meter.compute()
        one_shot = canonical_correlations(x, y)
    assert result.correlations.shape == one_shot.shape
    torch.testing.assert_close(result.correlations, one_shot, atol=1e-6, rtol=0)
