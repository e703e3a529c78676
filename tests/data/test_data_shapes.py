"""The procedural ``shapes`` set: determinism, factors consistent with the pixels, balance, splits, bad input."""

from __future__ import annotations

import colorsys
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from star_heads.data.shapes import SHAPE_NAMES, ShapesData, _coverage, make_shapes, make_shapes_splits

S = 32
# The geometry spec, written out plainly: unit area (object radius 1) and rotational symmetry period per class.
AREA = {
    "square": 4 * 0.7**2,
    "triangle": 3 * math.sqrt(3) / 4,
    "plus": 2 * (2 * 0.95 * 0.6) - 0.6**2,
    "star": 10 * 0.5 * 1.0 * 0.5 * math.sin(math.radians(36)),
    "bar": 2.0 * 0.64,
    "ell": 2 * 1.4 * 0.45 - 0.45**2,
    "half_disc": math.pi * 0.95**2 / 2,
    "c_ring": (290 / 360) * math.pi * (0.88**2 - 0.5**2),
}
PERIOD_DEG = {"square": 90, "triangle": 120, "plus": 90, "star": 72, "bar": 180, "ell": 360, "half_disc": 360,
              "c_ring": 360}


@pytest.fixture(scope="module")
def pair():
    tex = make_shapes(640, seed=3)
    plain = make_shapes(640, seed=3, background="plain", noise=0.0)
    return tex, plain


def _coverage_from_plain(plain: ShapesData) -> torch.Tensor:
    return plain.images.amax(1) / plain.factors["value"][:, None, None]


def test_deterministic_and_seed_sensitive():
    a, b, c = make_shapes(50, seed=1), make_shapes(50, seed=1), make_shapes(50, seed=2)
    assert torch.equal(a.images, b.images)
    assert all(torch.equal(a.factors[k], b.factors[k]) for k in a.factors)
    assert not torch.equal(a.images, c.images) and not torch.equal(a.factors["angle"], c.factors["angle"])


def test_factor_draws_do_not_depend_on_background(pair):
    tex, plain = pair
    assert all(torch.equal(tex.factors[k], plain.factors[k]) for k in tex.factors)


def test_plain_image_is_coverage_times_the_hsv_colour(pair):
    _, plain = pair
    f = plain.factors
    for i in range(0, 640, 37):
        rgb = torch.tensor(colorsys.hsv_to_rgb(float(f["hue"][i]), float(f["saturation"][i]), float(f["value"][i])))
        img = plain.images[i].double()
        cover = img.amax(0) / img.amax(0).max()
        assert float(img.amax(0).max()) == pytest.approx(float(f["value"][i]), abs=1e-6)  # interior fully covered
        torch.testing.assert_close(img, cover[None] * rgb[:, None, None].double(), rtol=0, atol=2e-6)


def test_object_colour_matches_label(pair):
    tex, plain = pair
    interior = _coverage_from_plain(plain) > 0.999
    mean_rgb = (tex.images * interior[:, None]).sum((2, 3)) / interior.sum((1, 2))[:, None]
    hues = torch.tensor([colorsys.rgb_to_hsv(*c.tolist())[0] for c in mean_rgb])
    predicted = torch.round(hues * 8).long() % 8
    assert (predicted == tex.factors["color"]).float().mean() >= 0.99


def test_centroid_matches_position(pair):
    _, plain = pair
    cov = _coverage_from_plain(plain).double()
    t = (torch.arange(S, dtype=torch.float64) + 0.5) / S
    mass = cov.sum((1, 2))
    cx = (cov * t[None, None, :]).sum((1, 2)) / mass
    cy = (cov * t[None, :, None]).sum((1, 2)) / mass
    f = plain.factors
    assert ((cx - f["pos_x"].double()).abs() * S).max() < 0.25
    assert ((cy - f["pos_y"].double()).abs() * S).max() < 0.25
    # Objects lie fully inside the image: nothing touches the border pixels.
    border = torch.cat([cov[:, 0], cov[:, -1], cov[:, :, 0], cov[:, :, -1]], dim=1)
    assert border.max() == 0


def test_area_matches_scale(pair):
    _, plain = pair
    f = plain.factors
    area = _coverage_from_plain(plain).double().sum((1, 2))
    unit = torch.tensor([AREA[n] for n in SHAPE_NAMES], dtype=torch.float64)[f["shape"]]
    rel = area / (unit * (f["scale"].double() * S) ** 2) - 1
    assert rel.abs().max() < 0.04


def test_bar_orientation_matches_angle(pair):
    _, plain = pair
    f = plain.factors
    cov = _coverage_from_plain(plain).double()
    y, x = torch.meshgrid(torch.arange(S, dtype=torch.float64), torch.arange(S, dtype=torch.float64), indexing="ij")
    for i in (f["shape"] == SHAPE_NAMES.index("bar")).nonzero().flatten().tolist():
        m = cov[i] / cov[i].sum()
        mx, my = (m * x).sum(), (m * y).sum()
        mu20, mu02 = (m * (x - mx) ** 2).sum(), (m * (y - my) ** 2).sum()
        mu11 = (m * (x - mx) * (y - my)).sum()
        est = 0.5 * math.atan2(2 * mu11, mu20 - mu02)  # long axis, image coordinates (y down)
        diff = (est - float(f["angle"][i])) % math.pi
        assert min(diff, math.pi - diff) < math.radians(4), (i, est, float(f["angle"][i]))


