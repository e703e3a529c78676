"""Property-based bad-input suite for the augmentation and equivariance entry points.

Every call either raises the documented exception type with a message that names the argument, or
returns a finite result of the right shape: never a silent NaN, a wrong shape or a reinterpreted value.
"""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from star_heads.augment import (
    AugmentConfig,
    params_to_pixels,
    pixels_to_params,
    sample_augment,
)
from star_heads.equivariance import (
    STL10_PARAM_MEAN,
    STL10_PARAM_STD,
    AugParamNormalizer,
    EquivariantPredictor,
)

ANY_FLOAT = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-3, 3), st.booleans(), st.text(max_size=2))
STRENGTHS = ("brightness", "contrast", "saturation", "hue")
PROBS = ("flip_p", "jitter_p", "grayscale_p", "blur_p")


@given(field=st.sampled_from(STRENGTHS + PROBS), value=ANY_FLOAT)
def test_config_scalars_are_finite_in_range_or_refused_by_name(field, value):
    try:
        cfg = AugmentConfig(**{field: value})
    except (TypeError, ValueError) as exc:
        assert field in str(exc)
        if isinstance(value, (bool, str)):
            assert isinstance(exc, TypeError)
        return
    got = getattr(cfg, field)
    assert not isinstance(value, (bool, str)) and math.isfinite(got) and got >= 0
    assert got <= (1 if field in PROBS else 0.5 if field == "hue" else math.inf)


@given(field=st.sampled_from(("scale", "ratio", "blur_sigma")),
       value=st.one_of(st.tuples(ANY_FLOAT), st.tuples(ANY_FLOAT, ANY_FLOAT), st.tuples(ANY_FLOAT, ANY_FLOAT, ANY_FLOAT),
                       ANY_FLOAT))
def test_config_ranges_are_pairs_of_finite_numbers_or_refused_by_name(field, value):
    try:
        cfg = AugmentConfig(**{field: value})
    except (TypeError, ValueError) as exc:
        assert field in str(exc)
        return
    lo, hi = getattr(cfg, field)
    assert math.isfinite(lo) and math.isfinite(hi) and 0 < lo <= hi


@given(h=st.integers(-2, 24), w=st.integers(-2, 24), batch=st.integers(-1, 3))
def test_sampling_checks_image_size_and_batch(h, w, batch):
    try:
        s = sample_augment(AugmentConfig(8), batch, (h, w), torch.Generator().manual_seed(0))
    except ValueError as exc:
        assert ("image_size" in str(exc) and min(h, w) < 1) or ("batch" in str(exc) and batch < 1)
        return
    assert min(h, w) >= 1 and batch >= 1
    top, left, ch, cw = s.crop.T
    assert (ch >= 1).all() and (cw >= 1).all() and (top + ch <= h).all() and (left + cw <= w).all()
    v = s.vector()
    assert v.shape == (batch, 11) and torch.isfinite(v).all()
    torch.testing.assert_close(params_to_pixels(v, (h, w)), s.vector("pixels"))


@given(size=st.one_of(st.integers(-2, 40), st.tuples(st.integers(-2, 40), st.integers(-2, 40)), st.floats(0, 40)))
def test_pixel_conversion_names_image_size(size):
    p = torch.rand(3, 11)
    try:
        px = params_to_pixels(p, size)
    except (TypeError, ValueError) as exc:
        assert "image_size" in str(exc)
        assert isinstance(exc, TypeError) == isinstance(size, float)
        return
    torch.testing.assert_close(pixels_to_params(px, size), p)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -0.5])
def test_augment_refuses_non_finite_images_in_forward_and_original(bad):
    pytest.importorskip("kornia")
    from star_heads import value_checks
    from star_heads.augment import STARAugment

    x = torch.rand(2, 3, 12, 12)
    x[1, 0, 3, 3] = bad
    aug = STARAugment(8, check_range=True)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        aug(x)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        aug.original(x)
    plain = STARAugment(8)  # the range check reads values (a host sync): off unless asked for
    assert plain(x)[0].shape == (2, 3, 8, 8)
    with value_checks(), pytest.raises(ValueError, match=r"\[0, 1\]"):  # the one switch reaches it
        plain(x)
    with pytest.raises(ValueError, match="at least 1x1"):
        aug.original(torch.rand(2, 3, 0, 5))


@given(rows=st.integers(0, 6), poison=st.sampled_from([None, float("nan"), float("inf")]), frozen=st.booleans())
def test_normalizer_never_lets_a_non_finite_batch_into_its_statistics(rows, poison, frozen):
    norm = AugParamNormalizer.stl10(crop_units="normalized", track_running_stats=not frozen).train()
    x = torch.rand(rows, 11, dtype=torch.float64)
    if poison is not None and rows:
        x[rows - 1, 5] = poison
    before = (norm.running_mean.clone(), norm.running_var.clone(), int(norm.num_samples))
    try:
        out = norm(x)
    except ValueError as exc:
        assert "at least one row" in str(exc) and rows == 0 and not frozen
        assert torch.equal(norm.running_mean, before[0]) and torch.equal(norm.running_var, before[1])
        assert int(norm.num_samples) == before[2]
        return
    assert out.shape == (rows, 11)
    if poison is None or rows == 0:
        assert torch.isfinite(out).all()
        assert frozen or int(norm.num_samples) == before[2] + rows
    else:  # the batch is skipped by the statistics (no host read) and its output still shows the poison
        assert torch.equal(norm.running_mean, before[0]) and torch.equal(norm.running_var, before[1])
        assert int(norm.num_samples) == before[2]
        assert not torch.isfinite(out[rows - 1, 5])


