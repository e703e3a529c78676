"""STARAugment: the returned parameters reproduce each view (per-item float64 reference), determinism, units."""

from __future__ import annotations

import colorsys
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from star_heads.augment import (
    PARAM_DIM,
    PARAM_NAMES,
    AugmentConfig,
    STARAugment,
    params_to_pixels,
    pixels_to_params,
)

LUMA = (0.299, 0.587, 0.114)


def _gray(v: torch.Tensor) -> torch.Tensor:
    return LUMA[0] * v[0] + LUMA[1] * v[1] + LUMA[2] * v[2]


def _hue_shift(v: torch.Tensor, shift: float) -> torch.Tensor:
    out = torch.empty_like(v)
    for i in range(v.shape[1]):
        for j in range(v.shape[2]):
            h, s, val = colorsys.rgb_to_hsv(*v[:, i, j].tolist())
            out[:, i, j] = torch.tensor(colorsys.hsv_to_rgb((h + shift) % 1.0, s, val), dtype=v.dtype)
    return out


def _blur(v: torch.Tensor, sigma: float, k: int) -> torch.Tensor:
    t = torch.arange(k, dtype=torch.float64) - k // 2
    g = torch.exp(-(t**2) / (2 * sigma**2))
    g = g / g.sum()
    ker = torch.outer(g, g)[None, None].expand(v.shape[0], 1, k, k)
    pad = F.pad(v[None], (k // 2,) * 4, mode="reflect")
    return F.conv2d(pad, ker, groups=v.shape[0])[0]


def reference_view(img, p, order, jitter, size, kernel, antialias):
    """Plain per-image re-application of a STAR parameter vector ``p`` (pixel units), float64."""
    top, left, h, w = (int(round(float(p[i]))) for i in range(4))
    v = img.double()[:, top : top + h, left : left + w]
    v = F.interpolate(v[None], size=size, mode="bilinear", align_corners=False, antialias=antialias)[0]
    if p[4] == 1:
        v = v.flip(-1)
    if jitter:
        for op in order.tolist():
            f = float(p[5 + op])
            if op == 0:
                v = (v * f).clamp(0, 1)
            elif op == 1:
                v = (f * v + (1 - f) * _gray(v).mean()).clamp(0, 1)
            elif op == 2:
                v = (f * v + (1 - f) * _gray(v)).clamp(0, 1)
            else:
                v = _hue_shift(v, f)
    if p[9] == 1:
        v = _gray(v).expand(3, -1, -1)
    if p[10] > 0:
        v = _blur(v, float(p[10]), kernel)
    return v


@pytest.mark.parametrize(
    "src, out, antialias, overrides",
    [
        ((20, 24), (12, 10), True, dict(jitter_p=1.0, grayscale_p=0.3, blur_p=0.7)),
        ((18, 18), (16, 16), False, dict()),
        ((9, 13), (14, 11), True, dict(blur_kernel_size=5, blur_p=1.0)),
    ],
)
def test_params_reproduce_views(src, out, antialias, overrides, device):
    torch.manual_seed(0)
    images = torch.rand(10, 3, *src)
    aug = STARAugment(out, antialias=antialias, **overrides)
    views, params = aug(images.to(device), generator=torch.Generator(device).manual_seed(7))
    sample = aug.sample(10, src, generator=torch.Generator(device).manual_seed(7))
    torch.testing.assert_close(aug.replay(images.to(device), sample), views, rtol=0, atol=0)
    torch.testing.assert_close(aug.apply(images.to(device), sample), views, rtol=0, atol=0)  # an alias of replay
    views, params, sample = views.cpu(), params.cpu(), sample.to("cpu")
    px = params_to_pixels(params.double(), src)
    for i in range(10):
        ref = reference_view(images[i], px[i], sample.order[i], bool(sample.jitter[i]), out, aug.config.kernel_size,
                             antialias)
        torch.testing.assert_close(views[i].double(), ref, rtol=0, atol=2e-5, msg=f"image {i}: {px[i].tolist()}")


def test_crop_box_is_integer_pixels_and_inside_image():
    aug = STARAugment(8, crop_units="pixels")
    _, p = aug(torch.rand(300, 3, 30, 40), generator=torch.Generator().manual_seed(1))
    box = p[:, :4]
    assert torch.equal(box, box.round())
    assert (box[:, :2] >= 0).all() and (box[:, 2:] >= 1).all()
    assert (box[:, 0] + box[:, 2] <= 30).all() and (box[:, 1] + box[:, 3] <= 40).all()


def test_flip_param_means_mirrored_view():
    x = torch.rand(16, 3, 20, 20)
    plain = dict(jitter_p=0.0, grayscale_p=0.0, blur_p=0.0)
    v0, p0 = STARAugment(12, flip_p=0.0, **plain)(x, generator=torch.Generator().manual_seed(3))
    v1, p1 = STARAugment(12, flip_p=1.0, **plain)(x, generator=torch.Generator().manual_seed(3))
    assert (p0[:, 4] == 0).all() and (p1[:, 4] == 1).all()
    torch.testing.assert_close(p0[:, :4], p1[:, :4], rtol=0, atol=0)
    torch.testing.assert_close(v1, v0.flip(-1), rtol=0, atol=0)


def test_factors_are_neutral_exactly_without_jitter():
    aug = STARAugment(8)
    x = torch.rand(400, 3, 16, 16)
    _, p = aug(x, generator=torch.Generator().manual_seed(2))
    s = aug.sample(400, (16, 16), generator=torch.Generator().manual_seed(2))
    neutral = torch.tensor([1.0, 1.0, 1.0, 0.0])
    assert torch.equal(p[~s.jitter, 5:9], neutral.expand(int((~s.jitter).sum()), 4))
    assert (p[s.jitter, 5:9] != neutral).all()  # continuous draws never hit the neutral value
    _, q = STARAugment(8, jitter_p=0.0)(x, generator=torch.Generator().manual_seed(2))
    assert torch.equal(q[:, 5:9], neutral.expand(400, 4))
    assert ((q[:, 9] == 0) | (q[:, 9] == 1)).all() and ((q[:, 10] == 0) | (q[:, 10] >= 0.1)).all()


def test_seeded_generator_is_deterministic_and_leaves_global_rng_alone():
    aug = STARAugment(16)
    x = torch.rand(8, 3, 24, 24)
    state = torch.random.get_rng_state()
    a = aug(x, generator=torch.Generator().manual_seed(11))
    assert torch.equal(state, torch.random.get_rng_state())
    b = aug(x, generator=torch.Generator().manual_seed(11))
    c = aug(x, generator=torch.Generator().manual_seed(12))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])
    torch.manual_seed(5)
    d = aug(x)
    torch.manual_seed(5)
    e = aug(x)
    assert torch.equal(d[1], e[1]) and torch.equal(d[0], e[0])