def test_rotation_label_is_phase_over_the_symmetry_period(pair):
    tex, _ = pair
    f = tex.factors
    period = torch.tensor([math.radians(PERIOD_DEG[n]) for n in SHAPE_NAMES])[f["shape"]]
    phase = torch.remainder(f["angle"].double(), period.double()) / period.double()
    torch.testing.assert_close(f["phase"].double(), phase, rtol=0, atol=1e-5)
    assert torch.equal(f["rotation"], torch.clamp((f["phase"].double() * 4).floor().long(), max=3))


@pytest.mark.parametrize("shape", range(len(SHAPE_NAMES)))
def test_rotating_by_the_period_gives_the_same_picture(shape):
    n = 6
    a = torch.linspace(0.1, 2.0, n)
    p = torch.full((n,), math.radians(PERIOD_DEG[SHAPE_NAMES[shape]]))
    common = (torch.full((n,), 0.3), torch.full((n,), 0.5), torch.full((n,), 0.5), S, torch.device("cpu"))
    kind = torch.full((n,), shape)
    c0, c1 = _coverage(kind, a, *common), _coverage(kind, a + p, *common)
    torch.testing.assert_close(c0, c1, rtol=0, atol=2e-3)
    if PERIOD_DEG[SHAPE_NAMES[shape]] < 360:  # half a period gives a different picture
        assert (c0 - _coverage(kind, a + p / 2, *common)).abs().amax() > 0.5


def test_labels_are_balanced():
    d = make_shapes(2000, seed=5)
    for name, k in (("shape", 8), ("color", 8)):
        counts = torch.bincount(d.factors[name], minlength=k)
        assert counts.max() - counts.min() <= 1
    for name, k in (("rotation", 4), ("scale_bin", 3)):
        counts = torch.bincount(d.factors[name], minlength=k).double()
        p = 1 / k
        assert ((counts - 2000 * p).abs() <= 4.5 * math.sqrt(2000 * p * (1 - p))).all(), counts
    assert d.num_classes == {"shape": 8, "color": 8, "rotation": 4, "scale_bin": 3}


@given(n=st.integers(1, 12), size=st.integers(16, 40), bins=st.integers(1, 6), seed=st.integers(0, 10**6),
       background=st.sampled_from(["texture", "plain"]))
def test_output_shapes(n, size, bins, seed, background):
    d = make_shapes(n, image_size=size, seed=seed, rotation_bins=bins, background=background)
    assert len(d) == n and d.images.shape == (n, 3, size, size) and d.images.dtype == torch.float32
    assert d.images.min() >= 0 and d.images.max() <= 1
    for k, v in d.factors.items():
        assert v.shape == (n,), k
    for k, c in d.num_classes.items():
        assert d.factors[k].dtype == torch.long and d.factors[k].min() >= 0 and d.factors[k].max() < c
    assert d.num_classes["rotation"] == bins


def test_dataset_view():
    d = make_shapes(20, seed=0)
    ds = d.as_dataset("color")
    x, y = ds[7]
    assert len(ds) == 20 and torch.equal(x, d.images[7]) and int(y) == int(d.factors["color"][7])
    with pytest.raises(KeyError, match="unknown factor 'colour'"):
        d.as_dataset("colour")


def test_splits_are_seeded_and_disjoint():
    s = make_shapes_splits(60, 20, 20, seed=4)
    assert [len(s[k]) for k in ("train", "val", "test")] == [60, 20, 20]
    flat = torch.cat([s[k].images.flatten(1) for k in ("train", "val", "test")])
    assert torch.unique(flat, dim=0).shape[0] == 100
    again = make_shapes_splits(60, 20, 20, seed=4)
    assert torch.equal(again["val"].images, s["val"].images)
    assert not torch.equal(make_shapes_splits(60, 20, 20, seed=5)["train"].images, s["train"].images)


@pytest.mark.parametrize(
    "kwargs, err, words",
    [
        (dict(num_samples=0), ValueError, "num_samples must be >= 1"),
        (dict(num_samples=2.5), TypeError, "num_samples must be an int"),
        (dict(image_size=8), ValueError, "image_size must be >= 16"),
        (dict(background="noise"), ValueError, "background must be one of"),
        (dict(noise=-0.1), ValueError, "noise"),
        (dict(seed="0"), TypeError, "seed must be an int"),
        (dict(rotation_bins=0), ValueError, "rotation_bins"),
    ],
)
def test_bad_input(kwargs, err, words):
    kwargs = {"num_samples": 4, **kwargs}
    n = kwargs.pop("num_samples")
    with pytest.raises(err, match=words):
        make_shapes(n, **kwargs)
    with pytest.raises(ValueError, match="val must be >= 1"):
        make_shapes_splits(4, 0, 4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    a, b = make_shapes(64, seed=0), make_shapes(64, seed=0, device="cuda")
    assert b.images.is_cuda
    torch.testing.assert_close(b.images.cpu(), a.images, rtol=0, atol=1e-4)
