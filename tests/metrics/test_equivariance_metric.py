"""augmentation_r2: known answers (a linear function of the parameters scores 1, noise scores 0 held out), a float64
numpy reference of the ridge + GCV readout, the split by image, and clear errors."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import star_heads
from star_heads.augment import PARAM_NAMES
from star_heads.metrics import AugmentationR2, augmentation_r2, parameter_groups

GRID = np.logspace(-8, 3, 45)


def _params(n, k=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, k, generator=g, dtype=torch.float64), torch.rand(n, k, generator=g, dtype=torch.float64)


def test_exported():
    assert star_heads.augmentation_r2 is augmentation_r2 and star_heads.AugmentationR2 is AugmentationR2


def test_groups_of_the_star_layout_and_of_a_solarize_layout():
    groups = parameter_groups(PARAM_NAMES)
    assert groups == {"crop": (0, 1, 2, 3), "flip": (4,), "color": (5, 6, 7, 8), "grayscale": (9,), "blur": (10,)}
    assert parameter_groups([*PARAM_NAMES, "solarize"])["solarize"] == (11,)


def test_linear_function_of_the_parameters_scores_one_and_the_image_term_cancels():
    pa, pb = _params(1200)
    g = torch.Generator().manual_seed(1)
    w = torch.randn(11, 24, generator=g, dtype=torch.float64)
    image = 5 * torch.randn(1200, 24, generator=g, dtype=torch.float64)  # content shared by both views
    r = augmentation_r2(image + pa @ w, image + pb @ w, pa, pb)
    assert set(r.groups) == {"crop", "flip", "color", "grayscale", "blur"} and r.skipped == ()
    assert min(r.groups.values()) > 0.999 and min(r.params.values()) > 0.999
    assert r.n_fit == r.n_score == 600
    assert r.as_dict("eq/") == {f"eq/r2/{k}": v for k, v in r.groups.items()}


def test_one_group_encoded_scores_high_only_there():
    pa, pb = _params(1500, seed=2)
    g = torch.Generator().manual_seed(3)
    crop = torch.randn(4, 8, generator=g, dtype=torch.float64)
    noise = torch.randn(1500, 2, 8, generator=g, dtype=torch.float64)
    r = augmentation_r2(pa[:, :4] @ crop + 0.03 * noise[:, 0], pb[:, :4] @ crop + 0.03 * noise[:, 1], pa, pb)
    assert r.groups["crop"] > 0.95
    assert all(abs(r.groups[k]) < 0.03 for k in ("flip", "color", "grayscale", "blur"))


def test_independent_noise_scores_about_zero_held_out():
    pa, pb = _params(3000, seed=4)
    g = torch.Generator().manual_seed(5)
    za, zb = torch.randn(3000, 32, generator=g), torch.randn(3000, 32, generator=g)  # float32 in, float64 inside
    r = augmentation_r2(za, zb, pa.float(), pb.float())
    assert all(-0.03 < v < 0.02 for v in r.params.values())
    # an invariant embedding (both views embedded alike) carries nothing either
    inv = augmentation_r2(za, za + 1e-3 * zb, pa, pb)
    assert all(v < 0.02 for v in inv.groups.values())


def _numpy_reference(x, y, fit):
    """Float64 numpy: standardise on fit, ridge (XᵀX + λI)⁻¹XᵀY per λ, GCV from the explicit hat matrix."""
    xf, yf = x[fit], y[fit]
    mu, sd = xf.mean(0), xf.std(0, ddof=1)
    xs = (xf - mu) / sd
    yc = yf - yf.mean(0)
    n, d = xs.shape
    smax2 = np.linalg.svd(xs, compute_uv=False)[0] ** 2
    best = np.full(y.shape[1], np.inf)
    lam_best = np.zeros(y.shape[1])
    for lam in GRID * smax2:
        hat = xs @ np.linalg.solve(xs.T @ xs + lam * np.eye(d), xs.T)
        res = yc - hat @ yc
        gcv = n * (res ** 2).sum(0) / (n - np.trace(hat)) ** 2
        better = gcv < best
        best[better], lam_best[better] = gcv[better], lam
    coef = np.stack([np.linalg.solve(xs.T @ xs + lam_best[j] * np.eye(d), xs.T @ yc[:, j]) for j in range(y.shape[1])], 1)
    pred = ((x[~fit] - mu) / sd) @ coef + yf.mean(0)
    ys = y[~fit]
    return 1 - ((ys - pred) ** 2).sum(0) / ((ys - ys.mean(0)) ** 2).sum(0), lam_best


@pytest.mark.parametrize("pair", ["difference", "concat"])
def test_matches_a_float64_numpy_reference(pair):
    n = 400
    pa, pb = _params(n, seed=6)
    g = torch.Generator().manual_seed(7)
    w = torch.randn(11, 12, generator=g, dtype=torch.float64)
    za = pa @ w + 2 * torch.randn(n, 12, generator=g, dtype=torch.float64)
    zb = pb @ w + 2 * torch.randn(n, 12, generator=g, dtype=torch.float64)
    ids = torch.arange(n) // 2  # two pairs per image
    fit_images = torch.arange(0, 200, 3)
    r = augmentation_r2(za, zb, pa, pb, ids, pair=pair, fit_images=fit_images)
    x = (zb - za).numpy() if pair == "difference" else torch.cat([za, zb], 1).numpy()
    fit = np.isin(ids.numpy(), fit_images.numpy())
    r2, lam = _numpy_reference(x, (pb - pa).numpy(), fit)
    np.testing.assert_allclose([r.params[k] for k in PARAM_NAMES], r2, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose([r.penalties[k] for k in PARAM_NAMES], lam, rtol=1e-12)
    assert r.n_fit == int(fit.sum()) and r.pair == pair


def test_split_is_by_image_so_repeated_pairs_do_not_leak():
    """Each image has 4 identical noise pairs; an over-fitted readout would score them ≈ 1 if they were split."""
    n_img, d = 80, 120
    pa, pb = _params(n_img, seed=8)
    g = torch.Generator().manual_seed(9)
    za, zb = torch.randn(n_img, d, generator=g, dtype=torch.float64), torch.randn(n_img, d, generator=g, dtype=torch.float64)
    rep = lambda t: t.repeat_interleave(4, 0)
    ids = torch.arange(n_img).repeat_interleave(4)
    by_image = augmentation_r2(rep(za), rep(zb), rep(pa), rep(pb), ids)
    assert by_image.n_fit % 4 == 0 and max(by_image.groups.values()) < 0.2
    leaky = augmentation_r2(rep(za), rep(zb), rep(pa), rep(pb))  # every pair its own "image": duplicates split
    assert max(leaky.groups.values()) > 0.5  # the leak the image split prevents


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 2**31 - 1), st.floats(0.2, 0.8))
def test_split_is_seeded_and_sized(seed, fraction):
    pa, pb = _params(60, seed=1)
    z = torch.randn(60, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    ids = torch.arange(60) // 3
    a = augmentation_r2(z, z.flip(0), pa, pb, ids, seed=seed, fit_fraction=fraction)
    b = augmentation_r2(z, z.flip(0), pa, pb, ids, seed=seed, fit_fraction=fraction)
    assert a == b and a.n_fit == 3 * min(max(round(fraction * 20), 2), 18) and a.n_fit + a.n_score == 60


def test_constant_parameter_is_skipped_not_nan():
    pa, pb = _params(200, seed=3)
    pa[:, 10], pb[:, 10] = 0.0, 0.0  # blur off
    z = torch.randn(200, 2, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    r = augmentation_r2(z[:, 0], z[:, 1], pa, pb)
    assert r.skipped == ("blur_sigma",) and "blur" not in r.groups and "blur_sigma" not in r.params
    assert all(np.isfinite(v) for v in r.params.values())


def test_bad_inputs():
    pa, pb = _params(20)
    z = torch.zeros(20, 4)
    with pytest.raises(TypeError, match="z_a must be a floating-point"):
        augmentation_r2(z.long(), z, pa, pb)
    with pytest.raises(ValueError, match=r"z_b must have shape \[20, 4\]"):
        augmentation_r2(z, torch.zeros(20, 5), pa, pb)
    with pytest.raises(ValueError, match=r"params_a must have shape \[20, \*\]"):
        augmentation_r2(z, z, pa[:10], pb)
    with pytest.raises(ValueError, match="param_names is required for 12-D"):
        augmentation_r2(z, z, torch.zeros(20, 12), torch.zeros(20, 12))
    with pytest.raises(ValueError, match="param_names has 11 names, but the parameters are 12-D"):
        augmentation_r2(z, z, torch.zeros(20, 12), torch.zeros(20, 12), param_names=PARAM_NAMES)
    with pytest.raises(ValueError, match="at least 4 distinct images"):
        augmentation_r2(z, z, pa, pb, torch.arange(20) % 3)
    with pytest.raises(ValueError, match="at least 3 fit pairs and 2 scoring pairs"):
        augmentation_r2(z[:4], z[:4], pa[:4], pb[:4])
    with pytest.raises(TypeError, match="image_ids must be an integer tensor"):
        augmentation_r2(z, z, pa, pb, torch.arange(20.0))
    with pytest.raises(ValueError, match=r"image_ids must have shape \[20\]"):
        augmentation_r2(z, z, pa, pb, torch.arange(19))
    with pytest.raises(ValueError, match="pair must be one of"):
        augmentation_r2(z, z, pa, pb, pair="sum")
    with pytest.raises(ValueError, match="fit_fraction"):
        augmentation_r2(z, z, pa, pb, fit_fraction=1.0)
    with pytest.raises(ValueError, match="z_a contains NaN"):
        augmentation_r2(torch.full((20, 4), float("nan")), z, pa, pb)