def test_crop_units_and_conversions_roundtrip():
    x = torch.rand(6, 3, 30, 50)
    _, pn = STARAugment(10)(x, generator=torch.Generator().manual_seed(4))
    _, pp = STARAugment(10, crop_units="pixels")(x, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(params_to_pixels(pn, (30, 50)), pp)
    torch.testing.assert_close(pixels_to_params(pp, (30, 50)), pn)
    torch.testing.assert_close(pn[:, 4:], pp[:, 4:], rtol=0, atol=0)
    np.testing.assert_allclose(pn[:, [0, 2]].numpy() * 30, pp[:, [0, 2]].numpy(), rtol=1e-6)
    np.testing.assert_allclose(pn[:, [1, 3]].numpy() * 50, pp[:, [1, 3]].numpy(), rtol=1e-6)


def test_original_view_and_identity_params():
    x = torch.rand(4, 3, 40, 28)
    aug = STARAugment((16, 12))
    ref = F.interpolate(x.double(), size=(16, 12), mode="bilinear", align_corners=False, antialias=True)
    torch.testing.assert_close(aug.original(x).double(), ref, rtol=0, atol=2e-6)
    idp = aug.identity_params(4, (40, 28))
    assert idp.shape == (4, PARAM_DIM)
    assert idp[0].tolist() == [0.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    assert STARAugment(16, crop_units="pixels").identity_params(1, (40, 28))[0, :4].tolist() == [0, 0, 40, 28]


def test_param_layout_and_config_defaults():
    assert len(PARAM_NAMES) == PARAM_DIM == 11
    assert PARAM_NAMES[4] == "flip" and PARAM_NAMES[-1] == "blur_sigma"
    c = AugmentConfig()
    assert (c.scale, c.flip_p, c.jitter_p, c.grayscale_p, c.blur_p) == ((0.2, 1.0), 0.5, 0.8, 0.2, 0.5)
    assert (c.brightness, c.contrast, c.saturation, c.hue, c.blur_sigma) == (0.4, 0.4, 0.4, 0.1, (0.1, 2.0))
    assert math.isclose(c.ratio[0], 3 / 4) and math.isclose(c.ratio[1], 4 / 3)
    assert AugmentConfig(output_size=96).kernel_size == 9 and AugmentConfig(output_size=224).kernel_size == 23
    assert AugmentConfig(output_size=32).kernel_size == 3


def test_autocast_does_not_change_views_and_bad_generator():
    x = torch.rand(6, 3, 20, 20)
    aug = STARAugment(16)
    ref = aug(x, generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = aug(x, generator=torch.Generator().manual_seed(0))
    assert got[0].dtype == torch.float32
    torch.testing.assert_close(got[0], ref[0], rtol=0, atol=0)
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        aug(x, generator=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    x = torch.rand(32, 3, 40, 40)
    aug = STARAugment(32)
    vc, pc = aug(x, generator=torch.Generator().manual_seed(9))
    vg, pg = aug(x.cuda(), generator=torch.Generator().manual_seed(9))
    assert vg.is_cuda and pg.is_cuda
    torch.testing.assert_close(pg.cpu(), pc, rtol=0, atol=0)
    torch.testing.assert_close(vg.cpu(), vc, rtol=0, atol=1e-4)


def test_module_apply_still_walks_the_module_tree():
    """``STARAugment`` inside a model must not break ``model.apply(fn)`` (Lightning and init code use it)."""
    pytest.importorskip("kornia")
    from torch import nn

    from star_heads import STARAugment

    model = nn.Sequential(nn.Linear(2, 2), STARAugment(8))
    seen = []
    assert model.apply(lambda m: seen.append(type(m).__name__)) is model
    assert seen == ["Linear", "STARAugment", "Sequential"]