@given(units=st.sampled_from(["normalized", "pixels"]), given_units=st.sampled_from(["normalized", "pixels"]))
def test_stl10_constants_refuse_crop_boxes_in_the_wrong_units(units, given_units):
    from star_heads.augment import AugmentConfig as Cfg

    s = sample_augment(Cfg(32), 8, (96, 96), torch.Generator().manual_seed(1))
    norm = AugParamNormalizer.stl10(crop_units=units).eval()
    params = s.vector(given_units)
    if units != given_units:
        with pytest.raises(ValueError, match="crop box looks"):
            norm(params)
        return
    out = norm(params)
    # The converted constants standardise normalised boxes exactly as the published ones do pixel boxes.
    ref = (s.vector("pixels").double() - torch.tensor(STL10_PARAM_MEAN, dtype=torch.float64)) / torch.tensor(
        STL10_PARAM_STD, dtype=torch.float64)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


@given(b=st.integers(0, 4), d=st.integers(1, 5), p=st.integers(1, 4), bad=st.sampled_from(["none", "z0", "params"]),
       kind=st.sampled_from(["star", "equimod", "hyper"]))
def test_predictor_check_finite_guards_its_batchnorm(b, d, p, bad, kind):
    pred = EquivariantPredictor(4, 3, kind=kind, hidden_dim=8, check_finite=True).train()
    z0, a = torch.randn(b, d), torch.randn(b, p)
    if bad == "z0" and b:
        z0[0, 0] = float("nan")
    if bad == "params" and b:
        a[-1, -1] = float("inf")
    stats = {k: v.clone() for k, v in pred.state_dict().items()}
    try:
        out = pred(z0, a)
    except ValueError as exc:
        msg = str(exc)
        assert (d != 4 and "z0" in msg) or (p != 3 and "params" in msg) or (bad in msg and "NaN" in msg) or b < 2
        assert all(torch.equal(v, pred.state_dict()[k]) for k, v in stats.items())  # no running statistic moved
        return
    assert d == 4 and p == 3 and (bad == "none" or b == 0)
    assert out.shape == (b, 4) and torch.isfinite(out).all()


# --------------------------------------------------------------------------- degenerate inputs
@given(field=st.sampled_from(("brightness", "contrast", "saturation")),
       value=st.one_of(st.floats(0, 1e308), st.sampled_from([255.0, 255.5, 1e10, 1e308])))
def test_absurd_strengths_are_refused_with_their_bound_and_the_rest_gives_finite_views(field, value):
    pytest.importorskip("scipy")
    from star_heads.augment import MAX_STRENGTH, STARAugment

    try:
        aug = STARAugment(6, **{field: value}, jitter_p=1.0)
    except ValueError as exc:
        assert value > MAX_STRENGTH and field in str(exc) and "<= 255" in str(exc)
        return
    assert value <= MAX_STRENGTH
    x = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    x[0] = 0.0  # black and white images hit inf * 0 first
    x[1] = 1.0
    views, params = aug(x, generator=torch.Generator().manual_seed(1))
    assert torch.isfinite(views).all() and torch.isfinite(params).all()
    assert views.min() >= 0 and views.max() <= 1


@pytest.mark.parametrize("ratio", [(1e-300, 1.0), (1.0, 1e300), (1e-4, 2.0)])
def test_absurd_ratios_are_refused(ratio):
    with pytest.raises(ValueError, match=r"ratio must lie in \[1e-3, 1e3\]"):
        AugmentConfig(ratio=ratio)


def test_wrong_types_are_type_errors():
    from star_heads.augment import STARAugment

    aug = STARAugment(8)
    with pytest.raises(TypeError, match="generator must be a torch.Generator or None, got str 'abc'"):
        aug.sample(2, (8, 8), generator="abc")
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        sample_augment(AugmentConfig(8), 2, (8, 8), generator=3)
    with pytest.raises(TypeError, match="output_size must be a positive int"):
        STARAugment("a")
    with pytest.raises(TypeError, match="output_size"):
        STARAugment(8.0)
    with pytest.raises(ValueError, match="output_size"):
        STARAugment(0)
    with pytest.raises(TypeError, match="crop_units must be one of"):
        STARAugment(8, crop_units=1)
    with pytest.raises(ValueError, match="crop_units must be one of"):
        STARAugment(8, crop_units="cm")
    with pytest.raises(TypeError, match="num_local_crops must be an int"):
        STARAugment(8, num_local_crops=2.0)
    with pytest.raises(TypeError, match="blur_kernel_size"):
        AugmentConfig(blur_kernel_size=3.0)
    with pytest.raises(TypeError, match="momentum"):
        AugParamNormalizer(3, momentum="a")
    with pytest.raises(TypeError, match="eps"):
        AugParamNormalizer(3, eps="a")
    with pytest.raises(TypeError, match="mean must be a tensor or a sequence of real numbers, got str 'abc'"):
        AugParamNormalizer.from_constants("abc", [1.0, 2.0, 3.0])
    with pytest.raises(TypeError, match="std must be"):
        AugParamNormalizer.from_constants([0.0], [None])
    with pytest.raises(TypeError, match="augment must have an int param_dim"):
        AugParamNormalizer.for_augment(torch.nn.Linear(2, 2))
