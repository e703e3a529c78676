"""STARAugment: parameter statistics, shapes (hypothesis), bad input and the optional kornia dependency."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from scipy import stats

from star_heads.augment import (
    AugmentConfig,
    STARAugment,
    params_to_pixels,
    sample_augment,
)

N = 4000


@pytest.fixture(scope="module")
def draws():
    s = sample_augment(AugmentConfig(output_size=32), N, (64, 48), torch.Generator().manual_seed(0))
    return s, s.vector("normalized")


def _within_binomial(count: int, n: int, p: float, z: float = 4.5) -> bool:
    return abs(count - n * p) <= z * math.sqrt(n * p * (1 - p))


@pytest.mark.parametrize("column, flag, p", [(4, "flip", 0.5), (9, "grayscale", 0.2)])
def test_binary_frequencies(draws, column, flag, p):
    s, v = draws
    assert set(v[:, column].unique().tolist()) <= {0.0, 1.0}
    assert _within_binomial(int(v[:, column].sum()), N, p)
    assert torch.equal(v[:, column].bool(), getattr(s, flag))


def test_jitter_and_blur_frequencies_and_ranges(draws):
    s, v = draws
    assert _within_binomial(int(s.jitter.sum()), N, 0.8)
    blurred = v[:, 10] > 0
    assert _within_binomial(int(blurred.sum()), N, 0.5)
    sig = v[blurred, 10].double()
    assert sig.min() >= 0.1 and sig.max() <= 2.0
    assert stats.kstest(sig.numpy(), stats.uniform(0.1, 1.9).cdf).pvalue > 1e-3
    f = v[s.jitter, 5:9].double()
    for j, (lo, hi) in enumerate([(0.6, 1.4), (0.6, 1.4), (0.6, 1.4), (-0.1, 0.1)]):
        assert f[:, j].min() >= lo and f[:, j].max() <= hi
        assert stats.kstest(f[:, j].numpy(), stats.uniform(lo, hi - lo).cdf).pvalue > 1e-3
    first = s.order[s.jitter, 0]
    n = int(s.jitter.sum())
    for op in range(4):  # each op comes first a quarter of the time (random order per image)
        assert _within_binomial(int((first == op).sum()), n, 0.25)
    assert torch.equal(s.order.sort(dim=1).values, torch.arange(4).expand(N, 4))


def test_crop_area_and_aspect(draws):
    s, v = draws
    h, w = v[:, 2].double(), v[:, 3].double()
    area = h * w
    hp, wp = h * 64, w * 48
    # Rounding of the pixel box moves the area by at most ~(h + w)/2 + 1/4 pixels.
    slack = (hp + wp) / 2 + 0.25
    assert (hp * wp >= 0.2 * 64 * 48 - slack).all() and (area <= 1.0).all()
    aspect = wp / hp
    assert (aspect >= 0.75 * (1 - 1.0 / hp) - 1.0 / hp).all() and (aspect <= 4 / 3 * (1 + 1.0 / hp) + 1.0 / hp).all()
    # Box inside the image.
    assert (v[:, 0] + v[:, 2] <= 1 + 1e-6).all() and (v[:, 1] + v[:, 3] <= 1 + 1e-6).all()
    # Same distribution as torchvision's RandomResizedCrop.get_params, written plainly with Python's random module.
    ref = _torchvision_crop_fractions(64, 48, 6000)
    assert stats.ks_2samp(area.numpy(), ref[:, 0]).pvalue > 1e-3
    assert stats.ks_2samp((hp / wp).numpy(), ref[:, 1]).pvalue > 1e-3


def _torchvision_crop_fractions(H: int, W: int, n: int):
    import random

    import numpy as np

    rng = random.Random(0)
    out = []
    for _ in range(n):
        for _ in range(10):
            target = H * W * rng.uniform(0.2, 1.0)
            ar = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
            w, h = round(math.sqrt(target * ar)), round(math.sqrt(target / ar))
            if 0 < w <= W and 0 < h <= H:
                break
        else:
            w, h = W, H  # W/H = 0.75 lies inside the ratio range
        out.append((h * w / (H * W), h / w))
    return np.array(out)


@given(
    batch=st.integers(1, 4),
    rgb=st.booleans(),
    hw=st.tuples(st.integers(6, 30), st.integers(6, 30)),
    out=st.tuples(st.integers(4, 20), st.integers(4, 20)),
    seed=st.integers(0, 2**31 - 1),
    units=st.sampled_from(["normalized", "pixels"]),
)
def test_shapes_and_ranges(batch, rgb, hw, out, seed, units):
    overrides = {} if rgb else dict(saturation=0.0, hue=0.0, grayscale_p=0.0)
    aug = STARAugment(out, crop_units=units, blur_kernel_size=3, **overrides)
    c = 3 if rgb else 1
    x = torch.rand(batch, c, *hw, generator=torch.Generator().manual_seed(seed))
    views, params = aug(x, generator=torch.Generator().manual_seed(seed))
    assert views.shape == (batch, c, *out) and params.shape == (batch, 11)
    assert views.dtype == torch.float32 and params.dtype == torch.float32
    assert torch.isfinite(views).all() and views.min() >= 0 and views.max() <= 1
    px = params if units == "pixels" else params_to_pixels(params, hw)
    assert (px[:, 0] + px[:, 2] <= hw[0] + 1e-3).all() and (px[:, 1] + px[:, 3] <= hw[1] + 1e-3).all()
    if not rgb:
        assert (params[:, 7] == 1).all() and (params[:, 8] == 0).all() and (params[:, 9] == 0).all()


@pytest.mark.parametrize(
    "make, err, words",
    [
        (lambda: torch.rand(3, 16, 16), ValueError, "4 dimensions"),
        (lambda: torch.randint(0, 255, (2, 3, 16, 16), dtype=torch.uint8), TypeError, "floating-point"),
        (lambda: torch.rand(2, 1, 16, 16), ValueError, "3 (RGB) channels"),
        (lambda: torch.rand(2, 3, 16, 16) * 2 - 0.5, ValueError, "[0, 1]"),
        (lambda: torch.rand(0, 3, 16, 16), ValueError, "batch size 0"),
        (lambda: [[0.5]], TypeError, "torch.Tensor"),
    ],
)
def test_bad_images(make, err, words):
    with pytest.raises(err, match=words.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        STARAugment(8, check_range=True)(make())


def test_range_check_can_be_turned_off():
    x = torch.rand(2, 3, 16, 16) * 2 - 0.5
    views, _ = STARAugment(8, check_range=False, jitter_p=0.0, blur_p=0.0, grayscale_p=0.0)(x)
    assert views.min() < 0  # no clamping outside the colour ops


@pytest.mark.parametrize(
    "kwargs, err, words",
    [
        (dict(crop_units="cm"), ValueError, "crop_units"),
        (dict(flip_p=1.5), ValueError, "flip_p"),
        (dict(hue=0.7), ValueError, "hue"),
        (dict(scale=(0.5, 0.2)), ValueError, "scale"),
        (dict(blur_kernel_size=4), ValueError, "odd"),
        (dict(blur_kernel_size=17), ValueError, "too large"),
        (dict(colour=1), TypeError, "unknown AugmentConfig"),
        (dict(config="simclr"), TypeError, "AugmentConfig"),
    ],
)
def test_bad_config(kwargs, err, words):
    with pytest.raises(err, match=words):
        STARAugment(8, **kwargs)


def test_bad_sizes_and_params():
    with pytest.raises(ValueError, match="output_size"):
        STARAugment(0)
    with pytest.raises(ValueError, match=r"\[\.\.\., 11\]"):
        params_to_pixels(torch.zeros(3, 10), 32)
    with pytest.raises(TypeError, match="floating-point"):
        params_to_pixels(torch.zeros(3, 11, dtype=torch.long), 32)
    aug = STARAugment(8)
    s = aug.sample(4, (16, 16))
    with pytest.raises(ValueError, match="drawn for 4 images"):
        aug.apply(torch.rand(5, 3, 16, 16), s)


def test_augment_needs_no_kornia():
    """Every op is written with torch ops: STARAugment builds and runs with kornia unimportable."""
    code = (
        "import sys; sys.modules['kornia'] = None\n"
        "import torch\n"
        "from star_heads.augment import STARAugment\n"
        "v, p = STARAugment.byol(8)(torch.rand(2, 3, 12, 12), view=1)\n"
        "print('OK', tuple(v.shape), tuple(p.shape))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=_env())
    assert "OK (2, 3, 8, 8) (2, 12)" in out.stdout


def _env() -> dict[str, str]:
    """Environment whose PYTHONPATH finds this checkout's star_heads even when it is not installed."""
    import star_heads

    root = str(Path(star_heads.__file__).resolve().parent.parent)
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
