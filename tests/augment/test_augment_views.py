"""Per-view configs, BYOL's recipe, solarization, multi-crop and exact-or-refused replay of STARAugment."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from star_heads import MultiCropViews
from star_heads.augment import (
    PARAM_NAMES,
    AugmentConfig,
    AugmentSample,
    STARAugment,
    sample_augment,
)
from star_heads.equivariance import AugParamNormalizer

PLAIN = {"flip_p": 0.0, "jitter_p": 0.0, "grayscale_p": 0.0, "blur_p": 0.0}


def _within_binomial(count: int, n: int, p: float, z: float = 4.5) -> bool:
    return abs(count - n * p) <= z * math.sqrt(n * p * (1 - p)) + 1e-9


def test_param_dim_grows_with_solarization_and_is_shared_by_every_view():
    plain = STARAugment(8)
    assert plain.param_dim == 11 and plain.param_names == PARAM_NAMES
    byol = STARAugment.byol(8)
    assert byol.param_dim == 12 and byol.param_names == (*PARAM_NAMES, "solarize")
    x = torch.rand(4, 3, 12, 12)
    assert byol(x, view=0)[1].shape == byol(x, view=1)[1].shape == (4, 12)  # view 0 never solarizes: column 0
    assert (byol(x, view=0)[1][:, 11] == 0).all()
    local_only = STARAugment(8, num_local_crops=1, local_config={"solarize_p": 0.5})
    assert local_only.param_dim == 12 and local_only(x)[1].shape == (4, 12)
    assert AugParamNormalizer.for_augment(byol).dim == 12 and AugParamNormalizer(plain.param_dim).dim == 11
    assert AugParamNormalizer.for_augment(STARAugment(8, crop_units="pixels")).crop_units == "pixels"


def test_byol_recipe():
    aug = STARAugment.byol(32)
    a, b = aug.view_configs
    for c in (a, b):
        assert (c.scale, c.jitter_p, c.brightness, c.contrast, c.saturation, c.hue, c.grayscale_p) == (
            (0.08, 1.0), 0.8, 0.4, 0.4, 0.2, 0.1, 0.2)
        assert c.size == (32, 32)
    assert (a.blur_p, a.solarize_p, b.blur_p, b.solarize_p) == (1.0, 0.0, 0.1, 0.2)
    n = 3000
    s0 = aug.sample(n, (40, 40), torch.Generator().manual_seed(0), view=0)
    s1 = aug.sample(n, (40, 40), torch.Generator().manual_seed(0), view=1)
    assert (s0.sigma > 0).all() and not s0.solarize.any()
    assert _within_binomial(int((s1.sigma > 0).sum()), n, 0.1) and _within_binomial(int(s1.solarize.sum()), n, 0.2)
    assert STARAugment.byol(32, blur_sigma=(0.5, 0.6)).view_configs[1].blur_sigma == (0.5, 0.6)
    custom = STARAugment.byol(32, view_configs=[{}, {}, {"solarize_p": 1.0}])
    assert custom.num_views == 3 and custom.view_configs[0].scale == (0.08, 1.0)


def test_solarize_inverts_pixels_above_half_and_reports_it():
    x = torch.rand(6, 3, 10, 10)
    on, p_on = STARAugment(10, scale=(1.0, 1.0), ratio=(1.0, 1.0), solarize_p=1.0, **PLAIN)(x)
    off, p_off = STARAugment(10, scale=(1.0, 1.0), ratio=(1.0, 1.0), solarize_p=0.0, **PLAIN)(x)
    torch.testing.assert_close(off, x, rtol=0, atol=1e-6)
    torch.testing.assert_close(on, torch.where(x >= 0.5, 1 - x, x), rtol=0, atol=1e-6)
    assert (p_on[:, 11] == 1).all() and p_off.shape == (6, 11)


def test_views_use_their_own_config():
    x = torch.rand(5, 3, 16, 16)
    aug = STARAugment(8, view_configs=[{"blur_p": 0.0}, AugmentConfig(blur_p=1.0, jitter_p=0.0)])
    assert aug.view_configs[1].size == (8, 8)  # output_size sets every view's size
    _, p0 = aug(x, view=0)
    _, p1 = aug(x, view=1)
    assert (p0[:, 10] == 0).all() and (p1[:, 10] > 0).all()
    assert torch.equal(p1[:, 5:9], torch.tensor([1.0, 1.0, 1.0, 0.0]).expand(5, 4))
    with pytest.raises(ValueError, match=r"view must be in \[0, 1\]"):
        aug(x, view=2)
    with pytest.raises(TypeError, match="view must be an int"):
        aug(x, view="1")
    with pytest.raises(TypeError, match="unknown AugmentConfig"):
        STARAugment(8, view_configs=[{"blur": 1.0}])
    with pytest.raises(ValueError, match="at least one view"):
        STARAugment(8, view_configs=[])
    with pytest.raises(TypeError, match="view_configs must be a sequence"):
        STARAugment(8, view_configs={"blur_p": 1.0})
    with pytest.raises(TypeError, match=r"view_configs\[1\] must be an AugmentConfig"):
        STARAugment(8, view_configs=[{}, "byol"])


def test_multi_crop_shapes_params_and_replay():
    aug = STARAugment.byol(16, num_local_crops=4, local_size=6)
    x = torch.rand(5, 3, 30, 24)
    out = aug.multi_crop(x, generator=torch.Generator().manual_seed(2))
    assert isinstance(out, MultiCropViews) and len(out) == 6
    assert [tuple(v.shape) for v in out.global_views] == [(5, 3, 16, 16)] * 2
    assert [tuple(v.shape) for v in out.local_views] == [(5, 3, 6, 6)] * 4
    assert all(p.shape == (5, 12) for p in out.params)
    assert out.views[:2] == out.global_views and out.params[2:] == out.local_params
    # the same draws, made one by one: global views in order, then the local crops
    g = torch.Generator().manual_seed(2)
    configs = [*aug.view_configs, *[aug.local_config] * 4]
    for cfg, view, params in zip(configs, out.views, out.params):
        s = sample_augment(cfg, 5, (30, 24), g)
        torch.testing.assert_close(aug.replay(x, s), view, rtol=0, atol=0)
        torch.testing.assert_close(s.vector(solarize=True), params, rtol=0, atol=0)
    # local crops: view 0's colour settings, the local area range and size
    local = aug.local_config
    assert (local.scale, local.size, local.blur_p, local.solarize_p) == ((0.05, 0.14), (6, 6), 1.0, 0.0)
    box = torch.cat(out.local_params)[:, 2:4]
    area = box[:, 0] * box[:, 1]
    assert area.max() <= 0.14 + 0.1 and area.min() >= 0.05 - 0.04  # integer boxes of a 30x24 image
    assert STARAugment(224, num_local_crops=2).local_config.size == (96, 96)  # default: 3/7 of the global size
    assert STARAugment(16).multi_crop(x).local_views == []


def test_local_config_override():
    aug = STARAugment(16, num_local_crops=1, local_config={"jitter_p": 0.0, "blur_p": 0.0})
    assert torch.equal(aug.multi_crop(torch.rand(4, 3, 20, 20)).local_params[0][:, 5:9],
                       torch.tensor([1.0, 1.0, 1.0, 0.0]).expand(4, 4))
    with pytest.raises(ValueError, match="local crops: blur_kernel_size"):
        STARAugment(16, num_local_crops=1, local_size=2, blur_kernel_size=5)


# --------------------------------------------------------------------------- replay exact or refused
def test_replay_through_another_augment_is_exact():
    """The drawing augment can skip ops (hue=0); a replaying augment with other settings reproduces it anyway."""
    x = torch.rand(8, 3, 20, 20)
    drawer = STARAugment(12, jitter_p=1.0, blur_p=1.0, solarize_p=0.5)
    s = drawer.sample(8, (20, 20), torch.Generator().manual_seed(5))
    want = drawer.replay(x, s)
    other = STARAugment(24, hue=0.0, blur_p=0.0, blur_kernel_size=7)
    torch.testing.assert_close(other.replay(x, s), want, rtol=0, atol=0)
    views, params = drawer(x, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(views, want, rtol=0, atol=0)
    torch.testing.assert_close(params, s.vector(), rtol=0, atol=0)


def _hand_made(crop, **over):
    s = sample_augment(AugmentConfig(8), 2, (16, 16), torch.Generator().manual_seed(0))
    fields = {k: getattr(s, k) for k in s.__dataclass_fields__}
    fields.update(crop=torch.tensor(crop), **over)
    return AugmentSample(**fields)


@pytest.mark.parametrize(
    "crop, words",
    [
        ([[0, 0, 8, 8], [10, 0, 8, 8]], r"sample.crop\[1\] = \[10, 0, 8, 8\].*inside the 16x16 image"),
        ([[0, 0, 0, 8], [0, 0, 8, 8]], r"sample.crop\[0\].*positive size"),
        ([[-1, 0, 8, 8], [0, 0, 8, 8]], r"sample.crop\[0\]"),
    ],
)
def test_replay_refuses_bad_crop_boxes(crop, words):
    aug = STARAugment(8)
    with pytest.raises(ValueError, match=words):
        aug.replay(torch.rand(2, 3, 16, 16), _hand_made(crop))


def test_replay_refuses_malformed_samples():
    aug = STARAugment(8)
    x = torch.rand(2, 3, 16, 16)
    good = [[0, 0, 8, 8], [0, 0, 16, 16]]
    assert aug.replay(x, _hand_made(good)).shape == (2, 3, 8, 8)
    with pytest.raises(TypeError, match="sample.crop must be a int tensor"):
        aug.replay(x, _hand_made([[0.0, 0.0, 8.0, 8.0]] * 2))
    with pytest.raises(ValueError, match=r"sample.flip must have shape \[2\]"):
        aug.replay(x, _hand_made(good, flip=torch.zeros(3, dtype=torch.bool)))
    with pytest.raises(ValueError, match="permutations"):
        aug.replay(x, _hand_made(good, order=torch.zeros(2, 4, dtype=torch.long)))
    with pytest.raises(ValueError, match="sigma must be finite"):
        aug.replay(x, _hand_made(good, sigma=torch.tensor([float("nan"), 0.0], dtype=torch.float64)))
    with pytest.raises(TypeError, match="sample.config must be an AugmentConfig"):
        aug.replay(x, _hand_made(good, config={"blur_p": 0}))
    with pytest.raises(ValueError, match="drawn for 2 images"):
        aug.replay(torch.rand(3, 3, 16, 16), _hand_made(good))
    with pytest.raises(TypeError, match="must be an AugmentSample"):
        aug.replay(x, {"crop": good})


def test_original_matches_interpolate():
    x = torch.rand(3, 3, 40, 28)
    aug = STARAugment((16, 12), view_configs=[{}, {"antialias": False}])
    ref = F.interpolate(x.double(), size=(16, 12), mode="bilinear", align_corners=False, antialias=True)
    torch.testing.assert_close(aug.original(x).double(), ref, rtol=0, atol=2e-6)


ROOT = Path(__file__).resolve().parents[2]


def test_docs_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "augment.md").read_text(), re.DOTALL)
    assert blocks
    for code in blocks:
        exec(compile(code, "docs/augment.md", "exec"), {})  # noqa: S102 - the docs example itself


def test_benchmark_quick_measures_multi_crop(tmp_path):
    pytest.importorskip("kornia")  # the benchmark's reference pipeline
    proc = subprocess.run([sys.executable, "-m", "benchmarks.augment", "--quick", "--out-dir", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, check=False,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])})
    assert proc.returncode == 0, proc.stderr[-3000:]
    mc = json.loads((tmp_path / "benchmarks" / "augment.json").read_text())["multi_crop"]
    assert mc["num_local_crops"] == 6 and mc["two_views_ms"] > 0 and mc["multi_crop_ms"] > 0
    assert mc["multi_over_two"] == pytest.approx(mc["multi_crop_ms"] / mc["two_views_ms"])
    section = (tmp_path / "augment.md").read_text()
    assert "<!-- BEGIN multicrop_speed -->" in section and "2 global + 6 local crops" in section
