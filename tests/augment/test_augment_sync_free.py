"""STARAugment and AugParamNormalizer make no host read and no blocking host<->device copy (meta stands in for CUDA),
and the device-side sampling has the right distributions and is reproducible."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats
from sync_guard import HostSyncError, HostSyncGuard
from torch.utils._python_dispatch import TorchDispatchMode

from star_heads import value_checks
from star_heads.augment import AugmentConfig, AugmentSample, STARAugment, sample_augment
from star_heads.equivariance import AugParamNormalizer

AUGMENTS = {
    "default": lambda: STARAugment(16),
    "byol+local": lambda: STARAugment.byol(16, num_local_crops=2, check_range=False),
    "pixels": lambda: STARAugment((12, 10), crop_units="pixels", blur_p=1.0, solarize_p=0.5),
}


@pytest.mark.parametrize("name", sorted(AUGMENTS))
def test_views_original_replay_multicrop_make_no_host_sync_on_meta(name):
    aug = AUGMENTS[name]()
    x = torch.empty(6, 3, 24, 20, device="meta")
    with HostSyncGuard("meta"):
        for view in range(aug.num_views):
            views, params = aug(x, view=view)
            assert views.device.type == params.device.type == "meta"
            assert params.shape == (6, aug.param_dim)
        x0 = aug.original(x)
        crops = aug.multi_crop(x)
        sample = aug.sample(6, (24, 20), view=aug.num_views - 1, device="meta")
        replayed = aug.replay(x, sample)
        ident = aug.identity_params(6, (24, 20), device="meta")
    assert x0.shape == views.shape == replayed.shape and ident.shape == (6, aug.param_dim)
    assert len(crops.global_views) == aug.num_views and len(crops.local_views) == aug.num_local_crops


class _CopyRecorder(TorchDispatchMode):
    """Records every host->device copy with its non_blocking flag."""

    def __init__(self):
        super().__init__()
        self.copies: list[tuple[tuple[int, ...], bool]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.overloadpacket.__name__ == "_to_copy" and args[0].device.type == "cpu":
            target = kwargs.get("device")
            if target is not None and torch.device(target).type != "cpu":
                self.copies.append((tuple(args[0].shape), bool(kwargs.get("non_blocking", False))))
        return func(*args, **kwargs)


def test_a_cpu_generator_moves_one_packed_non_blocking_sample_per_call():
    aug = STARAugment.byol(16, num_local_crops=3)
    x = torch.empty(5, 3, 20, 20, device="meta")
    g = torch.Generator().manual_seed(0)
    with HostSyncGuard("meta", strict=False) as guard, _CopyRecorder() as rec:
        aug(x, generator=g, view=1)
        aug.multi_crop(x, generator=g)
    assert rec.copies == [((5, 17), True), ((5 * 5, 17), True)]  # 2 global + 3 local views, one transfer
    assert [e.split(" of")[0] for e in guard.events] == ["aten._to_copy cpu→meta"] * 2  # and nothing else


def test_value_checks_are_opt_in_and_reached_by_the_switch():
    x = torch.empty(2, 3, 12, 12, device="meta")
    aug = STARAugment(8)
    with HostSyncGuard("meta"):
        aug(x)
    with value_checks(), pytest.raises((HostSyncError, RuntimeError, NotImplementedError)), HostSyncGuard("meta"):
        aug(x)  # the [0, 1] range check reads values: a host sync
    with pytest.raises((HostSyncError, RuntimeError, NotImplementedError)), HostSyncGuard("meta"):
        STARAugment(8, check_range=True)(x)


@pytest.mark.parametrize("momentum", [None, 0.2])
def test_normalizer_train_and_eval_make_no_host_sync_on_meta(momentum):
    norm = AugParamNormalizer(12, momentum=momentum, crop_units="normalized").to("meta")
    p = torch.empty(7, 12, device="meta")
    with HostSyncGuard("meta"):
        out = norm.train()(p)
        norm.update(p)
        out_eval = norm.eval()(p)
    assert out.shape == out_eval.shape == (7, 12) and out.device.type == "meta"
    assert norm.running_mean.device.type == "meta"


# --------------------------------------------------------------------------- sampling on the device
def _within_binomial(count: int, n: int, p: float, z: float = 4.5) -> bool:
    return abs(count - n * p) <= z * math.sqrt(n * p * (1 - p)) + 1e-9


def test_device_sampling_distributions(device):
    n = 4000
    cfg = AugmentConfig(16, solarize_p=0.3, blur_sigma=(0.5, 1.5))
    s = sample_augment(cfg, n, (40, 30), torch.Generator(device).manual_seed(3))
    assert s.device.type == device.type
    s = s.to("cpu")
    for flag, p in (("flip", 0.5), ("jitter", 0.8), ("grayscale", 0.2), ("solarize", 0.3)):
        assert _within_binomial(int(getattr(s, flag).sum()), n, p), flag
    blurred = s.sigma > 0
    assert _within_binomial(int(blurred.sum()), n, 0.5)
    assert stats.kstest(s.sigma[blurred].numpy(), stats.uniform(0.5, 1.0).cdf).pvalue > 1e-3
    f = s.factors[s.jitter]
    for j, (lo, hi) in enumerate([(0.6, 1.4), (0.6, 1.4), (0.6, 1.4), (-0.1, 0.1)]):
        assert stats.kstest(f[:, j].numpy(), stats.uniform(lo, hi - lo).cdf).pvalue > 1e-3
    assert torch.equal(s.factors[~s.jitter], torch.tensor([1.0, 1.0, 1.0, 0.0], dtype=s.factors.dtype).expand(
        int((~s.jitter).sum()), 4))
    assert torch.equal(s.order.sort(dim=1).values, torch.arange(4).expand(n, 4))
    area = (s.crop[:, 2] * s.crop[:, 3]).double() / (40 * 30)
    assert area.max() <= 1.0 and area.min() >= 0.2 - 0.05
    s.validate(values=True)  # every box inside the image, positive size


@settings(max_examples=10)
@given(seed=st.integers(0, 2**31 - 1), batch=st.integers(1, 5), view=st.integers(0, 1))
def test_same_seed_same_views_and_params_on_the_cpu(seed, batch, view):
    aug = STARAugment.byol(8)
    x = torch.rand(batch, 3, 14, 11, generator=torch.Generator().manual_seed(seed))
    a = aug(x, generator=torch.Generator().manual_seed(seed), view=view)
    b = aug(x, generator=torch.Generator().manual_seed(seed), view=view)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    torch.manual_seed(seed)
    c = aug(x, view=view)
    torch.manual_seed(seed)
    d = aug(x, view=view)
    assert torch.equal(c[0], d[0]) and torch.equal(c[1], d[1])


@given(seed=st.integers(0, 2**31 - 1), batch=st.integers(1, 6), solarize=st.booleans())
def test_pack_round_trip_is_exact(seed, batch, solarize):
    """The one-transfer path (pack -> move -> unpack) loses nothing."""
    cfg = AugmentConfig(8, solarize_p=0.5 if solarize else 0.0)
    s = sample_augment(cfg, batch, (17, 23), torch.Generator().manual_seed(seed))
    t = AugmentSample.unpack(s.pack(), s.image_size, s.config)
    for name in ("crop", "flip", "jitter", "factors", "order", "grayscale", "sigma", "solarize"):
        a, b = getattr(s, name), getattr(t, name)
        assert a.dtype == b.dtype and torch.equal(a, b), name


def test_a_cpu_generator_gives_the_same_sample_on_any_device(device):
    aug = STARAugment.byol(12, num_local_crops=2)
    x = torch.rand(6, 3, 20, 20)
    ref = aug.multi_crop(x, generator=torch.Generator().manual_seed(4))
    got = aug.multi_crop(x.to(device), generator=torch.Generator().manual_seed(4))
    for a, b in zip(ref.params, got.params):
        assert b.device.type == device.type
        torch.testing.assert_close(b.cpu(), a, rtol=0, atol=0)
    for a, b in zip(ref.views, got.views):
        torch.testing.assert_close(b.cpu(), a, rtol=0, atol=1e-4)


@settings(max_examples=15)
@given(seed=st.integers(0, 2**31 - 1), probs=st.lists(st.sampled_from([0.0, 0.3, 1.0]), min_size=5, max_size=5),
       strength=st.floats(0.0, 3.0), hue=st.floats(0.0, 0.5), lo=st.floats(0.05, 1.0), span=st.floats(0.0, 2.0))
def test_device_draws_respect_the_config(device, seed, probs, strength, hue, lo, span):
    flip_p, jitter_p, grayscale_p, blur_p, solarize_p = probs
    cfg = AugmentConfig(8, flip_p=flip_p, jitter_p=jitter_p, grayscale_p=grayscale_p, blur_p=blur_p,
                        solarize_p=solarize_p, brightness=strength, contrast=strength, saturation=strength, hue=hue,
                        blur_sigma=(lo, lo + span))
    s = sample_augment(cfg, 64, (19, 13), torch.Generator(device).manual_seed(seed)).to("cpu")
    for flag, p in (("flip", flip_p), ("jitter", jitter_p), ("grayscale", grayscale_p), ("solarize", solarize_p)):
        t = getattr(s, flag)
        assert (p > 0 or not t.any()) and (p < 1 or t.all()), flag
    assert (blur_p > 0 or not (s.sigma > 0).any()) and (blur_p < 1 or (s.sigma > 0).all())
    blurred = s.sigma[s.sigma > 0]
    assert (blurred >= lo).all() and (blurred <= lo + span).all()
    f = s.factors[s.jitter]
    assert (f[:, :3] >= max(0.0, 1 - strength)).all() and (f[:, :3] <= 1 + strength).all()
    assert (f[:, 3].abs() <= hue).all()
    s.validate(values=True)
